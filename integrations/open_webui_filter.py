"""
title: wattgate energy
author: wattgate
description: Each reply's energy, carbon and water, as measured by the wattgate gateway, in a line above the reply, followed until the figure is final, with the conversation's total.
version: 0.1.0
license: Apache-2.0
"""

# Open WebUI Filter function: paste this file on Admin Panel > Functions (+), enable it and make
# it global, or attach it to the models served through wattgate. It imports only what Open WebUI
# itself ships (aiohttp, pydantic), never wattgate: the two run in different environments.
#
# Where the figure comes from (wattgate puts it in all three; Open WebUI keeps what is in `usage`):
# - `usage`'s flat keys (energy_wh, gco2e, water_ml, energy_method, energy_settled,
#   energy_request_id) on a plain reply and on a stream's last chunk;
# - the `energy` object on a stream's last chunk (also when `gateway.energy_in_usage` is off);
# - `choices[].delta.provider_specific_fields.energy` on the finish chunk, the one place LiteLLM's
#   proxy keeps it on a stream (its usage chunk is rebuilt without extra keys).
# `stream` copies whatever chunk carries the object into that chunk's `usage`, so Open WebUI
# saves the flat keys with the reply and shows them in its (i) usage tooltip; `outlet` reads them
# back from the saved reply and writes the status line. A reply without a figure (another server,
# a gateway that had none) gets no line: the filter never turns a missing figure into an error.

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from pydantic import BaseModel, Field

log = logging.getLogger("wattgate.open_webui_filter")

Emitter = Callable[[dict[str, Any]], Awaitable[None]]

#: usage key -> the energy object's key, as the gateway writes them (wattgate.proxy.figures.usage_fields).
USAGE_KEYS = {"energy_j": "joules", "energy_wh": "wh", "gco2e": "gco2e", "water_ml": "water_ml",
              "energy_method": "method", "energy_settled": "settled", "energy_request_id": "request_id"}
#: The everyday equivalent of the conversation's total, one of wattgate's (proxy/static/equivalents.json):
#: small enough figures for a chat read best as a bulb's running time.
BULB = {"kind": "duration", "figure": "wh", "watts": 10.0, "what": "a 10 W LED bulb",
        "basis": "a 10 W LED bulb, the usual replacement for a 60 W incandescent: 10 Wh per hour"}
#: Settled figures kept for the running total, by the gateway's request id (the newest first out last).
SETTLED_KEPT = 10_000
#: One read of GET /v1/energy/{id}; between reads the wait doubles from the first to the last.
READ_TIMEOUT_S, FIRST_WAIT_S, LONGEST_WAIT_S = 2.0, 0.25, 2.0


def energy_in(chunk: Any) -> dict[str, Any] | None:
    """The gateway's energy object in a chunk or body: top-level ``energy`` or ``provider_specific_fields``,
    or a choice's ``delta``/``message`` ``provider_specific_fields`` (where LiteLLM keeps it)."""
    if not isinstance(chunk, dict):
        return None
    holders = [chunk, chunk.get("provider_specific_fields")]
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict):
            holders += [(choice.get(part) or {}).get("provider_specific_fields") for part in ("delta", "message")]
    for holder in holders:
        energy = holder.get("energy") if isinstance(holder, dict) else None
        if isinstance(energy, dict) and isinstance(energy.get("wh"), int | float):
            return energy
    return None


def figure_in(usage: Any) -> dict[str, Any] | None:
    """A reply's figure from its ``usage`` (the flat keys), or None when it has none."""
    if not isinstance(usage, dict) or not all(isinstance(usage.get(k), int | float) for k in ("energy_wh", "gco2e")):
        return None
    return {energy_key: usage.get(usage_key) for usage_key, energy_key in USAGE_KEYS.items()}


def sig3(x: float) -> str:
    """``x`` to three significant figures, without an exponent (as wattgate's chat page shows figures)."""
    if x == 0:
        return "0"
    places = 2 - math.floor(math.log10(abs(x)))
    text = f"{round(x, places):,.{max(0, places)}f}"
    return text.rstrip("0").rstrip(".") if places > 0 else text


def bulb_time(wh: float) -> str:
    """How long the bulb of ``BULB`` runs on ``wh``."""
    hours = wh / BULB["watts"]
    for unit, per_hour in (("hours", 1.0), ("minutes", 60.0)):
        if hours * per_hour >= 1:
            return f"{sig3(hours * per_hour)} {unit}"
    return f"{sig3(hours * 3600)} seconds"


def status_line(reply: dict[str, Any], replies: list[dict[str, Any]]) -> str:
    """The line above a reply: its figure, how it was obtained and whether it is final; then the
    conversation's total over ``replies`` (this one included) when there is more than one. Short
    enough for one line of Open WebUI's chat at desktop width."""
    state = "settled" if reply.get("settled") else "provisional"
    water = f" · {sig3(reply['water_ml'])} mL water" if isinstance(reply.get("water_ml"), int | float) else ""
    line = f"⚡ {sig3(reply['wh'])} Wh · {sig3(reply['gco2e'])} gCO2e{water} ({reply.get('method') or '?'}, {state})"
    if len(replies) > 1:
        wh = sum(r["wh"] for r in replies)
        line += f" · this chat: {sig3(wh)} Wh, {BULB['what']} for {bulb_time(wh)}"
    return line


class Filter:
    class Valves(BaseModel):
        gateway_url: str = Field(
            default="",
            description="wattgate's base URL as Open WebUI's server reaches it (e.g. http://wattgate:8080), also"
                        " when LiteLLM sits between: each reply's figure is followed there until it is final."
                        " Empty: the reply's first (provisional) figure only.")
        gateway_api_key: str = Field(
            default="",
            description="A key of the gateway of the same team as the key Open WebUI's connection uses (a figure"
                        " is read back only by its own team). Empty when the gateway has no keys.")
        settle_timeout_s: float = Field(default=30.0, ge=0, description="How long to follow a figure (seconds).")
        show_total: bool = Field(default=True, description="Add the conversation's total to each line.")
        priority: int = Field(default=0, description="Order among filters (lower runs first).")

    def __init__(self) -> None:
        self.valves = self.Valves()
        self._settled: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._following: set[asyncio.Task[None]] = set()  # kept so that the loop does not drop them mid-way

    def inlet(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ask for the stream's usage chunk, which carries the figure (Open WebUI asks only for models it
        knows report usage)."""
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    def stream(self, event: dict[str, Any]) -> dict[str, Any]:
        """Copy a chunk's energy object into its ``usage``, where Open WebUI keeps it with the reply."""
        energy = energy_in(event)
        if energy is not None:
            flat = {usage_key: energy.get(energy_key) for usage_key, energy_key in USAGE_KEYS.items()}
            event["usage"] = {**(event.get("usage") or {}), **flat}
        return event

    async def outlet(self, body: dict[str, Any], __event_emitter__: Emitter | None = None) -> dict[str, Any]:
        """Write the reply's line; follow a provisional figure in the background until it settles."""
        try:
            self._show(body, __event_emitter__)
        except Exception:  # a filter fault must never fail the chat
            log.warning("wattgate filter: no energy line for this reply", exc_info=True)
        return body

    def _show(self, body: dict[str, Any], emit: Emitter | None) -> None:
        messages = body.get("messages") or ()
        replies = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if emit is None or not replies or (own := figure_in(replies[-1].get("usage"))) is None:
            return  # the reply just given has no figure: nothing to say
        earlier = [self._latest(f) for m in replies[:-1] if (f := figure_in(m.get("usage")))]
        reply = self._latest(own)
        task = asyncio.get_running_loop().create_task(self._follow(reply, earlier, emit))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    def _latest(self, figure: dict[str, Any]) -> dict[str, Any]:
        """``figure``, or its settled version when this filter has seen it settle."""
        return self._settled.get(str(figure.get("request_id")), figure)

    async def _follow(self, reply: dict[str, Any], earlier: list[dict[str, Any]], emit: Emitter) -> None:
        await self._emit_line(emit, reply, earlier)
        rid, url = reply.get("request_id"), self.valves.gateway_url.rstrip("/")
        if reply.get("settled") or not rid or not url:
            return
        settled = await self._read_settled(f"{url}/v1/energy/{rid}")
        if settled is not None:
            self._settled[str(rid)] = settled
            while len(self._settled) > SETTLED_KEPT:
                self._settled.popitem(last=False)
            await self._emit_line(emit, settled, earlier)

    async def _emit_line(self, emit: Emitter, reply: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
        replies = [*earlier, reply] if self.valves.show_total else [reply]
        await emit({"type": "status", "data": {"description": status_line(reply, replies), "done": True}})

    async def _read_settled(self, url: str) -> dict[str, Any] | None:
        """The gateway's record at ``url`` once settled, within the valves' timeout; None otherwise."""
        headers = {"authorization": f"Bearer {self.valves.gateway_api_key}"} if self.valves.gateway_api_key else {}
        deadline, wait = time.monotonic() + self.valves.settle_timeout_s, FIRST_WAIT_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S)) as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(url, headers=headers) as r:
                        record = await r.json() if r.status == 200 else None
                except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                    log.debug("wattgate filter: reading %s failed: %s", url, type(e).__name__)
                    record = None
                if isinstance(record, dict) and record.get("settled") and isinstance(record.get("wh"), int | float):
                    return record
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 2, LONGEST_WAIT_S)
        return None
