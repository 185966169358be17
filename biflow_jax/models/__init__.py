"""Flax models: one model per module."""
