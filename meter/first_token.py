"""How long a request prefills on a GPU before its first token, learnt from the streams' first tokens.

A request seen without tokens (a plain call) is taken to prefill up to its start plus this prediction
(see :mod:`meter.work`). A moving average alone predicted every request the recent mean: beside a long
prompt's prefill a plain call with a long prompt was taken to have prefilled for a short one's time,
and its prefill's energy went to the streams beside it (``bench/RESULTS.md``, "Requests of unknown
rate beside a prefill; plain calls' prefill by prompt length"). A GPU's time to first token grows with the prompt (prefill is compute-bound, and
an engine's scheduler takes so many prompt tokens a step), so the prediction is a line in the prompt's
token count, fitted by least squares over exponentially weighted moving moments.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT = 0.2  # weight of the newest stream in the moving moments
MIN_SPREAD = 1.0  # prompt-length variance (tokens²) below which the prompts say nothing: the mean alone


@dataclass(slots=True)
class TimeToFirstToken:
    """One GPU's moving moments of (prompt tokens, time to first token)."""

    seen: bool = False
    prompt: float = 0.0  # mean prompt tokens
    ttft: float = 0.0  # mean time to first token (s)
    prompt_sq: float = 0.0  # mean of prompt tokens squared
    prompt_ttft: float = 0.0  # mean of prompt tokens times time to first token

    def observe(self, prompt_tokens: int, ttft_s: float) -> None:
        """A stream with ``prompt_tokens`` got its first token ``ttft_s`` after it began."""
        p, t = float(prompt_tokens), ttft_s
        if not self.seen:
            self.seen, self.prompt, self.ttft, self.prompt_sq, self.prompt_ttft = True, p, t, p * p, p * t
            return
        w = WEIGHT
        self.prompt += w * (p - self.prompt)
        self.ttft += w * (t - self.ttft)
        self.prompt_sq += w * (p * p - self.prompt_sq)
        self.prompt_ttft += w * (p * t - self.prompt_ttft)

    def predict(self, prompt_tokens: int) -> float | None:
        """The time to first token of a request with ``prompt_tokens`` (s); None before any stream."""
        if not self.seen:
            return None
        spread = self.prompt_sq - self.prompt * self.prompt
        if spread < MIN_SPREAD:
            return self.ttft
        # A slope below zero is noise: a longer prompt does not prefill faster.
        slope = max((self.prompt_ttft - self.prompt * self.ttft) / spread, 0.0)
        return max(self.ttft + slope * (prompt_tokens - self.prompt), 0.0)
