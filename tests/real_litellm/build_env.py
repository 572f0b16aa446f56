"""Build the environment the LiteLLM suite (tests/test_litellm.py) runs in: idempotent, outside the repo.

    python tests/real_litellm/build_env.py     # then: ~/.cache/wattgate/litellm-env/bin/python -m pytest -m litellm

A virtualenv at ``$WATTGATE_LITELLM_ENV`` (default ``~/.cache/wattgate/litellm-env``) with
LiteLLM's proxy and wattgate (editable, with its test extras): about 800 MB, a minute or two.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from any folder: `tests` importable
from tests.opt_in_env import build, env_dir, pip

ENV = env_dir("WATTGATE_LITELLM_ENV", "litellm-env")
# litellm[proxy] 1.108.7, what issue 31 was found on; 1.109 and later need litellm-proxy, which the
# package index here does not carry (2026-12-07).
PINS = {"litellm": "1.108.7"}


def _install(python: Path) -> None:
    pip(python, f"litellm[proxy]=={PINS['litellm']}")


if __name__ == "__main__":
    build(ENV, PINS, _install, "LiteLLM")
    sys.exit(0)
