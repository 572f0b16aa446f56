"""Every Prometheus metric of the gateway, defined once (the README lists them)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from wattgate.meter import Fault, Meter, Method, Status

# Label sets, from the meter's own words: every series of a known label exists from start-up.
STATUSES = tuple(Status)
METER_ERROR_KINDS = Fault.errors()
METHODS = Method.published()
# Joules per request: from a few tokens at high batch (~0.1 J) to long answers on big models.
ENERGY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
PER_TOKEN_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
TEAM_PREFIX = "wattgate_team_"  # the per-team series, labelled by team alias


class Metrics:
    """The gateway's metrics in their own registry; series of known labels start at zero."""

    def __init__(self, models: Iterable[str], meter: Meter, teams: Iterable[str] = (),
                 grid_source: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wattgate_requests", "Requests by model and status", ["model", "status"], registry=r)
        self.tokens = Counter("wattgate_tokens", "Tokens by model and kind", ["model", "kind"], registry=r)
        self.energy = Histogram(
            "wattgate_request_energy_joules",
            "Settled energy per request (J); _sum is the attributed total",
            ["model", "method"],
            buckets=ENERGY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "wattgate_energy_per_token_joules",
            "Settled energy per completion token (J)",
            ["model"],
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.carbon = Counter("wattgate_carbon_grams", "Settled grams CO2e", ["model"], registry=r)
        self.water = Counter("wattgate_water_liters", "Settled litres of water", ["model"], registry=r)
        self.latency = Histogram(
            "wattgate_upstream_latency_seconds",
            "Time from forwarding to the upstream's last byte",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.meter_errors = Counter("wattgate_meter_errors", "Meter faults by kind", ["kind"], registry=r)
        # One process relays every stream (its meter must see them all): this says when its core is too busy.
        self.loop_lag = Histogram(
            "wattgate_event_loop_lag_seconds",
            "How late the gateway's event loop ran a timer that was due (saturation)",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.ledger_dropped = Counter(
            "wattgate_ledger_dropped_records", "Settled records not stored (ledger queue full or write failed)", registry=r
        )
        for model in models:
            for status in STATUSES:
                self.requests.labels(model, status)
            for kind in ("prompt", "completion"):
                self.tokens.labels(model, kind)
            for method in METHODS:
                self.energy.labels(model, method)
            self.per_token.labels(model)
            self.carbon.labels(model)
            self.water.labels(model)
            self.latency.labels(model)
        # Per-team accounting: labelled by the configured key aliases only, never by a key.
        self.team_energy = Counter("wattgate_team_energy_joules", "Settled energy by team (J)", ["team"], registry=r)
        self.team_carbon = Counter("wattgate_team_carbon_grams", "Settled grams CO2e by team", ["team"], registry=r)
        self.team_water = Counter("wattgate_team_water_liters", "Settled litres of water by team", ["team"], registry=r)
        for team in teams:
            for counter in (self.team_energy, self.team_carbon, self.team_water):
                counter.labels(team)
        for kind in METER_ERROR_KINDS:
            self.meter_errors.labels(kind)
        # A live grid provider's failed polls (its zone's annual average stands in meanwhile).
        self.grid_errors = Counter("wattgate_grid_errors", "Failed polls of the grid-intensity provider",
                                   ["source"], registry=r)
        if grid_source is not None:
            self.grid_errors.labels(grid_source)
        r.register(_GpuCollector(meter))

    def count_meter_error(self, kind: str) -> None:
        self.meter_errors.labels(kind).inc()

    def count_grid_error(self, source: str) -> None:
        self.grid_errors.labels(source).inc()

    def count_dropped(self, n: int = 1) -> None:
        """Settled records not stored (given up by the ledger, or lost by a worker while the hub was away)."""
        self.ledger_dropped.inc(n)

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def count_call(self, model: str, status: Status, prompt_tokens: int, completion_tokens: int,
                   latency_s: float) -> None:
        """An ended call of registry model ``model``."""
        self.requests.labels(model, status).inc()
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion_tokens)
        self.latency.labels(model).observe(latency_s)

    def count_settled(self, model: str, team: str | None, method: Method, joules: float, completion_tokens: int,
                      gco2e: float, water_ml: float) -> None:
        """A settled figure: its energy, carbon and water, by model and by team. Sources other than NVML
        and estimates (a trace in tests, a benchmark's) count with the simulated figures: not measurements."""
        published = method if method in (Method.NVML, Method.ESTIMATE) else Method.SIMULATED
        self.energy.labels(model, published).observe(joules)
        if completion_tokens:
            self.per_token.labels(model).observe(joules / completion_tokens)
        self.carbon.labels(model).inc(gco2e)
        self.water.labels(model).inc(water_ml / 1000)
        if team is not None:
            self.team_energy.labels(team).inc(joules)
            self.team_carbon.labels(team).inc(gco2e)
            self.team_water.labels(team).inc(water_ml / 1000)


class TeamView:
    """A registry as one team sees it: the per-team series of other teams left out."""

    def __init__(self, registry: CollectorRegistry, team: str) -> None:
        self.registry = registry
        self.team = team

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():  # fresh objects on every collect: safe to filter
            if family.name.startswith(TEAM_PREFIX):
                family.samples = [s for s in family.samples if s.labels.get("team") == self.team]
            yield family


class _GpuCollector:
    """Per-GPU power and energy, read from the meter at scrape time."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def describe(self) -> list:
        return []

    def collect(self):  # type: ignore[no-untyped-def]
        power = GaugeMetricFamily("wattgate_gpu_power_watts", "Latest GPU power (W)", labels=["gpu"])
        measured = CounterMetricFamily("wattgate_gpu_energy_joules", "Measured GPU energy (J)", labels=["gpu"])
        idle = CounterMetricFamily(
            "wattgate_gpu_idle_energy_joules", "GPU energy with no gateway request active (J)", labels=["gpu"]
        )
        unattributed = CounterMetricFamily(
            "wattgate_gpu_unattributed_energy_joules",
            "GPU energy of work that did not come through the gateway (J)",
            labels=["gpu"],
        )
        for gpu, t in self.meter.gpu_totals().items():
            label = [str(gpu)]
            power.add_metric(label, t.power_w or 0.0)
            measured.add_metric(label, t.measured)
            idle.add_metric(label, t.idle)
            unattributed.add_metric(label, t.unattributed)
        yield from (power, measured, idle, unattributed)
