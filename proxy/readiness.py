"""``/readyz`` and the start-up check of the upstreams: which answer ``/models``, asked all at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import JSONResponse, Response

from wattgate.proxy.exchange import upstream_name
from wattgate.proxy.gateway_state import GatewayState
from wattgate.proxy.settings import Model
from wattgate.proxy.upstream import ERRORS as UPSTREAM_ERRORS

log = logging.getLogger("wattgate")

READY_PROBE_S = 0.5  # each upstream's /models must answer within this: /readyz answers within a probe's 1 s


async def _upstream_answers(gw: GatewayState, model: Model) -> bool:
    try:
        status, _ = await gw.client.get(f"{model.base_url}/models", gw.upstream_headers(model, "readyz"), READY_PROBE_S)
        return status < 500
    except UPSTREAM_ERRORS:
        return False


async def warn_unreachable(gw: GatewayState) -> None:
    """At start-up, one warning per upstream that does not answer: a wrong port shows now, not at the first call."""
    for name, up in (await ask_upstreams(gw)).items():
        if not up:
            log.warning("model %s: its upstream %s does not answer /models yet; its calls get 502 until it does",
                        name, upstream_name(gw.settings.models[name]))


async def ask_upstreams(gw: GatewayState) -> dict[str, bool]:
    """Whether each model's upstream answers ``/models``, all asked at once."""
    models = gw.settings.models
    return dict(zip(models, await asyncio.gather(*(_upstream_answers(gw, m) for m in models.values())), strict=True))


def ready_response(gw: GatewayState, upstreams: dict[str, bool], meter_state: dict[str, Any],
                   more: dict[str, Any]) -> Response:
    """``/readyz``: ready when every upstream but the optional ones answers; the meter's state is
    reported, not required (a meter fault never fails a request: figures fall back to estimates)."""
    models = gw.settings.models
    ready = all(up or models[name].readiness == "optional" for name, up in upstreams.items())
    body = {"ready": ready, "upstreams": upstreams, "meter": meter_state, **more}
    return JSONResponse(body, status_code=200 if ready else 503)
