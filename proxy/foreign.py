"""Detect work on the GPUs that did not come through the gateway, from vLLM's own metrics.

Somebody calling vLLM directly makes the GPU busier; without this, that energy
would be pinned on the gateway's requests. Every ``period_s`` the poller reads
``vllm:num_requests_running`` from each upstream's ``/metrics``, subtracts the
gateway's own requests in flight to that upstream, and reports the rest to the
meter as foreign sequences until the next poll. Upstreams without that metric
(remote APIs, other servers) are left alone after the first miss.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from wattgate.meter import Meter
from wattgate.proxy.settings import Model
from wattgate.proxy.upstream import ERRORS, UpstreamClient

log = logging.getLogger(__name__)
RUNNING = "vllm:num_requests_running"


def running_sequences(text: str, served_name: str) -> float | None:
    """Sequences vLLM reports running for ``served_name``; None when the metric is absent.

    A value that is not a count (NaN, infinite, negative) counts as none running.
    """
    found = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RUNNING and sample.labels.get("model_name", served_name) == served_name:
                usable = math.isfinite(sample.value) and sample.value > 0
                found = (found or 0.0) + (sample.value if usable else 0.0)
    return found


class ForeignLoadPoller:
    """Polls vLLM upstreams and reports foreign sequences to the meter."""

    def __init__(
        self,
        client: UpstreamClient,
        meter: Meter,
        models: dict[str, Model],
        served_name: Callable[[str], str],
        in_flight: Counter[str],
        period_s: float = 1.0,
    ) -> None:
        self.client = client
        self.meter = meter
        self.period_s = period_s
        self.in_flight = in_flight
        # One entry per upstream server that runs on metered GPUs.
        self.targets: dict[str, tuple[str, str, list[int]]] = {}
        for name, model in models.items():
            if model.gpus:
                root = model.base_url.removesuffix("/v1")
                self.targets.setdefault(root, (name, served_name(name), model.gpus))
        self.disabled: set[str] = set()

    async def poll_once(self) -> None:
        now = time.monotonic()
        for root, (name, served, gpus) in self.targets.items():
            if root in self.disabled:
                continue
            try:
                status, body = await self.client.get(f"{root}/metrics", timeout_s=min(self.period_s, 2.0))
                running = running_sequences(body.decode("utf-8", "replace"), served) if status == 200 else None
            except (*ERRORS, ValueError):
                continue  # a passing failure: try again next period
            if running is None:
                log.info("upstream %s has no %s: foreign load detection off for it", root, RUNNING)
                self.disabled.add(root)
                continue
            foreign = int(running) - self.in_flight[name]
            if foreign > 0:
                self.meter.report_foreign(gpus, foreign, now, now + self.period_s)

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # one bad poll must not end foreign-load detection for good
                log.exception("foreign-load poll failed")
            await asyncio.sleep(self.period_s)
