"""What the builders of the opt-in suites' environments share (tests/real_*/build_env.py).

Each environment is a virtualenv outside the repo, under ``~/.cache/wattgate`` unless its
variable says otherwise, holding the real thing at pinned versions and wattgate itself
(editable, with its test extras). A marker file records the pins and the checkout: a second
run with the same pins does nothing but point the editable install at this checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_dir(variable: str, name: str) -> Path:
    """The environment's folder: ``$variable``, else ``~/.cache/wattgate/name``."""
    return Path(os.environ.get(variable, Path.home() / ".cache" / "wattgate" / name))


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=True)


def build(env: Path, pins: dict[str, str], install: Callable[[Path], None], what: str) -> Path:
    """The environment's python, built by ``install`` (then wattgate) if it is missing or its pins changed."""
    python, marker = env / "bin" / "python", env / "wattgate-env.json"
    built = json.loads(marker.read_text()) if marker.exists() and python.exists() else {}
    if built.get("pins") != pins:
        print(f"building the {what} environment in {env} (a few minutes)...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        pip(python, "--upgrade", "pip", "packaging")
        install(python)
    if built.get("pins") != pins or built.get("wattgate") != str(ROOT):  # new, or another checkout
        pip(python, "-e", f"{ROOT}[test]")
        marker.write_text(json.dumps({"pins": pins, "wattgate": str(ROOT)}))
    print(f"{what} environment ready: {env}")
    return python
