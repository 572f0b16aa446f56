"""Energy estimate for requests no meter can see, from EcoLogits' LLM inference model.

Used for remote APIs (no visible GPU) and as the fallback when the meter
faults; every figure from here is labelled ``estimate``.

EcoLogits (genai-impact/ecologits, methodology "LLM inference") models GPU
energy per output token as a regression on active parameters and batch size
(fitted to the ML.ENERGY leaderboard, batch 64 assumed), and the rest of the
server (CPU, DRAM, NIC) from the request's latency and the GPUs the model needs.
We take its IT energy only (PUE 1, no electricity factors): wattgate applies
the site's own PUE, grid and water factors to it like to any other figure.

One extension: EcoLogits counts output tokens only. Prompt tokens are added as
``prefill_weight`` output-token equivalents, so embeddings and long prompts are
not free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ecologits.impacts.llm import BATCH_SIZE, compute_llm_impacts_dag

from wattgate.meter.footprint import J_PER_KWH

DEFAULT_ACTIVE_PARAMS_B = 8.0
#: Requests sharing a GPU in EcoLogits' model (64): an estimated request's share of its GPUs' time.
ESTIMATE_BATCH = BATCH_SIZE


@dataclass(frozen=True, slots=True)
class Estimate:
    """Estimated IT energy of one request in joules."""

    gpu_j: float
    host_j: float


def _value(v: object) -> float:
    """EcoLogits returns a number or a min/max range; take the middle of a range."""
    lo, hi = getattr(v, "min", None), getattr(v, "max", None)
    return (lo + hi) / 2 if lo is not None and hi is not None else float(v)  # type: ignore[arg-type]


def estimate(
    prompt_tokens: int,
    completion_tokens: int,
    active_params_b: float = DEFAULT_ACTIVE_PARAMS_B,
    prefill_weight: float = 0.2,
    latency_s: float | None = None,
    total_params_b: float | None = None,
) -> Estimate:
    """EcoLogits' estimate of one request's GPU and host energy."""
    tokens = max(completion_tokens, 0) + prefill_weight * max(prompt_tokens, 0)
    if tokens <= 0:
        return Estimate(0.0, 0.0)
    dag = compute_llm_impacts_dag(
        model_active_parameter_count=active_params_b,
        model_total_parameter_count=total_params_b or active_params_b,
        output_token_count=tokens,
        # Unknown or zero latency: EcoLogits' own default (no cap on the modelled GPU time).
        request_latency=latency_s if latency_s and latency_s > 0 else math.inf,
        if_electricity_mix_adpe=0.0,
        if_electricity_mix_pe=0.0,
        if_electricity_mix_gwp=0.0,
        if_electricity_mix_wue=0.0,
        datacenter_pue=1.0,
        datacenter_wue=0.0,
    )
    gpu_kwh = _value(dag["gpu_energy"]) * _value(dag["gpu_required_count"])
    return Estimate(gpu_kwh * J_PER_KWH, _value(dag["server_energy"]) * J_PER_KWH)
