"""The Open WebUI filter in the real Open WebUI, driven in Chromium: a line of energy above every reply.

Opt-in: ``python tests/real_open_webui/build_env.py`` builds the environment, then
``~/.cache/wattgate/openwebui-env/bin/python -m pytest -m open_webui tests/test_open_webui.py``
runs this suite (README, "Tests"). The cases through LiteLLM also need the LiteLLM suite's
environment (``python tests/real_litellm/build_env.py``); without it they are skipped, saying so.

Open WebUI runs as a user starts it (``open-webui serve``), offline and without sign-in, with two
connections: the gateway itself, and LiteLLM's stock proxy in front of the same gateway. The
filter is installed through Open WebUI's own functions API (what its Functions page calls), made
global, and pointed at the gateway. Screenshots go where tests/test_browser.py's go.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.open_webui
if importlib.util.find_spec("open_webui") is None:  # not imported: importing it sets up a data folder
    pytest.skip("the Open WebUI environment is not installed: python tests/real_open_webui/build_env.py",
                allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")

from tests.chromium import CHROMIUM, NO_CHROMIUM, screenshot
from tests.conftest import SERVED, settled_records, stop_server, wait_serving
from tests.opt_in_env import env_dir
from tests.real_litellm import proxy as litellm_proxy
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.equivalents import sig3
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

if CHROMIUM is None:
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

FILTER = Path(__file__).resolve().parents[1] / "integrations" / "open_webui_filter.py"
START_S = 180  # Open WebUI answers /health about 25 s after start on 2 cores
DIRECT, VIA_LITELLM = "llama", "llama-via-litellm"
LITELLM = env_dir("WATTGATE_LITELLM_ENV", "litellm-env") / "bin" / "litellm"


@dataclass
class Stack:
    url: str  # Open WebUI
    token: str  # its admin's (sign-in is off: everyone is that admin)
    gateway: str
    models: list[str]  # the models Open WebUI offers: the gateway's, and LiteLLM's when it runs

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(method, f"{self.url}{path}", headers={"authorization": f"Bearer {self.token}"},
                          timeout=30, **kw)
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json()


def _open_webui(home: Path, connections: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``open-webui serve`` with ``connections`` (base URL -> key), offline, no sign-in, none of its
    own background calls to the model (titles, tags, follow-ups), so that the gateway sees the chat only."""
    env = {"DATA_DIR": str(home), "WEBUI_AUTH": "False", "OFFLINE_MODE": "True", "HF_HUB_OFFLINE": "1",
           "RAG_EMBEDDING_ENGINE": "openai", "ENABLE_OLLAMA_API": "False",
           "OPENAI_API_BASE_URLS": ";".join(connections), "OPENAI_API_KEYS": ";".join(connections.values()),
           "ENABLE_TITLE_GENERATION": "False", "ENABLE_TAGS_GENERATION": "False",
           "ENABLE_FOLLOW_UP_GENERATION": "False", "PATH": str(Path(sys.executable).parent)}
    port = free_port()
    with (home / "open-webui.log").open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "open-webui"), "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc, f"{url}/health", home / "open-webui.log", START_S, "Open WebUI")
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def _install_filter(stack: Stack) -> None:
    """As an admin does on the Functions page: add the file, turn it on for every model, set its valves."""
    stack.api("POST", "/api/v1/functions/create", json={
        "id": "wattgate_energy", "name": "wattgate energy", "content": FILTER.read_text(),
        "meta": {"description": "energy, carbon and water of every reply"}})
    assert stack.api("POST", "/api/v1/functions/id/wattgate_energy/toggle")["is_active"]
    assert stack.api("POST", "/api/v1/functions/id/wattgate_energy/toggle/global")["is_global"]
    stack.api("POST", "/api/v1/functions/id/wattgate_energy/valves/update", json={"gateway_url": stack.gateway})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=24)) as up:
        settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=1000),  # provisional, then settled
                            ledger=LedgerSettings(enabled=False),
                            models={DIRECT: Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            procs: list[subprocess.Popen] = []
            try:
                connections = {f"{gw.url}/v1": "none"}
                if LITELLM.exists():
                    proc, litellm_url = litellm_proxy.start(
                        LITELLM, tmp_path_factory.mktemp("litellm"), {VIA_LITELLM: f"openai/{DIRECT}@{gw.url}/v1"},
                        [], {})
                    procs.append(proc)
                    connections[f"{litellm_url}/v1"] = litellm_proxy.KEY
                proc, url = _open_webui(tmp_path_factory.mktemp("open-webui"), connections)
                procs.append(proc)
                token = httpx.post(f"{url}/api/v1/auths/signin", json={"email": "", "password": ""}).json()["token"]
                stack = Stack(url, token, gw.url, [])
                stack.models = [m["id"] for m in stack.api("GET", "/api/models")["data"]]
                _install_filter(stack)
                yield stack
            finally:
                for proc in procs:
                    stop_server(proc)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    yield tab
    context.close()


def _chat(stack: Stack, page: Any, model: str, questions: list[str]) -> list[dict[str, Any]]:
    """Ask ``questions`` in a new chat with ``model`` in the browser; each reply as Open WebUI saved it."""
    if model not in stack.models:
        pytest.skip(f"Open WebUI offers no {model}: python tests/real_litellm/build_env.py for the LiteLLM cases")
    page.goto(f"{stack.url}/?model={model}", wait_until="load")
    box = page.locator("#chat-input")
    box.wait_for(timeout=60_000)
    for _ in range(5):  # a first visit opens "what's new"
        if page.locator("div[role=dialog]").count() == 0:
            break
        page.keyboard.press("Escape")
        time.sleep(0.3)
    for n, question in enumerate(questions, 1):
        box.click()
        page.keyboard.type(question)
        page.keyboard.press("Enter")
        # Each reply's line ends "(simulated, settled)" once the filter has seen its figure settle.
        playwright_api.expect(page.get_by_text("(simulated, settled)")).to_have_count(n, timeout=30_000)
    chat = stack.api("GET", f"/api/v1/chats/{page.url.rsplit('/', 1)[-1]}")["chat"]
    replies = [m for m in chat["history"]["messages"].values() if m["role"] == "assistant"]
    return sorted(replies, key=lambda m: m["timestamp"])


def _settled(stack: Stack, request_id: str) -> dict[str, Any]:
    records = settled_records(stack.gateway, [request_id])
    assert request_id in records, f"{request_id} did not settle"
    return records[request_id]


@pytest.mark.parametrize("model", [DIRECT, VIA_LITELLM], ids=["direct", "via-litellm"])
def test_every_reply_shows_its_line_which_turns_settled(stack: Stack, page: Any, artifacts: list[Path],
                                                         model: str) -> None:
    replies = _chat(stack, page, model, ["How much energy does one chat answer use?", "And a second one?"])
    settled = []
    for reply in replies:
        usage = reply["usage"]
        assert usage["energy_method"] == "simulated" and usage["energy_settled"] is False, usage
        assert usage["output_tokens"] > 0  # the filter's keys sit beside Open WebUI's own
        record = _settled(stack, usage["energy_request_id"])
        settled.append(record)
        lines = [s["description"] for s in reply["statusHistory"]]
        assert len(lines) == 2 and lines[0].startswith(f"⚡ {sig3(usage['energy_wh'])} Wh · ")
        assert "(simulated, provisional)" in lines[0]
        assert lines[1].startswith(f"⚡ {sig3(record['wh'])} Wh · {sig3(record['gco2e'])} gCO2e · "
                                   f"{sig3(record['water_ml'])} mL water (simulated, settled)")
    total = sum(r["wh"] for r in settled)
    assert replies[1]["statusHistory"][-1]["description"].endswith(f" · this chat: {sig3(total)} Wh, a 10 W LED"
                                                                  f" bulb for {sig3(total / 10 * 3600)} seconds")
    # The (i) under the last reply lists usage's keys, the figures among them.
    page.get_by_role("button", name="Info").last.hover()
    tooltip = page.locator("pre", has_text="energy_wh")
    playwright_api.expect(tooltip).to_be_visible(timeout=5_000)
    playwright_api.expect(tooltip).to_contain_text(f'energy_request_id: "{replies[1]["usage"]["energy_request_id"]}"')
    screenshot(page, f"open-webui-{model}", artifacts)


def test_a_plain_reply_through_open_webuis_api_keeps_the_figure(stack: Stack) -> None:
    """Open WebUI's own chat API, not streamed: usage's keys come through to its caller."""
    body = {"model": DIRECT, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    usage = stack.api("POST", "/api/chat/completions", json=body)["usage"]
    assert usage["energy_method"] == "simulated" and usage["energy_wh"] > 0, usage
    assert _settled(stack, usage["energy_request_id"])["wh"] > 0
