"""Parametric energy estimate for requests no meter can see.

Used for remote APIs (no visible GPU) and as the fallback when the meter
faults; every figure from here is labelled ``estimate``.

Formula: joules = (completion_tokens + prefill_weight * prompt_tokens)
x J_PER_TOKEN_PER_B_PARAMS x active_params_b.

Decoding is memory-bound: each step reads every active weight, so energy per
output token grows about linearly with active parameters. The constant is the
ML.ENERGY leaderboard's Llama-3.1-8B-Instruct on one H100 under vLLM at a
moderate batch (about 64 sequences: 0.18 J per output token, between the
0.46 J measured at batch 8 and 0.07 J at batch 512), divided by 8 B parameters.
It is a central figure for a well-used server, not a bound: a lightly loaded
server spends up to 2.5x more per token, a saturated one about 2.5x less.
"""

from __future__ import annotations

J_PER_TOKEN_PER_B_PARAMS = 0.18 / 8.0
DEFAULT_ACTIVE_PARAMS_B = 8.0


def estimate_joules(
    prompt_tokens: int,
    completion_tokens: int,
    active_params_b: float = DEFAULT_ACTIVE_PARAMS_B,
    prefill_weight: float = 0.2,
) -> float:
    """Estimated accelerator energy of one request in joules."""
    work = max(completion_tokens, 0) + prefill_weight * max(prompt_tokens, 0)
    return work * J_PER_TOKEN_PER_B_PARAMS * active_params_b
