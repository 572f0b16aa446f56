"""The chat page and the widget in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Skipped, saying why, where no Chromium is installed (``apt-get install chromium``; `.ci/run` installs it).
Screenshots go to $WATTGATE_TEST_ARTIFACTS (default: wattgate-test-artifacts in the system's temporary
folder); the run's summary prints their paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from tests.chromium import CHROMIUM, NO_CHROMIUM, screenshot
from tests.conftest import settled_records
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.demo import MODEL, SERVED, demo_stack
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import Auth, GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
if CHROMIUM is None and os.environ.get("WATTGATE_REQUIRE_BROWSER"):  # CI: a skip here would hide the page's tests
    raise RuntimeError("WATTGATE_REQUIRE_BROWSER is set and no Chromium is installed (apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
APP = Path(__file__).parent / "browser_app"
FIGURES = ("joules", "wh", "gco2e", "water_ml")
# Text whose contrast with its background is under WCAG AA's 4.5:1 (shadow roots included; disabled
# controls are exempt): [tag, text, ratio].
LOW_CONTRAST = """() => {
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const up = (e) => e.parentElement || (e.getRootNode() instanceof ShadowRoot ? e.getRootNode().host : null);
  const background = (el) => {
    for (let e = el; e; e = up(e)) {
      const v = rgb(getComputedStyle(e).backgroundColor);
      if (v.length < 4 || v[3] > 0) return v.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  const visit = (root) => {
    for (const el of root.querySelectorAll("*")) {
      if (el.shadowRoot) visit(el.shadowRoot);
      const text = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
      if (!text || el.closest("button:disabled") || !el.getClientRects().length) continue;
      const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))].sort((x, y) => y - x);
      if ((a + 0.05) / (b + 0.05) < 4.5) low.push([el.tagName, el.textContent.slice(0, 30), (a + 0.05) / (b + 0.05)]);
    }
  };
  visit(document);
  return low;
}"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with demo_stack(ledger=tmp_path_factory.mktemp("ledger") / "ledger.db") as (url, _):
        yield url


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own session storage) whose script errors fail the test."""
    context = browser.new_context(viewport={"width": 1000, "height": 1100})
    tab = context.new_page()
    problems: list[str] = []
    # Statuses the page meets (a 401 before a key is given) are the tests' to check; any other error,
    # a CSP refusal included, is a problem.
    tab.on("console", lambda m: problems.append(m.text)
           if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    yield tab
    context.close()
    assert not problems, problems


def badges(tab: Any) -> list[dict[str, Any]]:
    """What each badge shows, as numbers (its data- attributes carry the figures it renders)."""
    data = tab.eval_on_selector_all("wattgate-badge", "els => els.map(e => ({...e.dataset}))")
    return [{**d, **{k: float(d[k.replace("_ml", "Ml")]) for k in FIGURES}} for d in data]


def ask(tab: Any, text: str, replies: int) -> None:
    tab.locator("#message").fill(text)
    tab.locator("#message").press("Enter")  # the keyboard sends
    playwright_api.expect(tab.locator("#log wattgate-badge")).to_have_count(replies, timeout=20_000)


def test_each_reply_streams_in_with_a_badge_that_settles_to_its_record(demo, page, artifacts):
    page.goto(f"{demo}/chat")
    playwright_api.expect(page.locator("#chat")).to_be_visible()
    page.evaluate("window.firstFigures = []; addEventListener('wattgate:reply', e => firstFigures.push(e.detail.energy))")
    hostile = "<img src=x onerror=alert(1)><b>not bold</b>"
    ask(page, hostile, 1)
    ask(page, "What is PUE?", 2)

    user = page.locator(".message.user .text")
    assert user.first.text_content() == hostile  # shown as text
    assert page.locator("#log img, #log b").count() == 0
    assert all(t.strip() for t in page.locator(".message.assistant .text").all_text_contents())  # streamed in

    first = page.evaluate("firstFigures")
    assert [f["settled"] for f in first] == [False, False]  # provisional when the reply ended...
    playwright_api.expect(page.locator("wattgate-badge[data-settled=false]")).to_have_count(0, timeout=20_000)
    shown = badges(page)  # ...then settled, in place
    records = settled_records(demo, [b["requestId"] for b in shown])
    for b in shown:
        assert b["method"] == "simulated" and b["settled"] == "true"
        for k in FIGURES:
            assert b[k] == pytest.approx(records[b["requestId"]][k], rel=1e-12), k
    badge_text = page.locator("wattgate-badge .badge").first.text_content()  # (in its shadow root)
    assert "J" in badge_text and "gCO2e" in badge_text and "mL water" in badge_text and "simulated" in badge_text

    total = page.locator("#total")
    assert float(total.get_attribute("data-joules")) == pytest.approx(sum(b["joules"] for b in shown), rel=1e-9)
    text = page.locator("#total .total").text_content()
    assert "2 replies" in text and "smartphone charge" in text and "1000 W microwave" in text
    playwright_api.expect(page.locator("#model option").first).to_contain_text("J per 1,000 tokens")
    screenshot(page, "chat-page", artifacts)

    page.locator("#new").click()
    playwright_api.expect(page.locator("#log .message")).to_have_count(0)
    assert total.get_attribute("data-joules") == "0"


def test_a_reply_stopped_midway_still_shows_what_it_used(demo, page):
    page.goto(f"{demo}/chat")
    playwright_api.expect(page.locator("#chat")).to_be_visible()
    page.locator("#message").fill("Tell me a long story.")
    page.locator("#send").click()
    playwright_api.expect(page.locator(".message.assistant .text")).not_to_have_text("")  # streaming
    page.locator("#stop").click()
    playwright_api.expect(page.locator("#log wattgate-badge")).to_have_count(1, timeout=20_000)
    playwright_api.expect(page.locator("wattgate-badge .status")).to_have_text("stopped")
    playwright_api.expect(page.locator("wattgate-badge[data-settled=false]")).to_have_count(0, timeout=20_000)
    shown = badges(page)[0]
    record = settled_records(demo, [shown["requestId"]])[shown["requestId"]]
    assert record["status"] == "client_closed" and 0 < record["completion_tokens"] < 64
    assert shown["joules"] == pytest.approx(record["joules"], rel=1e-12)
    assert float(page.locator("#total").get_attribute("data-joules")) == pytest.approx(record["joules"], rel=1e-12)


@pytest.mark.parametrize("scale", [1e-4, 0.03, 1.0, 47.0, 12_345.0])
def test_the_pages_equivalents_are_the_reports_word_for_word(demo, page, scale):
    from wattgate.proxy.equivalents import EQUIVALENTS, equivalent

    totals = {"wh": 0.0502 * scale, "gco2e": 0.0289 * scale, "water_ml": 0.273 * scale}
    page.goto(f"{demo}/chat")
    playwright_api.expect(page.locator("#chat")).to_be_visible()
    shown = page.evaluate("t => WattGate.equivalents.map(e => WattGate.equivalent(e, t))", totals)
    assert shown == [equivalent(e, totals) for e in EQUIVALENTS]


def test_the_page_fits_a_phone_and_every_control_has_a_label(demo, browser, artifacts):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    tab = context.new_page()
    tab.goto(f"{demo}/chat")
    playwright_api.expect(tab.locator("#chat")).to_be_visible()
    ask(tab, "hi", 1)
    assert tab.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the screen
    assert tab.evaluate("[...document.querySelectorAll('input, select, textarea')].every(e => e.labels.length)")
    assert tab.evaluate("[...document.querySelectorAll('button')].every(b => b.textContent.trim())")
    playwright_api.expect(tab.locator("wattgate-badge[data-settled=false]")).to_have_count(0, timeout=20_000)
    assert tab.evaluate(LOW_CONTRAST) == []
    screenshot(tab, "chat-page-phone", artifacts)
    context.close()


def test_the_newest_reply_and_the_composer_stay_in_view(demo, browser, artifacts):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.goto(f"{demo}/chat")
    playwright_api.expect(tab.locator("#chat")).to_be_visible()
    for n in range(1, 6):
        ask(tab, "Explain continuous batching in one paragraph.", n)
        tab.wait_for_timeout(100)  # the badge's own layout
        reply = tab.locator("#log .message.assistant").last.bounding_box()
        composer = tab.locator("#ask").bounding_box()
        assert reply is not None and composer is not None
        # Viewport coordinates: the composer inside the window, the reply's end above it.
        assert composer["y"] + composer["height"] <= 800 + 1, (n, composer)
        assert 0 <= reply["y"] + reply["height"] <= composer["y"] + 1, (n, reply, composer)
    assert tab.evaluate("document.scrollingElement.scrollTop") > 0  # five replies do not fit: it scrolled
    screenshot(tab, "chat-page-long-conversation", artifacts)
    context.close()


def test_with_keys_the_page_asks_for_one_and_shows_only_its_teams_figures(browser, page, tmp_path, monkeypatch):
    monkeypatch.setenv("WG_BROWSER_KEYS", "team-a:sk-a,team-b:sk-b")
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=16)) as up:
        settings = Settings(
            meter=MeterSettings(source="simulated", settle_lag_ms=200),
            ledger=LedgerSettings(path=tmp_path / "ledger.db"),
            gateway=GatewaySettings(auth=Auth(keys_env="WG_BROWSER_KEYS")),
            models={MODEL: Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])},
        )
        with ServerThread(create_app(settings)) as gw:
            other = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": "Bearer sk-b"},
                               json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            settled_records(gw.url, [other.headers["x-request-id"]], key="sk-b")

            page.goto(f"{gw.url}/chat")
            playwright_api.expect(page.locator("#key-form")).to_be_visible()
            page.locator("#key").fill("sk-wrong")
            page.locator("#key").press("Enter")
            playwright_api.expect(page.locator("#error")).to_have_text("That key was refused.")
            playwright_api.expect(page.locator("#error")).to_be_visible()
            page.locator("#key").fill("sk-a")
            page.locator("#key").press("Enter")
            playwright_api.expect(page.locator("#chat")).to_be_visible()
            # team-b's settled reply is not team-a's to see
            playwright_api.expect(page.locator("#model-energy")).to_contain_text("No settled replies")
            assert page.evaluate("sessionStorage.getItem('wattgate-key')") == "sk-a"
            assert page.evaluate("localStorage.length") == 0
            ask(page, "hi", 1)
            playwright_api.expect(page.locator("#model-energy")).to_contain_text("over 1 settled reply", timeout=20_000)
            mine = badges(page)[0]
            assert mine["requestId"] != other.headers["x-request-id"]
            page.locator("#forget-key").click()
            playwright_api.expect(page.locator("#key-form")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('wattgate-key')") is None


def test_the_widget_on_another_origin_shows_each_reply_and_the_total(demo, page, artifacts):
    with ServerThread(Starlette(routes=[Mount("/", StaticFiles(directory=APP, html=True))])) as other:
        page.goto(f"{other.url}/?gateway={demo}")
        playwright_api.expect(page.locator("body[data-done=true]")).to_have_count(1, timeout=20_000)
        playwright_api.expect(page.locator("wattgate-panel wattgate-badge")).to_have_count(2, timeout=20_000)
        playwright_api.expect(page.locator("wattgate-badge[data-settled=false]")).to_have_count(0, timeout=20_000)
        shown = badges(page)
        records = settled_records(demo, [b["requestId"] for b in shown])
        assert len(records) == 2
        for b in shown:
            for k in FIGURES:
                assert b[k] == pytest.approx(records[b["requestId"]][k], rel=1e-12), k
        total = page.locator("wattgate-total")
        assert float(total.get_attribute("data-joules")) == pytest.approx(sum(b["joules"] for b in shown), rel=1e-9)
        assert "2 replies" in page.locator("wattgate-total .total").text_content()
        screenshot(page, "widget-on-another-origin", artifacts)
