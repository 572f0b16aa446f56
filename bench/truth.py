"""The split judged against a truth the gateway cannot see (issue 34): the gateway on its NVML source in front
of tests/truth_rig.py's lockstep upstream, whose stand-in GPU draws power by what the upstream runs. Each
request's settled and inline joules against its equal share of the energy of the steps it ran in.

Usage::

    python -m bench.truth                    # 5, 10 and 20 ms per token, 10 waves each
    python -m bench.truth --step-ms 5 --waves 20 --seed 3
    python -m bench.truth --prefill-per-step 100   # prompts of 8-1024 words, prefilled by the rig's GPU

Waves of 1, 8, 1, 16, 2, 1, 4, 12, 1, 6 concurrent requests start together, half streamed, half plain,
each sized for a window class (< 0.1 s, 0.1-0.6 s, 0.6-2 s, > 2 s) at the step time; an idle pause
separates the waves. Printed per window class and per kind (stream, plain): p50, p95 and worst of
|figure - truth| / truth, for the settled and the inline figure, and the class's aggregate bias
(sum of settled / sum of truth - 1). Prompts are one word and cost the rig's GPU nothing, unless
``--prefill-per-step N``: then they are 8-1024 words (log-uniform) and the rig prefills N prompt
tokens in a decode step's time, at its prefill power. By default the gateway, the upstream and the
client share this process; with ``--workers N`` the gateway is ``wattgate serve --workers N`` in
processes of its own (tests/truth_runs.py).
"""

from __future__ import annotations

import argparse
import random

from tests.truth_runs import Plan, Result, against_truth, run, symmetry_plan

WAVES = (1, 8, 1, 16, 2, 1, 4, 12, 1, 6)
CLASSES = ((0.0, 0.1, "< 0.1 s"), (0.1, 0.6, "0.1-0.6 s"), (0.6, 2.0, "0.6-2 s"), (2.0, float("inf"), "> 2 s"))
TARGET_S = (0.05, 0.3, 1.2, 3.0)  # one window per class, varied by +-30 %


def mixed_plan(step_s: float, waves: int, rng: random.Random, prompts: bool = False) -> Plan:
    """WAVES' sizes, every window class, streamed and plain in turn; ``prompts``: of 8-1024 words, else one."""
    plan = []
    for w in range(waves):
        wave = []
        for i in range(WAVES[w % len(WAVES)]):
            seconds = TARGET_S[(w + i) % len(TARGET_S)] * rng.uniform(0.7, 1.3)
            words = round(8 * 2 ** rng.uniform(0, 7)) if prompts else 1
            wave.append(((w + i // len(TARGET_S) + i) % 2 == 0, max(int(seconds / step_s), 1), words))
        plan.append(wave)
    return plan


def _quantiles(errors: list[float]) -> str:
    if not errors:
        return "   -"
    s = sorted(errors)
    p = lambda q: s[min(int(q * len(s)), len(s) - 1)]
    return f"p50 {p(0.5) * 100:5.1f}%  p95 {p(0.95) * 100:5.1f}%  worst {s[-1] * 100:5.1f}%"


def report(results: list[Result]) -> list[str]:
    lines = []
    for lo, hi, name in CLASSES:
        for kind in ("stream", "plain", "both"):
            rows = [r for r in results if lo <= r.window_s < hi and (kind == "both" or r.stream == (kind == "stream"))]
            if not rows:
                continue
            settled = [abs(r.settled_j - r.truth_j) / r.truth_j for r in rows]
            inline = [abs(r.inline_j - r.truth_j) / r.truth_j for r in rows]
            bias = sum(r.settled_j for r in rows) / sum(r.truth_j for r in rows) - 1
            lines.append(f"  {name:>9} {kind:6} n={len(rows):3}  settled {_quantiles(settled)}  "
                         f"inline {_quantiles(inline)}  bias {bias * 100:+5.1f}%")
    return lines


def symmetry(results: list[Result], per_round: int = 8) -> list[str]:
    """Streams against plain calls of the same work, round by round, each kind against its truth (the
    requests of a round can join the batch a step apart, so their truths differ)."""
    lines, apart = [], []
    for i in range(0, len(results), per_round):
        bias = against_truth(results[i:i + per_round])
        apart.append((1 + bias[True]) / (1 + bias[False]) - 1)
        lines.append(f"  round {i // per_round + 1}: streams {apart[-1] * 100:+5.1f}% against plain calls "
                     f"(streams {bias[True] * 100:+5.1f}%, plain {bias[False] * 100:+5.1f}% against truth)")
    pooled = against_truth(results)
    lines.append(f"  worst round {max(apart, key=abs) * 100:+.1f}%, mean {sum(apart) / len(apart) * 100:+.1f}%; "
                 f"all rounds: streams {((1 + pooled[True]) / (1 + pooled[False]) - 1) * 100:+.1f}% against plain calls "
                 f"(streams {pooled[True] * 100:+.1f}%, plain {pooled[False] * 100:+.1f}% against truth)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-ms", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="time per token")
    parser.add_argument("--waves", type=int, default=len(WAVES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval-ms", type=int, default=50, help="the meter's power poll (meter.interval_ms)")
    parser.add_argument("--workers", type=int, default=0,
                        help="0: the gateway in this process; N: `wattgate serve --workers N` in its own processes")
    parser.add_argument("--prefill-weight", type=float, default=None,
                        help="the model's prefill_weight (default: the registry's)")
    parser.add_argument("--prefill-per-step", type=float, default=0.0, metavar="N",
                        help="prompts of 8-1024 words, the rig prefilling N prompt tokens per decode step's time")
    parser.add_argument("--symmetry", type=int, default=0, metavar="ROUNDS",
                        help="instead of the mixed waves: ROUNDS of 8 x 40 tokens started together, 4 streamed, 4 plain")
    args = parser.parse_args()
    where = "in this process" if not args.workers else f"serve --workers {args.workers}"
    if args.prefill_weight is not None:
        where += f", prefill_weight {args.prefill_weight:g}"
    if args.prefill_per_step:
        where += f", prompts prefilled {args.prefill_per_step:g} tokens per step"
    for step_ms in args.step_ms:
        plan = symmetry_plan(args.symmetry) if args.symmetry else mixed_plan(
            step_ms / 1000, args.waves, random.Random(args.seed), prompts=args.prefill_per_step > 0)
        results = run(step_ms, plan, args.interval_ms, args.workers, args.prefill_weight, args.prefill_per_step)
        if args.symmetry:
            print(f"{step_ms:g} ms per token, gateway {where}: streams against plain calls of the same work")
            print("\n".join(symmetry(results)))
            continue
        print(f"{step_ms:g} ms per token, gateway {where}, power polled every {args.interval_ms} ms, "
              f"{len(results)} requests in {args.waves} waves "
              "(|figure - truth| / truth; bias: sum settled / sum truth - 1):")
        print("\n".join(report(results)))
        total = sum(r.settled_j for r in results) / sum(r.truth_j for r in results) - 1
        print(f"  all settled against all truth: {total * 100:+.2f}%")


if __name__ == "__main__":
    main()
