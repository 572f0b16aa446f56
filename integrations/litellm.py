"""LiteLLM proxy callback: wattgate's figures on every response and stream LiteLLM returns, and in its spend logs.

LiteLLM rebuilds each chunk and ``usage`` from what it knows, so most of the gateway's
figures are lost on a stream; the one place it keeps on every provider is a choice's
``delta.provider_specific_fields`` (wattgate puts the figure there on the finish chunk).
This callback finds the figure wherever LiteLLM left it and puts it back where clients look:

- ``energy`` (the gateway's object) on a plain body and on the stream's last chunk, and the
  gateway's flat keys (``energy_wh``, ``gco2e``, ``water_ml``, ...) in their ``usage`` when they have one;
- ``spend_logs_metadata`` of the call, so LiteLLM's spend logs carry energy beside dollars.

When a response came without a figure (a gateway with ``energy_in_usage: false``, a plain
body LiteLLM rebuilt), the callback asks the gateway for it, ``GET /v1/energy/{id}`` with the
``x-request-id`` the gateway sent, within ``wait_s``; nothing else ever waits on it, and a
gateway that does not answer only means no figure. Config (LiteLLM's ``config.yaml``)::

    litellm_settings:
      callbacks: wattgate.integrations.litellm.energy_callback

``WATTGATE_URL`` (the gateway's base URL, e.g. ``http://127.0.0.1:8080``) and ``WATTGATE_API_KEY``
(when its keys are on) are read from the environment for the fetch; without ``WATTGATE_URL``
the callback uses only what the responses carry.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp
from litellm.integrations.custom_logger import CustomLogger
from litellm.litellm_core_utils.hidden_params import get_hidden_params

from wattgate.proxy.figures import usage_fields

log = logging.getLogger("wattgate.integrations.litellm")

#: Longest wait for the gateway's record, per response that came without a figure; between its
#: tries, while the gateway has no record yet, waits doubling from the first to the last.
WAIT_S, FIRST_RETRY_S, LAST_RETRY_S = 2.0, 0.02, 0.25
_HEADER_PREFIXES = ("llm_provider-", "")


def energy_in(obj: Any) -> dict[str, Any] | None:
    """The gateway's energy object carried by a LiteLLM response or chunk, wherever LiteLLM kept it:
    top-level ``energy``, top-level ``provider_specific_fields``, or a choice's (delta or message)."""
    for holder in (obj, getattr(obj, "provider_specific_fields", None)):
        energy = _get(holder, "energy")
        if isinstance(energy, dict):
            return energy
    for choice in _get(obj, "choices") or ():
        for part in (_get(choice, "delta"), _get(choice, "message"), choice):
            energy = _get(_get(part, "provider_specific_fields"), "energy")
            if isinstance(energy, dict):
                return energy
    return None


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None and (extra := getattr(obj, "model_extra", None)):  # pydantic extras
        value = extra.get(key)
    return value


def request_id_of(obj: Any) -> str | None:
    """The gateway's ``x-request-id`` among the upstream headers LiteLLM kept on a response or chunk;
    None for another server's (a gateway's responses say ``x-energy-method``, streams too)."""
    hidden = get_hidden_params(obj) or getattr(obj, "_hidden_params", None) or {}
    headers = hidden.get("additional_headers") or {}
    for prefix in _HEADER_PREFIXES:
        if headers.get(f"{prefix}x-energy-method") and (value := headers.get(f"{prefix}x-request-id")):
            return str(value)
    return None


class WattgateEnergy(CustomLogger):
    """Adds the gateway's figures to LiteLLM's responses, streams and spend logs (see the module)."""

    def __init__(self, gateway_url: str | None = None, api_key: str | None = None, wait_s: float = WAIT_S) -> None:
        super().__init__()
        self.gateway_url = (gateway_url or os.environ.get("WATTGATE_URL") or "").rstrip("/") or None
        self.api_key = api_key or os.environ.get("WATTGATE_API_KEY") or None
        self.wait_s = wait_s

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        try:
            energy = energy_in(response) or await self.fetch(request_id_of(response))
            if energy is not None:
                _attach(response, energy)
                _log_spend(data, energy)
        except Exception:
            log.exception("wattgate: could not add energy to a response")
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        """Each chunk as it comes, but for the tail (the finish chunk and the usage chunk, which LiteLLM
        drops when it asked for usage itself): held until the stream ends, then given the figure seen
        anywhere in the stream."""
        tail: list[Any] = []  # from the first finished choice on, chunks without output
        energy, request_id, fetched = None, None, False
        async for chunk in response:
            energy = energy_in(chunk) or energy
            request_id = request_id or request_id_of(chunk)
            if energy is None and not fetched and _finishes(chunk):
                # LiteLLM builds the spend row as soon as the stream is drained: ask before reading on.
                fetched = True
                energy = await self.fetch(request_id or request_id_of(response))
            if (tail or _finishes(chunk)) and not _has_output(chunk):
                tail.append(chunk)
                continue
            for held in tail:  # output came after what looked like the end: the tail goes on as it was
                yield held
            tail.clear()
            if _finishes(chunk):
                tail.append(chunk)
            else:
                yield chunk
        try:
            if energy is None and not fetched:
                energy = await self.fetch(request_id or request_id_of(response))
            if energy is not None and tail:
                for chunk in tail:
                    _attach(chunk, energy)
                _log_spend(request_data, energy)
        except Exception:
            log.exception("wattgate: could not add energy to a stream")
        for held in tail:
            yield held

    async def fetch(self, request_id: str | None) -> dict[str, Any] | None:
        """The gateway's record of ``request_id``, provisional or settled, asked again while the gateway
        has none yet (a stream's record begins when its upstream ends); None when there is none in ``wait_s``."""
        if not self.gateway_url or not request_id:
            return None
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        loop = asyncio.get_running_loop()
        deadline, wait = loop.time() + self.wait_s, FIRST_RETRY_S
        # A session per fetch: LiteLLM gives a callback no shutdown to close a kept one in; fetches are rare.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.wait_s)) as session:
            while True:
                try:
                    async with session.get(f"{self.gateway_url}/v1/energy/{request_id}", headers=headers) as r:
                        record = await r.json() if r.status == 200 else None
                        status = r.status
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    return None
                if status != 404 or loop.time() + wait > deadline:
                    return record if isinstance(record, dict) else None
                await asyncio.sleep(wait)
                wait = min(wait * 2, LAST_RETRY_S)


def _finishes(chunk: Any) -> bool:
    return any(getattr(c, "finish_reason", None) is not None for c in getattr(chunk, "choices", None) or ())


def _has_output(chunk: Any) -> bool:
    """Whether a chunk carries generated text, reasoning or tool calls (the tail that is held has none)."""
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        if any(getattr(delta, key, None) for key in ("content", "reasoning_content", "tool_calls", "function_call")):
            return True
    return False


def _attach(obj: Any, energy: dict[str, Any]) -> None:
    """``energy`` on a LiteLLM response or chunk, and its flat keys in its ``usage`` if it has one."""
    obj.energy = energy
    usage = getattr(obj, "usage", None)
    if usage is not None:
        for key, value in usage_fields(energy).items():
            setattr(usage, key, value)


def _log_spend(request_data: dict, energy: dict[str, Any]) -> None:
    """The figure in the call's ``spend_logs_metadata``, which LiteLLM writes to its spend log row."""
    fields = {k: v for k, v in usage_fields(energy).items() if v is not None}
    for metadata in _metadata_dicts(request_data):
        spend = metadata.get("spend_logs_metadata")
        metadata["spend_logs_metadata"] = {**(spend if isinstance(spend, dict) else {}), **fields}


def _metadata_dicts(request_data: dict) -> list[dict[str, Any]]:
    """The call's metadata as the proxy holds it and as its logger (which writes the spend log) does."""
    out = [request_data.setdefault("metadata", {})]
    logging_obj = request_data.get("litellm_logging_obj")
    params = getattr(logging_obj, "model_call_details", {}).get("litellm_params") or {}
    for key in ("metadata", "litellm_metadata"):
        if isinstance(params.get(key), dict) and all(params[key] is not d for d in out):
            out.append(params[key])
    return out


#: The instance LiteLLM's config names (``callbacks: wattgate.integrations.litellm.energy_callback``).
energy_callback = WattgateEnergy()
