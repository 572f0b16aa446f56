"""The registry file: the shipped example loads; a wrong file is refused with line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from wattgate.meter.sources.nvml import NvmlSource
from wattgate.meter.sources.simulated import SimulatedSource
from wattgate.proxy.keys import load_keys
from wattgate.proxy.metering import build_meter, site_factors
from wattgate.proxy.registry_file import load_settings, parse_settings
from wattgate.proxy.settings import Auth, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_example_registry_loads():
    s = load_settings(ROOT / "models_registry.yaml")
    assert s.models and s.metered_gpus == [0, 1, 2]
    # Each GPU serves one model: two models on one GPU would share its energy only through the meter's heads.
    gpus = [g for m in s.models.values() for g in m.gpus]
    assert len(gpus) == len(set(gpus))
    assert site_factors(s).location.g_per_kwh > 0


def test_wrong_file_names_line_field_and_reason():
    text = "site:\n  pue: 0.5\nmodels:\n  a:\n    upstream: http://x:8000/v1\n    gpu: [0]\n"
    with pytest.raises(ConfigError) as exc:
        parse_settings(text, "r.yaml")
    msg = str(exc.value)
    assert "r.yaml:line 2: site.pue" in msg and "greater than or equal to 1" in msg
    assert "r.yaml:line 6: models.a.gpu: Extra inputs are not permitted" in msg


def test_not_yaml_and_not_a_mapping():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_settings("models: [", "r.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        parse_settings("- 1", "r.yaml")


def test_unknown_grid_zone_suggests_close_names():
    s = parse_settings("site: {grid_zone: FRX}\nmodels: {a: {upstream: 'http://x/v1'}}\n")
    with pytest.raises(ConfigError, match="FRA"):
        site_factors(s)


def test_gateway_keys(monkeypatch):
    monkeypatch.setenv("WG_KEYS", "team-a:sk-1, team-b:sk-2")
    assert load_keys(Auth(keys_env="WG_KEYS")) == {"sk-1": "team-a", "sk-2": "team-b"}
    monkeypatch.setenv("WG_KEYS", "no-colon-secret")
    with pytest.raises(ConfigError) as exc:
        load_keys(Auth(keys_env="WG_KEYS"))
    assert "no-colon-secret" not in str(exc.value)


@pytest.mark.parametrize("value", [None, "", " , \n# only a comment"])
def test_gateway_keys_fail_closed_when_the_variable_holds_none(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("WG_KEYS", raising=False)
    else:
        monkeypatch.setenv("WG_KEYS", value)
    with pytest.raises(ConfigError, match=r"\$WG_KEYS holds no key"):
        load_keys(Auth(keys_env="WG_KEYS", metrics_aliases=["prometheus"]))  # the cause, not the alias


def test_gateway_keys_fail_closed_on_an_empty_file_and_a_key_of_two_aliases(tmp_path, monkeypatch):
    empty = tmp_path / "keys"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"file {empty} holds no key"):
        load_keys(Auth(keys_file=empty))
    monkeypatch.setenv("WG_KEYS", "team-a:sk-same, team-b:sk-same")
    with pytest.raises(ConfigError, match="given to two aliases, 'team-a' and 'team-b'") as exc:
        load_keys(Auth(keys_env="WG_KEYS"))
    assert "sk-same" not in str(exc.value)
    monkeypatch.setenv("WG_KEYS", "team-a:sk-1, team-a:sk-2")  # one team, two keys (rotation): fine
    assert load_keys(Auth(keys_env="WG_KEYS")) == {"sk-1": "team-a", "sk-2": "team-a"}


def test_gateway_auth_is_off_only_when_left_out(monkeypatch):
    assert load_keys(parse_settings("models: {a: {upstream: 'http://x/v1'}}\n").gateway.auth) == {}
    with pytest.raises(ConfigError, match=r"r.yaml:line 1: gateway.auth: .*name keys_env or keys_file"):
        parse_settings("gateway: {auth: {metrics_aliases: [prometheus]}}\nmodels: {a: {upstream: 'http://x/v1'}}\n",
                       "r.yaml")
    monkeypatch.setenv("WG_KEYS", "team-a:sk-1")
    with pytest.raises(ConfigError, match=r"no key in \$WG_KEYS has the alias prometheus"):
        load_keys(Auth(keys_env="WG_KEYS", metrics_aliases=["prometheus"]))


def test_the_registry_reference_is_valid():
    text = (ROOT / "docs" / "configuration.md").read_text()
    start = text.index("```yaml") + len("```yaml")
    s = parse_settings(text[start : text.index("```", start)], "docs/configuration.md")
    assert set(s.models) == {"llama-3.1-8b", "gpt-4o-mini"}


def test_power_lag_auto_is_the_sources_own_and_a_number_overrides_it():
    models = "models: {a: {upstream: 'http://x/v1', gpus: [0]}}\n"
    auto, _ = build_meter(parse_settings(f"meter: {{source: simulated}}\n{models}"))
    told, _ = build_meter(parse_settings(f"meter: {{source: simulated, power_lag_ms: 80}}\n{models}"))
    assert auto.sampler is not None and auto.sampler.power_lag_s == SimulatedSource.power_lag_s == 0.0
    assert told.sampler is not None and told.sampler.power_lag_s == 0.08
    assert (auto.state()["power_lag_ms"], told.state()["power_lag_ms"]) == (0.0, 80.0)  # /readyz says which
    assert NvmlSource.power_lag_s == 0.06  # measured on H100 and H200 (bench/RESULTS.md, issue 19)
    for bad in ("'60ms'", "2000", "true"):
        with pytest.raises(ConfigError, match="power_lag_ms.*'auto' or a number of milliseconds"):
            parse_settings(f"meter: {{power_lag_ms: {bad}}}\n{models}", "r.yaml")
