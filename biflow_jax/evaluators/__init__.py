"""Evaluators: run -> metrics (bits/dim, reconstruction, FID family, classification, grids)."""
