"""The repository root, for subprocesses (cwd) and for configs/ files."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
