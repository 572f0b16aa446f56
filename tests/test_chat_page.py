"""The chat page's and widget's routes over HTTP, and ``GET /v1/energy`` (the ledger's totals per model) that the
page's model picker reads. What the page does in a browser: tests/test_browser.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import Auth, GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
MSG = [{"role": "user", "content": "hi"}]


def _settings(upstream: str, tmp: Any, **gateway: Any) -> Settings:
    return Settings(
        meter=MeterSettings(source="simulated", settle_lag_ms=200),
        ledger=LedgerSettings(path=tmp / "ledger.db"),
        gateway=GatewaySettings(**gateway),
        models={
            "llama": Model(served_name=SERVED, upstream=f"{upstream}/v1", gpus=[0]),
            "small": Model(served_name=SERVED, upstream=f"{upstream}/v1", gpus=[0]),
        },
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=8)) as up:
        yield up.url


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.styled: list[str] = []  # elements with a style attribute or <style>
        self.inline_handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        if tag == "style" or any(k == "style" for k, _ in attrs):
            self.styled.append(tag)
        self.inline_handlers += [k for k, _ in attrs if k.startswith("on")]


def test_the_page_is_served_with_a_strict_policy_and_no_inline_code(upstream, tmp_path):
    with ServerThread(create_app(_settings(upstream, tmp_path))) as gw:
        page = httpx.get(f"{gw.url}/chat")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe" not in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        tags = _Tags()
        tags.feed(page.text)
        assert tags.scripts and all(s.get("src") for s in tags.scripts)  # every script is a file
        assert not tags.styled and not tags.inline_handlers
        for s in tags.scripts:  # and each is served
            assert httpx.get(f"{gw.url}{s['src']}").status_code == 200
        for path in ("/chat/chat.css", "/chat/chat.js", "/chat/icon.svg"):
            r = httpx.get(f"{gw.url}{path}")
            assert r.status_code == 200 and r.headers["content-security-policy"] == policy, path
        again = httpx.get(f"{gw.url}/chat", headers={"if-none-match": page.headers["etag"]})
        assert again.status_code == 304 and not again.content


def test_the_widget_carries_the_report_equivalents_and_loads_from_any_origin(upstream, tmp_path):
    from wattgate.proxy.equivalents import EQUIVALENTS

    with ServerThread(create_app(_settings(upstream, tmp_path))) as gw:
        widget = httpx.get(f"{gw.url}/widget.js", headers={"origin": "https://app.example"})
    assert widget.status_code == 200 and widget.headers["content-type"].startswith("text/javascript")
    assert widget.headers["access-control-allow-origin"] == "*"
    assert "/*EQUIVALENTS*/" not in widget.text
    assert all(e["basis"] in widget.text for e in EQUIVALENTS)
    assert "innerHTML" not in widget.text and "eval(" not in widget.text


def test_the_page_and_widget_can_be_switched_off(upstream, tmp_path):
    with ServerThread(create_app(_settings(upstream, tmp_path, chat_page=False))) as gw:
        for path in ("/chat", "/widget.js", "/chat/chat.js"):
            r = httpx.get(f"{gw.url}{path}")
            assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", path
        assert httpx.get(f"{gw.url}/v1/models").status_code == 200


def _summary(url: str, key: str | None = None, **params: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/energy", params=params, headers=headers)


def _wait_for_requests(url: str, key: str, want: dict[str, int], timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _summary(url, key, by="model").json()["data"]
        if {r["model"]: r["requests"] for r in rows} == want:
            return rows
        assert time.monotonic() < deadline, f"ledger totals {rows} never reached {want}"
        time.sleep(0.1)


def test_energy_totals_per_model_are_the_callers_own(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("WG_CHAT_KEYS", "team-a:sk-a,team-b:sk-b")
    with ServerThread(create_app(_settings(upstream, tmp_path, auth=Auth(keys_env="WG_CHAT_KEYS")))) as gw:
        def call(key: str, model: str) -> None:
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": model, "messages": MSG},
                           headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200

        for _ in range(3):
            call("sk-a", "llama")
        call("sk-a", "small")
        call("sk-b", "small")
        rows = _wait_for_requests(gw.url, "sk-a", {"llama": 3, "small": 1})
        assert _wait_for_requests(gw.url, "sk-b", {"small": 1})
        assert _summary(gw.url).status_code == 401
        llama = next(r for r in rows if r["model"] == "llama")
        assert llama["completion_tokens"] == 24 and llama["joules_per_token"] == pytest.approx(llama["joules"] / 24)
        assert llama["methods"] == "simulated 3"
        by_day = _summary(gw.url, "sk-a", by="day", since="1d").json()
        assert by_day["by"] == "day" and sum(r["requests"] for r in by_day["data"]) == 4

        bad_group = _summary(gw.url, "sk-a", by="team")  # one team may not list the others
        assert bad_group.status_code == 400 and bad_group.json()["error"]["param"] == "by"
        bad_since = _summary(gw.url, "sk-a", since="yesterday")
        assert bad_since.status_code == 400 and bad_since.json()["error"]["param"] == "since"
        assert re.search("duration", bad_since.json()["error"]["message"])


def test_energy_totals_without_a_ledger_are_empty(upstream, tmp_path):
    settings = _settings(upstream, tmp_path).model_copy(update={"ledger": LedgerSettings(enabled=False)})
    with ServerThread(create_app(settings)) as gw:
        r = _summary(gw.url)
    assert r.status_code == 200 and r.json()["data"] == []
