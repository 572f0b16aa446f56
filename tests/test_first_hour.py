"""What a new user meets in the first hour: the CLI's help and version, model names, upstream
failures that say where, registry mistakes that say what was meant, a demo that keeps its own ledger."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import SERVED, wait_until
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.cli import main
from wattgate.proxy.demo import demo_settings
from wattgate.proxy.ledger_file import data_dir
from wattgate.proxy.registry_file import parse_settings
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import ConfigError, LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_installed_distribution(capsys, flag):
    with pytest.raises(SystemExit) as done:
        main([flag])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("wattgate 0.")


def test_bare_wattgate_prints_its_help(capsys):
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_serve_help_says_what_each_option_is_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option, default in (("--config", "models_registry.yaml"), ("--host", "127.0.0.1"), ("--port", "8080")):
        assert option in out and f"(default: {default})" in " ".join(out.split()), option


def test_simulate_upstream_says_where_it_serves():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wattgate.proxy.cli", "simulate-upstream", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"http://127.0.0.1:{port}/v1" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def one_model():
    """A gateway serving one model, named `llama` in the registry and SERVED by its upstream."""
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as up:
        settings = Settings(meter=MeterSettings(source="simulated"), ledger=LedgerSettings(enabled=False),
                            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            yield gw.url


def test_the_model_name_a_response_carries_can_be_posted_back(one_model):
    first = httpx.post(f"{one_model}/v1/chat/completions", json={"model": "llama", **CHAT})
    assert first.status_code == 200 and first.json()["model"] == SERVED
    again = httpx.post(f"{one_model}/v1/chat/completions", json={"model": SERVED, **CHAT})
    assert again.status_code == 200 and again.json()["energy"]["joules"] >= 0


def test_an_unknown_model_gets_a_404_that_lists_the_models_served(one_model):
    r = httpx.post(f"{one_model}/v1/chat/completions", json={"model": "gpt-9", **CHAT})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "'gpt-9'" in error["message"] and "'llama'" in error["message"]


def test_a_served_name_two_models_share_is_not_guessed(stack):
    # The shared stack has `llama` and `remote` on the same served name: which one is meant is unknown.
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": SERVED, **CHAT})
    assert r.status_code == 404 and "'llama'" in r.json()["error"]["message"]


def test_an_upstream_that_is_down_is_named_in_the_502_and_in_the_log(stack, caplog):
    caplog.set_level(logging.WARNING)
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "down", **CHAT})
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "http://127.0.0.1:" in message and "/v1" in message and "'down'" in message and "unreachable" in message
    assert any(message in rec.getMessage() for rec in caplog.records)


def test_an_unset_upstream_key_variable_is_warned_about_at_start_up(caplog, monkeypatch):
    monkeypatch.delenv("WATTGATE_TEST_UNSET_KEY", raising=False)
    caplog.set_level(logging.WARNING)
    settings = Settings(meter=MeterSettings(source="none"), ledger=LedgerSettings(enabled=False),
                        models={"remote": Model(upstream="https://api.example.com/v1",
                                                api_key_env="WATTGATE_TEST_UNSET_KEY")})
    create_app(settings)
    assert any("$WATTGATE_TEST_UNSET_KEY is not set" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize(("text", "hint"), [
    ("site:\n  puee: 1.2\nmodels: {}\n", "site.puee: Extra inputs are not permitted (did you mean 'pue'?)"),
    ("models:\n  m:\n    upstrem: http://x/v1\n", "models.m.upstrem: Extra inputs are not permitted (did you mean 'upstream'?)"),
    ("gateway:\n  timeouts: {conect_s: 3}\nmodels: {}\n", "(did you mean 'connect_s'?)"),
])
def test_a_misspelt_registry_key_says_what_was_meant(text, hint):
    with pytest.raises(ConfigError) as err:
        parse_settings(text, "reg.yaml")
    assert hint in str(err.value)


def test_broken_yaml_names_the_file_not_a_string():
    with pytest.raises(ConfigError) as err:
        parse_settings("models:\n  m: [\n", "reg.yaml")
    assert 'in "reg.yaml", line 3' in str(err.value) and "<unicode string>" not in str(err.value)


def test_the_demo_keeps_its_own_ledger(monkeypatch, tmp_path):
    monkeypatch.setenv("WATTGATE_DATA_DIR", str(tmp_path))
    path = demo_settings("http://127.0.0.1:1").ledger.path
    assert path == data_dir() / "demo-ledger.db" and path != data_dir() / "ledger.db"


def test_the_demo_kept_serving_prints_the_chat_pages_url_and_serves_it():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wattgate.proxy.cli", "demo", "--keep-serving", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)  # a pipe, as `| tee` would be: block-buffered
    try:
        assert proc.stdout is not None
        url = f"http://127.0.0.1:{port}/chat"
        for line in proc.stdout:  # the demo's table first, then what to try
            if url in line:
                break
        else:
            raise AssertionError(f"the demo ended without printing {url}")
        page = httpx.get(url)
        assert page.status_code == 200 and "wattgate chat" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_auth_without_keys_in_one_line(tmp_path, monkeypatch, capsys, workers):
    registry = tmp_path / "r.yaml"
    registry.write_text("gateway: {auth: {keys_env: WG_UNSET_KEYS}}\nledger: {enabled: false}\n"
                        "models: {a: {upstream: 'http://127.0.0.1:9/v1'}}\n")
    monkeypatch.delenv("WG_UNSET_KEYS", raising=False)
    assert main(["serve", "--config", str(registry), "--port", "0", "--workers", workers]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wattgate: gateway.auth is on but $WG_UNSET_KEYS holds no key") and "\n" not in err


@pytest.mark.parametrize("readiness", ["required", "optional"])
def test_readiness_answers_within_a_second_and_an_optional_upstream_does_not_make_it_unready(readiness, caplog):
    """A remote API beside a local vLLM: its upstream hangs (it accepts and never answers). /readyz still
    answers within a Kubernetes probe's 1 s; ready only if that model's readiness is optional. Start-up
    warns of that upstream, naming it."""
    caplog.set_level(logging.WARNING)
    with socket.create_server(("127.0.0.1", 0)) as hanging, \
            ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as up:
        models = {"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0]),
                  "remote": Model(upstream=f"http://127.0.0.1:{hanging.getsockname()[1]}/v1", readiness=readiness)}
        settings = Settings(meter=MeterSettings(source="simulated"), ledger=LedgerSettings(enabled=False),
                            models=models)
        with ServerThread(create_app(settings)) as gw:
            start = time.monotonic()
            r = httpx.get(f"{gw.url}/readyz")
            took = time.monotonic() - start
            wait_until(lambda: any("model remote: its upstream http://127.0.0.1:" in rec.getMessage()
                                   for rec in caplog.records), what="the start-up warning")
    assert not any("model llama:" in rec.getMessage() for rec in caplog.records)
    assert took < 1.0, took
    assert r.json()["upstreams"] == {"llama": True, "remote": False}
    assert r.status_code == (200 if readiness == "optional" else 503)


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["simulate-upstream", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: False)" not in out and out.count("(default: an H100's)") == 1


def test_the_demo_on_a_busy_port_says_so_in_one_line(capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        assert main(["demo", "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wattgate: --port ") and "in use" in err and len(err.strip().splitlines()) == 1


def test_report_fits_80_columns_and_its_csv_has_no_python_reprs(tmp_path, monkeypatch):
    from wattgate.proxy.report import render

    row = {"model": "llama-3.1-8b", "requests": 69, "methods": "simulated 69", "completion_tokens": 4368,
           "wh": 0.3955, "gco2e": 0.2279, "gco2e_location": 0.2279, "embodied_gco2e": 0.0418, "water_ml": 2.156,
           "wh_per_1000_queries": 5.73, "joules_per_token": 0.326, "measured_share": 0.0,
           "sci": {"requests": 69, "sci_g_per_1000_requests": 4.33, "tiers_wh": {"facility": 0.69}}}
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    table = render([row], "model", "table")
    assert max(len(line) for line in table.splitlines()) <= 80 and "llama-3.1-8b" in table and "0.3955" in table
    csv_text = render([row], "model", "csv")
    assert "{" not in csv_text and "sci.tiers_wh.facility" in csv_text.splitlines()[0]


def test_the_registry_for_trying_serve_without_a_gpu_points_at_simulate_upstreams_default(capsys):
    """README: `wattgate simulate-upstream --port 8000` then `wattgate serve --config` this file."""
    from pathlib import Path

    from wattgate.proxy.registry_file import load_settings

    settings = load_settings(Path(__file__).parent.parent / "deploy" / "models_registry.simulated.yaml")
    assert settings.meter.source == "simulated"
    assert [m.base_url for m in settings.models.values()] == ["http://127.0.0.1:8000/v1"]
