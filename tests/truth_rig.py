"""A truth rig for the split (issue 34): an upstream that runs its sequences in lockstep decode steps, and
a stand-in GPU whose power follows only what that upstream runs, read by the gateway through its NVML
source (tests/fake_nvml.py) as a driver would be read.

Nothing of the meter's work model is in it: the GPU draws ``GpuModel.watts(n)``, concave in the number
``n`` of sequences running (no per-token work, no prefill weight), its energy counter steps every
``counter_step_s`` at a phase, and its instantaneous power is reported ``power_lag_s`` late. Each step,
every running sequence makes one token. A request's truth is its equal share of each moment's energy
among the sequences running then. With ``prefill_tokens_per_step``, a step that admits new sequences
first prefills their prompts, for as long as that many prompt tokens per decode step's time, at
``GpuModel.prefill_w`` (compute-bound); that energy is the new sequences', by prompt tokens, as the
cost their prompts added. The upstream tells the gateway nothing a vLLM would not: it streams tokens as
they are made and answers plain calls at their end, with usage.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class GpuModel:
    idle_w: float = 75.0
    peak_w: float = 700.0
    prefill_w: float = 700.0  # while prompts are prefilled: compute-bound, near the board's limit
    half_at: float = 4.0  # sequences at which the power above idle is half of peak's: concave in n
    counter_step_s: float = 0.1
    counter_phase_s: float = 0.037
    power_lag_s: float = 0.06

    def watts(self, running: int) -> float:
        return self.idle_w + (self.peak_w - self.idle_w) * running / (running + self.half_at)


class LockstepGpu:
    """The GPU's power as the upstream's steps make it: piecewise constant, a segment per step.

    The segments live in a flat array of ``(start, energy before it, power)``, after a count: in memory,
    or in a file (``path``) that a gateway in processes of its own reads through :meth:`reading` (one
    writer, the upstream; the count is written after its segment)."""

    CAPACITY = 1_000_000  # segments: 83 min at a step every 5 ms

    def __init__(self, model: GpuModel, t0: float, path: Path | None = None) -> None:
        self.model = model
        shape = (1 + 3 * self.CAPACITY,)
        self._a = np.zeros(shape) if path is None else np.memmap(path, dtype=np.float64, mode="w+", shape=shape)
        self._a[1:4] = (t0, 0.0, model.idle_w)
        self._a[0] = 1
        self._lock = threading.Lock()

    @classmethod
    def reading(cls, path: Path, model: GpuModel) -> LockstepGpu:
        """Another process's view of the GPU whose segments ``path`` holds (read only)."""
        gpu = cls.__new__(cls)
        gpu.model, gpu._lock = model, threading.Lock()
        gpu._a = np.memmap(path, dtype=np.float64, mode="r", shape=(1 + 3 * cls.CAPACITY,))
        return gpu

    def _segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = int(self._a[0])
        seg = self._a[1:1 + 3 * n]
        return seg[0::3], seg[1::3], seg[2::3]

    def segment(self, t: float, running: int, prefill: bool = False) -> None:
        """From ``t`` on, ``running`` sequences run (``prefill``: their new ones' prompts are prefilled)."""
        with self._lock:
            n = int(self._a[0])
            t0, e0, p0 = self._a[1 + 3 * (n - 1):1 + 3 * n]
            power = self.model.prefill_w if prefill else self.model.watts(running) if running else self.model.idle_w
            self._a[1 + 3 * n:4 + 3 * n] = (t, e0 + p0 * (t - t0), power)
            self._a[0] = n + 1

    def energy_j(self, t: float) -> float:
        starts, energies, powers = self._segments()
        i = max(int(np.searchsorted(starts, t, side="right")) - 1, 0)
        return float(energies[i] + powers[i] * max(t - starts[i], 0.0))

    def busy_energy_j(self) -> float:
        """The energy of the ended segments that had sequences running (the truths share out exactly this)."""
        starts, _, powers = self._segments()
        busy = powers[:-1] != self.model.idle_w
        return float(np.sum((np.diff(starts) * powers[:-1])[busy]))

    def power_w(self, t: float) -> float:
        starts, _, powers = self._segments()
        return float(powers[max(int(np.searchsorted(starts, t, side="right")) - 1, 0)])

    # What NVML answers (tests/fake_nvml.py's FakeGpu.follows)
    def counter_mj(self, now: float) -> float:
        m = self.model
        last_step = m.counter_phase_s + math.floor((now - m.counter_phase_s) / m.counter_step_s) * m.counter_step_s
        return 1e9 + self.energy_j(last_step) * 1000

    def instant_power_mw(self, now: float) -> float:
        return self.power_w(now - self.model.power_lag_s) * 1000


@dataclass
class _Sequence:
    rid: str
    prompt_tokens: int
    max_tokens: int
    made: int = 0
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)


class LockstepUpstream:
    """An OpenAI-compatible upstream (``/v1/chat/completions``, ``/v1/models``) whose scheduler steps every
    ``step_s``; its ASGI app is :attr:`app`. ``truth`` holds each request's joules by the request id the
    gateway sent (``x-request-id``), complete once its response has ended."""

    def __init__(self, gpu: LockstepGpu, step_s: float = 0.005, served_name: str = "truth-model",
                 prefill_tokens_per_step: float = 0.0) -> None:
        self.gpu, self.step_s, self.served_name = gpu, step_s, served_name
        # Prompt tokens prefilled in one decode step's time (0: prompts cost nothing).
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.truth: dict[str, float] = {}
        self.admitted: dict[str, float] = {}  # when each request joined the running batch
        self._running: list[_Sequence] = []
        self._waiting: list[_Sequence] = []
        self._ticker: asyncio.Task[None] | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                     Route("/v1/models", self._models)], lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        self._ticker = asyncio.create_task(self._tick())
        yield
        self._ticker.cancel()

    async def _tick(self) -> None:
        last, prefilled, prefill_s = time.monotonic(), [], 0.0
        while True:
            await asyncio.sleep(max(last + prefill_s + self.step_s - time.monotonic(), 0.0))
            now = time.monotonic()
            self._share(self._running, prefilled, prefill_s, now - last)
            self._running = [s for s in self._running if s.made < s.max_tokens] + self._waiting
            prefilled, self._waiting = self._waiting, []
            prompts = sum(s.prompt_tokens for s in prefilled)
            prefill_s = prompts / self.prefill_tokens_per_step * self.step_s if self.prefill_tokens_per_step else 0.0
            for seq in prefilled:
                self.admitted[seq.rid] = now
            if prefill_s:
                self.gpu.segment(now, len(self._running), prefill=True)
            self.gpu.segment(now + prefill_s, len(self._running))
            last = now

    def _share(self, running: list[_Sequence], prefilled: list[_Sequence], prefill_s: float, step_s: float) -> None:
        """The step that just ended: its prefill's energy to the sequences it prefilled, by prompt tokens, the
        rest equally among those that ran in it; each of them makes a token."""
        if not running:
            return
        prompts = sum(s.prompt_tokens for s in prefilled)
        for seq in prefilled:
            self.truth[seq.rid] = self.truth.get(seq.rid, 0.0) + self.gpu.model.prefill_w * prefill_s * seq.prompt_tokens / prompts
        share = self.gpu.model.watts(len(running)) * (step_s - prefill_s) / len(running)
        for seq in running:
            self.truth[seq.rid] = self.truth.get(seq.rid, 0.0) + share
            seq.made += 1
            seq.tokens.put_nowait(seq.made)
            if seq.made >= seq.max_tokens:
                seq.tokens.put_nowait(None)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.served_name, "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])) + 4
        seq = _Sequence(request.headers.get("x-request-id", ""), prompt, int(body.get("max_tokens") or 16))
        self._waiting.append(seq)
        usage = {"prompt_tokens": prompt, "completion_tokens": seq.max_tokens,
                 "total_tokens": prompt + seq.max_tokens}
        base = {"id": f"cmpl-{seq.rid}", "created": int(time.time()), "model": self.served_name}
        if not body.get("stream"):
            while await seq.tokens.get() is not None:
                pass
            message = {"role": "assistant", "content": " tok" * seq.max_tokens}
            return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "message": message, "finish_reason": "length"}]})
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            chunk = {**base, "object": "chat.completion.chunk"}
            while await seq.tokens.get() is not None:
                delta = {"index": 0, "delta": {"content": " tok"}, "finish_reason": None}
                yield b"data: " + orjson.dumps({**chunk, "choices": [delta]}) + b"\n\n"
            finish = {"index": 0, "delta": {}, "finish_reason": "length"}
            yield b"data: " + orjson.dumps({**chunk, "choices": [finish]}) + b"\n\n"
            if with_usage:
                yield b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
