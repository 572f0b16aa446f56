"""A tiny OpenAI-compatible server whose tokens come from a real transformer on the GPU.

vLLM is too large to carry to the test GPU, so this reuses the simulated
upstream's vLLM-shaped HTTP layer and replaces only how tokens are made: a
randomly initialised GPT-2-style model (no weights to download) decodes one
token per step with a KV cache. Requests take turns step by step, so several
streams share the GPU over the same window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from wattgate.proxy.simulated_upstream import Scenario, SimulatedUpstream


def counter_j(gpu: int = 0) -> float:
    """GPU ``gpu``'s energy counter now, in joules, read on its own NVML session: an independent bracket
    around what the meter attributes."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(gpu)) / 1000.0
    finally:
        pynvml.nvmlShutdown()


class TorchUpstream(SimulatedUpstream):
    def __init__(self, device: str = "cuda:0", **kw: Any) -> None:
        super().__init__(**kw)
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        self.torch = torch
        self.device = device
        config = GPT2Config(
            n_layer=24, n_embd=2048, n_head=16, n_positions=2048, vocab_size=32000, bos_token_id=0, eos_token_id=0
        )
        with torch.device(device):
            self.model = GPT2LMHeadModel(config).to(torch.bfloat16).eval()
        self.lock = asyncio.Lock()

    def _step(self, ids: Any, past: Any) -> tuple[Any, Any]:
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            self.torch.cuda.synchronize(self.device)
        return nxt, out.past_key_values

    async def _tokens(self, prompt_tokens: int, max_tokens: int, scenario: Scenario) -> AsyncIterator[str]:
        ids = self.torch.randint(0, 32000, (1, max(prompt_tokens, 1)), device=self.device)
        past = None
        for _ in range(max_tokens):
            async with self.lock:
                ids, past = await asyncio.to_thread(self._step, ids, past)
            yield f"t{int(ids[0, 0])} "
