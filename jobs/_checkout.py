"""Puts the checkout this script lives in on sys.path, so `python jobs/<name>.py` runs without installing
(also in `ray job submit --working-dir .`, where the package is not installed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
