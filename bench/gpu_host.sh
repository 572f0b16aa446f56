#!/usr/bin/env bash
# The checks that need a GPU host (issue 19) and its cores (issue 16's curve), as one device run.
#
#   bash bench/gpu_host.sh prepare   # here, in the dev virtualenv (it pins its versions): wheels into .whl/ (ignored)
#   bash bench/gpu_host.sh run       # there (the device tool: carry .whl), results into $OUT (or ./gpu-out)
#
# The GPU host's image has Python 3.12 with PyTorch, NumPy, aiohttp, httpx, nvidia-ml-py and pytest, but
# not the gateway's web stack: `prepare` downloads those wheels (no dependencies resolved: the list is
# what the image lacks, as seen on 2026-11-27) and builds one of wattgate itself (19 MB in all). Each
# step of `run` has its own timeout and writes its output as it goes, so one that fails leaves the
# others' results. 9 m 7 s on an H200 host on 2026-11-28, with a second workers run (N = 8 with the
# kernel's spread, 1-1.5 min) since dropped: keep the whole inside the device's 10-minute call;
# figures go to bench/RESULTS.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."

MISSING=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection annotated-doc opentelemetry-api
         orjson uvicorn ecologits openai httpx2 httpcore2 truststore jiter distro sniffio typing-extensions
         codecarbon arrow authlib joserfc questionary prompt-toolkit wcwidth pycountry rapidfuzz types-python-dateutil
         httptools)  # uvicorn[standard]'s HTTP parser: without it uvicorn falls back to h11, slower per chunk

prepare() {
  rm -rf .whl && mkdir -p .whl
  for name in "${MISSING[@]}"; do
    version=$(python3 -m pip show "$name" 2>/dev/null | awk '/^Version/{print $2}')  # this checkout's version
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$name${version:+==$version}" || exit 1
  done
  python3 -m pip wheel -q --no-deps -w .whl . || exit 1
  du -sh .whl
}

run() {
  local out=${OUT:-gpu-out}
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  step() { echo "=== $1 ($(date +%T))"; }
  step env; { nproc; lscpu -e 2>/dev/null; python3 -c "import httptools, uvloop; print('httptools, uvloop: there')"; nvidia-smi --query-gpu=name,driver_version,power.limit,mig.mode.current --format=csv; } \
    | tee "$out/env.txt"
  # The workers curve (issue 16) first. The gateway on one thread of each of nine physical cores (two
  # workers sharing one core's two threads would each run at a fraction of its speed); bench.workers
  # keeps the load side off those cores. `--apart` runs N gateways that share nothing beside the N
  # workers, the host's own ceiling for N processes; the `relays` columns say whether the busiest worker
  # was at a full core while the mean one was not, and `load` whether the load side was.
  cores=$(python3 -c '
import pathlib
seen, first = set(), []
for cpu in sorted(int(p.name[3:]) for p in pathlib.Path("/sys/devices/system/cpu").glob("cpu[0-9]*")):
    f = pathlib.Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    core = f.read_text().strip() if f.exists() else str(cpu)
    if core not in seen:
        seen.add(core)
        first.append(cpu)
print(",".join(map(str, first[:9])))')
  step "workers, gateway on cores $cores"; timeout 280 python3 -m bench.workers --workers 1 2 4 8 --apart \
    --levels 128 512 1024 --gateway-cores "$cores" --upstreams 4 --clients 3 --requests-per-level 4 2>&1 \
    | grep -v WARNING | tee "$out/workers.txt"
  step sensor_lag; timeout 45 python3 -m bench.sensor_lag --cycles 6 2>&1 | tee "$out/sensor_lag.txt"
  lag=$(awk '/meter.power_lag_ms:/{print $NF}' "$out/sensor_lag.txt")
  lag=${lag:-60}  # what it measured on the H200 on 2026-11-27, should it fail this time
  step "test_gpu, power_lag_ms $lag"
  WATTGATE_TEST_POWER_LAG_MS=$lag timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider 2>&1 \
    | tail -60 | tee "$out/test_gpu_lag$lag.txt"
  step "inline figures on the GPU, power_lag_ms $lag"
  timeout 120 python3 -m bench.inline --mode gpu --power-lag-ms "$lag" 2>&1 | grep -v WARNING | tee "$out/inline_gpu.txt"
  step "test_gpu (meter windows only), power_lag_ms 0"
  WATTGATE_TEST_POWER_LAG_MS=0 timeout 90 python3 -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider \
    -k "not gateway" 2>&1 | tail -40 | tee "$out/test_gpu_lag0.txt"
  step nvml_cost; timeout 20 python3 - <<'PY' 2>&1 | tee -a "$out/env.txt"  # $OUT brings back 8 files at most
import time

import pynvml

pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
reads = {
    "total energy counter": lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h),
    "power usage (averaged)": lambda: pynvml.nvmlDeviceGetPowerUsage(h),
    "power instant (field)": lambda: pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT]),
}
for name, read in reads.items():
    read()
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(200):
        read()
    print(f"{name}: {(time.thread_time() - c0) / 200 * 1e6:.1f} us CPU, {(time.perf_counter() - t0) / 200 * 1e6:.1f} us wall")
try:
    print("MIG mode (current, pending):", pynvml.nvmlDeviceGetMigMode(h))
except pynvml.NVMLError as exc:
    print("MIG mode: NVMLError", exc)
PY
  step sampler; timeout 60 python3 -m bench.meter --only sampler --seconds 4 2>&1 | tee "$out/sampler.txt"
  step done
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_host.sh prepare|run" >&2; exit 2 ;;
esac
