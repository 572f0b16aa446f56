"""Where energy lands at window edges: mirror-image windows on a scripted GPU whose sensors report late.

    python -m bench.placement [--power-late-ms 0 50 100] [--counter-late-ms 0 50] [--compensate]

The windows of tests/test_gpu.py: a from 0 to 3 s, b from 1 to 4 s, c from 2 to
5 s, one token each per 50 ms; the GPU draws 690 W while any of them runs and
90 W otherwise. a and c are mirror images, so c/a should be 1 (and b/a 8/11).
The scripted GPU's instantaneous power and energy counter (which advances every
100 ms) each report a load change a chosen time late. For each counter mode,
the range of c/a over twelve placements of the windows against the sampler's
polls, the counter's reads and its update phase; with ``--compensate``, the
meter is told the power sensor's delay (``meter.power_lag_ms``). No GPU needed;
not a test (tests/test_meter.py asserts the ideal and compensated cases).

On an H200 (RESULTS.md) c/a was 0.983-0.993 with the counter read every poll
and 0.941-0.953 with it read once a second: this shows which sensor delays
explain that, and `python -m bench.sensor_lag` measures them on a GPU.
"""

from __future__ import annotations

import argparse
import statistics

from tests.mirror_windows import BUSY_W, mirror_windows

MODES = {"every poll": None, "every 1 s": 1.0, "every 8 s": 8.0}
PLACEMENTS = [(phase, offset) for phase in (0.013, 0.047, 0.081) for offset in (0.029, 0.37, 0.61, 0.83)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--power-late-ms", type=float, nargs="+", default=[0.0, 50.0, 100.0, -50.0])
    parser.add_argument("--counter-late-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--compensate", action="store_true", help="tell the meter how late power reports")
    args = parser.parse_args()
    true_j = BUSY_W * 5.0
    print(f"c/a over {len(PLACEMENTS)} placements: min-max (mean); sum of a+b+c against {true_j:.0f} J")
    for counter_late in args.counter_late_ms:
        for power_late in args.power_late_ms:
            cells = []
            for mode, every in MODES.items():
                lag = (power_late - counter_late) / 1e3 if args.compensate else 0.0
                runs = [mirror_windows(every, ph, off, power_late / 1e3, counter_late / 1e3, lag)
                        for ph, off in PLACEMENTS]
                ratio = [m["c"].joules / m["a"].joules for m in runs]
                total = [sum(x.joules for x in m.values()) for m in runs]
                cells.append(f"{mode}: {min(ratio):.3f}-{max(ratio):.3f} ({statistics.mean(ratio):.3f}), "
                             f"sum {min(total):.0f}-{max(total):.0f}")
            print(f"power {power_late:+4.0f} ms, counter {counter_late:+4.0f} ms late | " + " | ".join(cells))


if __name__ == "__main__":
    main()
