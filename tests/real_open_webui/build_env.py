"""Build the environment the Open WebUI suite (tests/test_open_webui.py) runs in: idempotent, outside the repo.

    python tests/real_open_webui/build_env.py  # then: ~/.cache/wattgate/openwebui-env/bin/python -m pytest -m open_webui

A virtualenv at ``$WATTGATE_OPEN_WEBUI_ENV`` (default ``~/.cache/wattgate/openwebui-env``) with
Open WebUI and wattgate (editable, with its test extras): about 3 GB, several minutes. PyTorch's
CPU build goes in first, so that Open WebUI's dependencies do not pull the CUDA one (about 7 GB).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from any folder: `tests` importable
from tests.opt_in_env import build, env_dir, pip

ENV = env_dir("WATTGATE_OPEN_WEBUI_ENV", "openwebui-env")
# open-webui 0.12.4, what issue 31 was found on; torch 2.13.0 is the CPU build the index here
# serves that satisfies it (2026-12-07).
PINS = {"open-webui": "0.12.4", "torch": "2.13.0"}


def _install(python: Path) -> None:
    pip(python, f"torch=={PINS['torch']}")
    pip(python, f"open-webui=={PINS['open-webui']}")


if __name__ == "__main__":
    build(ENV, PINS, _install, "Open WebUI")
    sys.exit(0)
