"""A built-in OpenAI-compatible upstream that behaves like vLLM's server, for the demo and tests.

It streams the way vLLM does: a role chunk, one chunk per token, a finish chunk,
a usage chunk with ``choices: []`` when ``stream_options.include_usage`` is set,
then ``data: [DONE]``. Tokens come at the pace of a simulated H100 (see
:mod:`meter.sources.simulated`) whose power follows the number of running
sequences, so the simulated meter sees what a real GPU would.

``Scenario`` injects faults per request (slow first token, an error status,
a connection that breaks mid-stream, a server that hangs); the tests use it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.exchange import ClientGone, until_disconnect

_WORDS = (  # noqa: SIM905 - a sentence reads better than a list of its words
    "Energy per token falls as the batch grows , because the weights are read once per step "
    "and shared by every sequence in the batch . "
).split()
SYSTEM_FINGERPRINT = "vllm-0.32.0-simulated"
PREFILL_TOKENS_PER_S = 20_000.0  # order of an H100's prefill rate for an 8B model


@dataclass(frozen=True, slots=True)
class Scenario:
    """How the simulated upstream answers one request."""

    first_token_delay_s: float = 0.0  # added before the first token
    status: int = 200  # non-200: answer with vLLM's error body and this status
    break_after_tokens: int | None = None  # drop the connection after this many tokens
    hang: bool = False  # never answer


def _error(status: int, message: str, param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _count_tokens(value: Any) -> int:
    if isinstance(value, str):
        return max(1, len(value) // 4)
    if isinstance(value, list):
        return sum(_count_tokens(v) for v in value)
    if isinstance(value, dict):
        return _count_tokens(value.get("content", "")) + 4
    return 0


class SimulatedUpstream:
    """The ASGI app of one simulated vLLM server."""

    def __init__(
        self,
        gpu: SimulatedGpu | None = None,
        served_name: str = "meta-llama/Llama-3.1-8B-Instruct",
        max_model_len: int = 8192,
        default_max_tokens: int = 64,
        scenario: Callable[[dict[str, Any]], Scenario] | None = None,
        spaced_json: bool = False,
    ) -> None:
        self.gpu = gpu or SimulatedGpu()
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.scenario = scenario or (lambda body: Scenario())
        # Python's json.dumps style (`"choices": [{`), as some OpenAI-compatible servers write it.
        self.dumps: Callable[[Any], bytes] = (lambda o: json.dumps(o).encode()) if spaced_json else orjson.dumps
        self.requests_seen: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/health", lambda r: PlainTextResponse(""), methods=["GET"]),
            ]
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    async def models(self, request: Request) -> Response:
        data = [{"id": self.served_name, "object": "model", "created": 0, "owned_by": "vllm"}]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(f'vllm:num_requests_running{{model_name="{self.served_name}"}} {self.gpu.batch}.0\n')

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON body")
        if not isinstance(body, dict):
            return _error(400, "Body must be an object")
        if body.get("model") != self.served_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        self.requests_seen.append(body)
        return body

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "messages", chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "prompt", chat=False)

    async def _generate(self, request: Request, prompt_key: str, chat: bool) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        scenario = self.scenario(body)
        if scenario.hang:
            await asyncio.sleep(3600)
        if scenario.status != 200:
            return _error(scenario.status, "simulated upstream error")
        prompt_tokens = _count_tokens(body.get(prompt_key))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        if max_tokens > self.max_model_len:  # vLLM 0.32's words (tests/test_vllm.py compares them)
            return _error(400, f"max_tokens={max_tokens} cannot be greater than max_model_len={self.max_model_len}. "
                               f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                          "max_tokens")
        if prompt_tokens + max_tokens > self.max_model_len:
            return _error(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion).",
            )
        ids = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.served_name,
        }
        if body.get("stream"):
            return StreamingResponse(
                self._stream(body, ids, prompt_tokens, max_tokens, chat, scenario), media_type="text/event-stream"
            )
        self.gpu.begin_sequence()
        try:
            # As vLLM does: a client that leaves aborts its generation, streamed or not.
            text = await until_disconnect(request.receive, self._collect(prompt_tokens, max_tokens, scenario))
        except ClientGone:
            return Response(status_code=499)
        finally:
            self.gpu.end_sequence()
        content = "".join(text)
        # The fields vLLM 0.32 writes, most of them null (seen on its CPU build; tests/test_vllm.py).
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None, "stop_reason": None,
                                  "token_ids": None, "routed_experts": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content, "refusal": None, "annotations": None,
                                 "audio": None, "function_call": None, "reasoning": None}
        else:
            choice["text"] = content
        out = {
            **ids,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + len(text),
                "completion_tokens": len(text),
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            **dict.fromkeys(("prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                             "ec_transfer_params", "metrics")),
        }
        return Response(self.dumps(out), media_type="application/json")

    async def _collect(self, prompt_tokens: int, max_tokens: int, scenario: Scenario) -> list[str]:
        return [token async for token in self._tokens(prompt_tokens, max_tokens, scenario)]

    async def _tokens(self, prompt_tokens: int, max_tokens: int, scenario: Scenario) -> AsyncIterator[str]:
        await asyncio.sleep(prompt_tokens / PREFILL_TOKENS_PER_S + scenario.first_token_delay_s)
        for i in range(max_tokens):
            if i:
                await asyncio.sleep(self.gpu.profile.inter_token_s(self.gpu.batch))
            yield _WORDS[i % len(_WORDS)] + " "

    async def _stream(
        self, body: dict[str, Any], ids: dict[str, Any], prompt_tokens: int, max_tokens: int, chat: bool, sc: Scenario
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + self.dumps({**ids, "object": obj, "choices": choices, **extra}) + b"\n\n"

        def choice(text: str, finish: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                c["delta"] = {"content": text} if text or finish else {"role": "assistant", "content": ""}
            else:
                c["text"] = text
            if finish:  # as vLLM 0.32 writes a token's chunk
                c["stop_reason"] = None
            if text or finish:
                c["token_ids"] = None
            return c

        self.gpu.begin_sequence()
        n = 0
        try:
            if chat:
                yield event([choice("")], prompt_token_ids=None, prompt_text=None)
            async for token in self._tokens(prompt_tokens, max_tokens, sc):
                if sc.break_after_tokens is not None and n >= sc.break_after_tokens:
                    raise ConnectionResetError("simulated mid-stream failure")
                n += 1
                yield event([choice(token, "length" if n == max_tokens else None)])
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
                yield event([], usage=usage, system_fingerprint=SYSTEM_FINGERPRINT)
            yield b"data: [DONE]\n\n"
        finally:
            self.gpu.end_sequence()

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        tokens = _count_tokens(items)
        self.gpu.begin_sequence()
        try:
            await asyncio.sleep(tokens / PREFILL_TOKENS_PER_S + 0.002)
        finally:
            self.gpu.end_sequence()
        data = [{"object": "embedding", "index": i, "embedding": [0.0] * 8} for i in range(len(items))]
        out = {
            "object": "list",
            "data": data,
            "model": self.served_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(orjson.dumps(out), media_type="application/json")
