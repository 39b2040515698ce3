"""Regenerate docs/label-{rank,rate,arena}.png: the browser tests take them (with a fake
generator, no model) and keep them when LABEL_SCREENSHOTS_DIR is set.

    python docs/make_screenshots.py
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    env = {**os.environ, "LABEL_SCREENSHOTS_DIR": str(REPO / "docs"), "PYTHONPATH": str(REPO)}
    test = "tests/test_label_browser.py::test_rank_with_mouse_keyboard_and_drag_then_undo"
    also = "tests/test_label_browser.py::test_rate_and_arena_pages"
    command = [sys.executable, "-m", "pytest", "-q", test, also]
    sys.exit(subprocess.run(command, cwd=REPO, env=env).returncode)
