"""What the suites that drive a real Chromium share (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("WATTGATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "no Chromium: apt-get install chromium (as .ci/run does)"
# As root in a container, on a machine with no route out: no sandbox, and no calls home at start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def screenshot(tab: Any, name: str, artifacts: list[Path]) -> Path:
    """A full-page screenshot into $WATTGATE_TEST_ARTIFACTS (default: wattgate-test-artifacts in the
    system's temporary folder), listed in the run's summary."""
    folder = Path(os.environ.get("WATTGATE_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "wattgate-test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    artifacts.append(path)
    return path
