"""The registry (``models_registry.yaml``) as pydantic models: unknown keys are errors. Reading the
file, with each error's line: :mod:`proxy.registry_file`; the gateway's keys: :mod:`proxy.keys`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from wattgate.meter.footprint import Embodied


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridProviderSettings(_Strict):
    """A live, location-based grid intensity (``static``: the zone's annual average from CodeCarbon)."""

    source: Literal["static", "electricitymaps", "watttime"] = "static"
    # The provider's own name of the grid: an Electricity Maps zone ("FR", "US-CAL-CISO") or a WattTime region
    # ("CAISO_NORTH").
    zone: str | None = None
    api_key_env: str | None = "ELECTRICITYMAPS_API_KEY"  # electricitymaps: the variable holding its auth-token
    username_env: str = "WATTTIME_USER"  # watttime: the variables holding its login (as WattTime's own SDK reads)
    password_env: str = "WATTTIME_PASSWORD"
    base_url: str | None = None  # the provider's API, when not its public one
    poll_s: float = Field(default=300.0, ge=1)
    # A figure older than this (by its own time) is not used: the zone's annual average stands in, saying so.
    max_age_s: float = Field(default=7200.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _zone(self) -> GridProviderSettings:
        if self.source != "static" and not self.zone:
            raise ValueError(f"grid_provider.zone is required for source {self.source!r}")
        return self


_ECOLOGITS = Embodied()


class HardwareSettings(_Strict):
    """Embodied (manufacturing) emissions of the GPUs and their servers; defaults: EcoLogits 0.11's."""

    gpu_embodied_kgco2e: float = Field(default=_ECOLOGITS.gpu_kgco2e, ge=0)
    server_embodied_kgco2e: float = Field(default=_ECOLOGITS.server_kgco2e, ge=0)  # the server without its GPUs
    gpus_per_server: int = Field(default=_ECOLOGITS.gpus_per_server, ge=1)
    lifetime_years: float = Field(default=_ECOLOGITS.lifetime_s / (365 * 86400), gt=0)

    def embodied(self) -> Embodied:
        return Embodied(self.gpu_embodied_kgco2e, self.server_embodied_kgco2e, self.gpus_per_server,
                        self.lifetime_years * 365 * 86400)


class Site(_Strict):
    """Where the GPUs are. Defaults and sources: docs/factors.md, "Factors"."""

    # CodeCarbon zone key: ISO-3 country (FRA, USA) or provider:region (gcp:europe-west1).
    grid_zone: str = "USA"
    # The site's own figure (a PPA, a supplier's mix), gCO2e/kWh: market-based, used for gco2e when set;
    # the location-based figure (the zone's, or grid_provider's) is reported beside it.
    grid_intensity_g_per_kwh: float | None = Field(default=None, ge=0)
    grid_provider: GridProviderSettings = GridProviderSettings()
    hardware: HardwareSettings = HardwareSettings()
    # Uptime Institute, Global Data Center Survey 2024: industry average PUE 1.56.
    pue: float = Field(default=1.56, ge=1.0, le=5.0)
    # Li et al. 2023, "Making AI Less Thirsty": on-site WUE 0.55 L/kWh.
    wue_site_l_per_kwh: float = Field(default=0.55, ge=0)
    # Li et al. 2023: 3.142 L/kWh consumed generating U.S. electricity.
    water_grid_l_per_kwh: float = Field(default=3.142, ge=0)


class HostSettings(_Strict):
    """Host energy (CPU, DRAM, NIC) added as a separate component."""

    source: Literal["none", "fixed", "rapl"] = "none"
    watts_per_gpu: float = Field(default=0.0, ge=0)  # for ``fixed``: host power per GPU


class MeterSettings(_Strict):
    source: Literal["nvml", "simulated", "none"] = "nvml"
    interval_ms: int = Field(default=50, ge=5, le=10_000)
    idle: Literal["exclude", "amortize"] = "exclude"
    # With idle: exclude, the SCI's with_idle tier spreads each GPU's idle energy over this many hours'
    # attributed energy (a trailing period), so a quiet night is shared by the day's requests.
    idle_period_h: float = Field(default=24.0, gt=0, le=24 * 366)
    # Energy-counter reads; power is read every interval and places the energy in between.
    # "auto": as often as counter_cpu_budget allows, from the measured cost of a read (milliseconds of
    # CPU on NVML: bench/RESULTS.md); a number of ms: that often; 0: every interval.
    counter_interval_ms: Literal["auto"] | int = "auto"
    # Share of one CPU core that counter reads may use, all GPUs together, for "auto".
    counter_cpu_budget: float = Field(default=0.004, gt=0, le=1)
    # How late the GPU's instantaneous power reports a change of load, relative to the energy
    # counter: power readings are placed that much earlier when they place the counter's energy.
    # "auto": the source's own (NVML: 60 ms, measured on H100 and H200; simulated: 0); a number of
    # ms measured on your GPUs with `python -m bench.sensor_lag`.
    power_lag_ms: Literal["auto"] | int = "auto"
    # How long attribution waits for a request's next token before splitting without it (the
    # request then works at the rate of those decoding beside it). Non-stream requests report their tokens only at
    # the end, so this bounds how long a plain request can run and still be split by its work.
    settle_lag_ms: int = Field(default=10_000, ge=0, le=600_000)
    # Poll vLLM's /metrics for requests that bypass the gateway (their energy is unattributed); 0 = off.
    foreign_poll_ms: int = Field(default=1000, ge=0, le=60_000)
    # A GPU without a fresh reading this long is faulted; its requests fall back to estimates.
    stale_after_ms: int = Field(default=2000, ge=100, le=600_000)
    # A GPU in MIG mode has no per-instance power: "estimate" its requests, or meter the
    # "whole_gpu" when every MIG instance of it serves through this gateway.
    mig: Literal["estimate", "whole_gpu"] = "estimate"
    host: HostSettings = HostSettings()

    @field_validator("counter_interval_ms", mode="before")
    @classmethod
    def _counter_interval(cls, v: object) -> object:
        return _auto_or_ms(v, 0, 60_000)

    @field_validator("power_lag_ms", mode="before")
    @classmethod
    def _power_lag(cls, v: object) -> object:
        return _auto_or_ms(v, -1000, 1000)


def _auto_or_ms(v: object, low: int, high: int) -> object:
    """``v`` if it is "auto" or a whole number of milliseconds from ``low`` to ``high``."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and low <= v <= high):
        return v
    raise ValueError(f"must be 'auto' or a number of milliseconds from {low} to {high}")


class EstimateSettings(_Strict):
    active_params_b: float = Field(default=8.0, gt=0)


class Model(_Strict):
    served_name: str | None = None  # the name the upstream knows; default: the registry name
    upstream: HttpUrl
    gpus: list[int] = Field(default_factory=list)
    api_key_env: str | None = None
    # Energy of one prompt token relative to one decoded token (see docs/factors.md).
    prefill_weight: float = Field(default=0.2, ge=0, le=10)
    estimate: EstimateSettings = EstimateSettings()
    # optional: /readyz reports this upstream but stays ready without it (a remote API beside a local
    # vLLM must not take the vLLM pod out of its Service)
    readiness: Literal["required", "optional"] = "required"

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: list[int]) -> list[int]:
        if any(g < 0 for g in v) or len(set(v)) != len(v):
            raise ValueError("GPU indices must be distinct and >= 0")
        return v

    @property
    def base_url(self) -> str:
        return str(self.upstream).rstrip("/")


class Timeouts(_Strict):
    connect_s: float = Field(default=5.0, gt=0)
    # Longest wait for the upstream's next byte (first token included) before 504.
    read_s: float = Field(default=300.0, gt=0)
    # Longest a pooled upstream connection waits idle for its next request. Below vLLM's (and uvicorn's)
    # 5 s keep-alive, so the gateway lets a connection go before the server closes it: a request sent on
    # one the server is closing fails with no answer, and aiohttp's 15 s default left that race open.
    keepalive_s: float = Field(default=4.0, gt=0)


class Auth(_Strict):
    """Gateway keys: ``alias:key`` pairs, comma- or newline-separated. Auth is on once a source is
    named, and then fails closed (:func:`load_keys`); without ``gateway.auth`` it is off."""

    keys_env: str | None = None
    keys_file: Path | None = None
    # Aliases whose keys read every team's series on /metrics (a Prometheus scrape key); any other
    # key sees its own team's only. Without keys, /metrics is open, as vLLM's is.
    metrics_aliases: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sources(self) -> Auth:
        if not self.keys_env and not self.keys_file:
            raise ValueError("name keys_env or keys_file (or remove gateway.auth to run without keys)")
        return self


class HttpLimits(_Strict):
    """What a request may take at the HTTP layer before the gateway reads it (docs/api.md, "Routes, errors and limits")."""

    # Request line and headers together. An OpenAI SDK's request sends about 0.5 KiB; nginx reads up
    # to 4 x 8 KiB, Node.js 16 KiB; 64 KiB leaves room for large cookies and tracing headers.
    max_head_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Longest time a request's head may take to arrive (nginx's client_header_timeout is 60 s;
    # clients send a head in one write).
    head_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    # Longest silence while a body arrives (a slow upload that keeps sending is not cut): 408 after it.
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Requests whose head or body is still arriving, per process: beyond this a connection gets 503.
    max_incomplete_requests: int = Field(default=1000, ge=1)


class GatewaySettings(_Strict):
    # Names this gateway in the records it writes (a fleet's gateways share one ledger): default, the
    # host's name and the port it serves (``wattgate serve``), or the host's name alone.
    id: str | None = Field(default=None, min_length=1, max_length=200)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    limits: HttpLimits = HttpLimits()
    timeouts: Timeouts = Timeouts()
    auth: Auth | None = None  # None: no gateway keys (say so by leaving it out)
    max_connections: int = Field(default=1000, ge=1)
    # The figures also as flat keys in `usage` (plain bodies and the last stream chunk, which then
    # carries usage even when the client did not ask); false for a client that chokes on them.
    energy_in_usage: bool = True
    # Settled records kept in memory for GET /v1/energy/{id} (unsettled ones are always kept); with
    # the ledger on, at most 1,000 of them (proxy.books.RECENT_WITH_LEDGER): the ledger answers for older ones.
    recent_records: int = Field(default=100_000, ge=100)
    # Browser origins allowed to call the API (CORS), as vLLM's server allows by default; [] = off.
    cors_allow_origins: list[str] = Field(default_factory=lambda: ["*"])
    # GET /chat (the per-chat energy page) and GET /widget.js (the drop-in badge for other front ends):
    # static files that call the API with the user's own key, so they open nothing the API does not.
    chat_page: bool = True


class LedgerSettings(_Strict):
    enabled: bool = True
    path: Path | None = None  # default: $WATTGATE_DATA_DIR/ledger.db
    # A PostgreSQL ledger that many gateways share (``postgresql://user@host:port/db``) instead of the file;
    # its password from the variable ``password_env`` names, or libpq's own PGPASSWORD / PGPASSFILE.
    url: str | None = None
    password_env: str | None = None
    queue_size: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _one_place(self) -> LedgerSettings:
        if self.url is not None:
            if self.path is not None:
                raise ValueError("give ledger.path (a file) or ledger.url (PostgreSQL), not both")
            if not self.url.startswith(("postgresql://", "postgres://")):
                raise ValueError("ledger.url must be a postgresql:// URL")
            if ":" in self.url.split("://", 1)[1].split("@", 1)[0] and "@" in self.url:
                raise ValueError("ledger.url must not hold a password: name its variable in ledger.password_env")
        elif self.password_env is not None:
            raise ValueError("ledger.password_env is for ledger.url")
        return self


class Settings(_Strict):
    site: Site = Site()
    ledger: LedgerSettings = LedgerSettings()
    meter: MeterSettings = MeterSettings()
    gateway: GatewaySettings = GatewaySettings()
    models: dict[str, Model]

    @model_validator(mode="after")
    def _models(self) -> Settings:
        if not self.models:
            raise ValueError("at least one model is required")
        return self

    def served_name(self, name: str) -> str:
        return self.models[name].served_name or name

    def resolve(self, name: str) -> str | None:
        """The registry name a request's ``model`` means: a registry name, or the served name one
        model's upstream answers with (responses carry it, as vLLM writes it), else None."""
        if name in self.models:
            return name
        owners = [m for m, model in self.models.items() if model.served_name == name]
        return owners[0] if len(owners) == 1 else None

    @property
    def metered_gpus(self) -> list[int]:
        return sorted({g for m in self.models.values() for g in m.gpus})


def gateway_id(settings: Settings) -> str:
    """What names this gateway in its records: ``gateway.id``, else the host's name."""
    return settings.gateway.id or socket.gethostname()


def serving_on(settings: Settings, port: int | str) -> Settings:
    """``settings`` of a gateway serving ``port``: unless the registry names it, it is ``host:port``
    (several gateways on one node may share a ledger); ``port`` may be the whole id already."""
    if settings.gateway.id is not None:
        return settings
    name = port if isinstance(port, str) else f"{socket.gethostname()}:{port}"
    return settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"id": name})})


class ConfigError(ValueError):
    """The registry file is wrong; the message names the file, line, field and reason."""
