"""Samplers: noise -> images (exact inverse, BiFlow 1-NFE, editing)."""
