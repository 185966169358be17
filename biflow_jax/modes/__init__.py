"""Command-line modes: each is one function that main.py calls."""
