"""LiteLLM's proxy as a user starts it (``litellm --config``), for the suites that put it in front of a gateway."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.conftest import stop_server, wait_serving
from wattgate.proxy.serving import free_port

KEY = "sk-wattgate-suite-master-key-0123456789"
START_S = 120  # LiteLLM's proxy starts in about 15 s on 2 cores


def start(litellm_cli: Path, home: Path, models: dict[str, str], callbacks: list[str],
          env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A proxy with ``models`` (model name -> ``provider/model@base URL``) and ``callbacks``, run in
    ``home`` (its config and ``litellm.log``), offline; its process and URL once it answers."""
    model_list = []
    for name, target in models.items():
        model, api_base = target.split("@", 1)
        model_list.append({"model_name": name, "litellm_params": {"model": model, "api_base": api_base,
                                                                   "api_key": "none"}})
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({"model_list": model_list, "litellm_settings": {"callbacks": callbacks}}))
    # Offline: LiteLLM's own price map, no tokenizer from the Hub (each try costs a stream 23 s).
    env = {**os.environ, **env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1",
           "LITELLM_MASTER_KEY": KEY}
    port = free_port()
    with (home / "litellm.log").open("wb") as out:
        proc = subprocess.Popen([str(litellm_cli), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc, f"{url}/health/liveliness", home / "litellm.log", START_S, "LiteLLM's proxy")
    except BaseException:
        stop_server(proc)
        raise
    return proc, url

