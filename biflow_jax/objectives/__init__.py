"""Objectives: what a training stage optimises (flow NLL, R-REPA, BiFlow)."""
