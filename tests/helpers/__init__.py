"""What many tests build the same way: the repository's path, tiny configs, random and perturbed params.

Imported as `helpers.*` (tests/ is on sys.path for the suite and for scripts run from it); conftest.py
holds only the suite's environment and its fixtures.
"""
