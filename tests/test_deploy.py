"""Deployment files against real parts: promtool, a real Prometheus scraping the gateway, the compose files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.conftest import SERVED
from wattgate.proxy.app import create_app
from wattgate.proxy.hub_link import HUB_READY_WAIT_S
from wattgate.proxy.registry_file import load_settings
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import Auth, GatewaySettings, MeterSettings, Model, Settings

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "wattgate.json"
needs_prometheus = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="Prometheus is not installed (Debian package 'prometheus'; .ci/run installs it)",
)


def dashboard_queries() -> list[str]:
    """The dashboard's queries as Grafana sends them with every gateway selected."""
    return [t["expr"].replace("$gateway", ".*") for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_every_dashboard_query_follows_the_gateway_variable():
    """A fleet's gateways are Prometheus instances: each series the dashboard reads is filtered by the
    gateway picker (all by default) and summed across the ones picked."""
    dashboard = json.loads(DASHBOARD.read_text())
    variable = dashboard["templating"]["list"][0]
    assert variable["name"] == "gateway" and variable["includeAll"] and variable["allValue"] == ".*"
    for p in dashboard["panels"]:
        for t in p["targets"]:
            names = re.findall(r"\bwattgate_[a-z_]+", t["expr"])
            assert names and t["expr"].count('{instance=~"$gateway"}') == len(names), t["expr"]


@needs_prometheus
def test_prometheus_config_passes_promtool():
    subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")], check=True)


@needs_prometheus
def test_exposition_passes_promtool_check_metrics(stack):
    text = httpx.get(f"{stack.url}/metrics").text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def keyed_gateway(stack, monkeypatch):
    """A gateway with keys on, in front of the stack's upstream: two teams and a scrape key."""
    monkeypatch.setenv("WG_DEPLOY_KEYS", "team-a:sk-a,team-b:sk-b,prometheus:sk-scrape")
    settings = Settings(
        meter=MeterSettings(source="simulated", settle_lag_ms=200),
        gateway=GatewaySettings(auth=Auth(keys_env="WG_DEPLOY_KEYS", metrics_aliases=["prometheus"])),
        models={"llama": Model(served_name=SERVED, upstream=f"{stack.upstream_url}/v1", gpus=[0])},
    )
    with ServerThread(create_app(settings)) as gw:
        yield gw.url


@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_real_prometheus(keyed_gateway, tmp_path):
    """Gateway keys on: Prometheus scrapes with its own key, as deploy/prometheus/prometheus.yml shows."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = keyed_gateway.removeprefix("http://")
    (tmp_path / "scrape-key").write_text("sk-scrape\n")
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n  - job_name: wattgate\n"
        f"    authorization: {{credentials_file: {tmp_path / 'scrape-key'}}}\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    stop = threading.Event()

    def traffic() -> None:
        body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        while not stop.is_set():
            httpx.post(f"{keyed_gateway}/v1/chat/completions", json=body, timeout=10,
                       headers={"authorization": "Bearer sk-a"})

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        for w in workers:
            w.start()
        missing: list[str] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            time.sleep(2)
            missing = []
            for q in dashboard_queries():
                try:
                    r = httpx.get(api, params={"query": q}, timeout=5).json()
                except httpx.HTTPError:
                    missing.append(q)
                    continue
                assert r["status"] == "success", (q, r)
                if not r["data"]["result"]:
                    missing.append(q)
            if not missing:
                break
        assert not missing, f"queries with no data: {missing}"
        # The scrape holds every metric the README lists.
        names = httpx.get(api, params={"query": 'count by (__name__) ({__name__=~"wattgate_.*"})'}).json()
        scraped = {r["metric"]["__name__"] for r in names["data"]["result"]}
        expected = {
            "wattgate_requests_total", "wattgate_tokens_total", "wattgate_request_energy_joules_bucket",
            "wattgate_energy_per_token_joules_bucket", "wattgate_carbon_grams_total", "wattgate_water_liters_total",
            "wattgate_gpu_power_watts", "wattgate_gpu_energy_joules_total", "wattgate_gpu_idle_energy_joules_total",
            "wattgate_gpu_unattributed_energy_joules_total", "wattgate_upstream_latency_seconds_bucket",
            "wattgate_meter_errors_total", "wattgate_team_energy_joules_total",
        }
        assert expected <= scraped, expected - scraped
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=15)
        prom.terminate()
        prom.wait(timeout=10)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.demo.yml"])
def test_compose_file_is_consistent(name):
    """A schema-level check (no Docker engine here): services are complete and every file they mount exists."""
    compose = yaml.safe_load((ROOT / name).read_text())
    services = compose["services"]
    assert {"wattgate", "prometheus", "grafana"} <= set(services)
    for svc_name, svc in services.items():
        assert "image" in svc or "build" in svc, svc_name
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{svc_name} mounts missing {source}"
                if target == "/etc/wattgate/models_registry.yaml":
                    settings = load_settings(ROOT / source)
                    assert settings.models
                    if settings.ledger.url:  # the shared ledger is a service of the same file
                        assert urlsplit(settings.ledger.url).hostname in services
                        assert settings.ledger.password_env in svc.get("environment", {})
    assert services["wattgate"]["ports"] == ["8080:8080"]


K8S = ROOT / "deploy" / "k8s" / "wattgate.yaml"
K8S_FLEET = ROOT / "deploy" / "k8s" / "wattgate-fleet.yaml"


def k8s_objects(path: Path = K8S) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


@pytest.mark.parametrize("path", [K8S, K8S_FLEET], ids=lambda p: p.name)
def test_k8s_manifests_pass_the_kubernetes_schemas(path):
    import kubernetes_validate

    for obj in k8s_objects(path).values():
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_the_fleet_manifest_shares_one_ledger_and_one_set_of_keys(tmp_path):
    """Every replica's registry names the same PostgreSQL ledger, and its password and the gateway keys
    come from one Secret that holds them; no volume of its own; the Service reaches every replica."""
    objs = k8s_objects(K8S_FLEET)
    pod = objs["Deployment"]["spec"]["template"]
    gw = {c["name"]: c for c in pod["spec"]["containers"]}["wattgate"]
    (tmp_path / "models_registry.yaml").write_text(objs["ConfigMap"]["data"]["models_registry.yaml"])
    settings = load_settings(tmp_path / "models_registry.yaml")
    assert settings.ledger.url and settings.ledger.url.startswith("postgresql://") and settings.gateway.id is None
    secret = objs["Secret"]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gw["env"] if "valueFrom" in e}
    for variable in (settings.ledger.password_env, settings.gateway.auth.keys_env):
        ref = from_secret[variable]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    keys = dict(item.split(":")[::-1] for item in secret["stringData"]["gateway-keys"].split(","))
    assert set(settings.gateway.auth.metrics_aliases) <= set(keys.values())
    assert "PersistentVolumeClaim" not in objs and all("persistentVolumeClaim" not in v for v in pod["spec"]["volumes"])
    assert objs["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert objs["Deployment"]["spec"]["replicas"] > 1


def test_prometheus_finds_every_gateway_of_the_fleet():
    """deploy/prometheus/fleet.yml keeps the fleet's pods by their label and port and names each target by
    its pod, with the scrape key from a file. (Structural: Debian's promtool is built without Kubernetes
    discovery, so it cannot check this file.)"""
    job = yaml.safe_load((ROOT / "deploy/prometheus/fleet.yml").read_text())["scrape_configs"][0]
    pod = k8s_objects(K8S_FLEET)["Deployment"]["spec"]["template"]
    gw = {c["name"]: c for c in pod["spec"]["containers"]}["wattgate"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == pod["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep["__meta_kubernetes_pod_container_port_name"] == gw["ports"][0]["name"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}] and "credentials_file" in job["authorization"]


def test_k8s_manifests_are_consistent(tmp_path):
    """The pod, its registry and its service fit together: paths, ports, probes, labels."""
    objs = k8s_objects()
    pod = objs["Deployment"]["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    gw, vllm = containers["wattgate"], containers["vllm"]
    mounts = {m["name"]: m["mountPath"] for m in gw["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    config = gw["args"][gw["args"].index("--config") + 1]
    registry_dir, registry_file = config.rsplit("/", 1)
    assert mounts["registry"] == registry_dir and volumes["registry"]["configMap"]["name"] == "wattgate-registry"
    (tmp_path / registry_file).write_text(objs["ConfigMap"]["data"][registry_file])
    settings = load_settings(tmp_path / registry_file)
    vllm_port = vllm["args"][vllm["args"].index("--port") + 1]
    assert all(m.base_url == f"http://127.0.0.1:{vllm_port}/v1" for m in settings.models.values())
    assert str(settings.ledger.path).startswith(mounts["ledger"] + "/")
    assert volumes["ledger"]["persistentVolumeClaim"]["claimName"] == objs["PersistentVolumeClaim"]["metadata"]["name"]

    port = gw["args"][gw["args"].index("--port") + 1]
    assert [p["containerPort"] for p in gw["ports"]] == [int(port)]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz" and gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /readyz answers within HUB_READY_WAIT_S whatever the upstreams and the hub do: the probe allows more.
    assert gw["readinessProbe"]["timeoutSeconds"] > HUB_READY_WAIT_S
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == port
    service = objs["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == gw["ports"][0]["name"]
    env = {e["name"]: e.get("value") for e in gw["env"]}
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility" and "nvidia.com/gpu" not in gw.get("resources", {}).get("limits", {})
