"""The ``wattgate`` command: ``serve`` and ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wattgate", description="Energy-metering gateway for OpenAI-compatible APIs")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default="models_registry.yaml", help="registry file (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info")
    demo = sub.add_parser("demo", help="run the gateway on a simulated upstream and GPU, send a workload, print figures")
    demo.add_argument("--keep-serving", action="store_true", help="leave the gateway up afterwards")
    sim = sub.add_parser("simulate-upstream", help="serve the built-in vLLM-like simulated upstream (no GPU)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--served-name", default="meta-llama/Llama-3.1-8B-Instruct")
    sim.add_argument("--itl-ms", type=float, help="time between two tokens of a lone sequence (default: an H100's)")
    sim.add_argument("--spaced-json", action="store_true", help='write JSON with spaces (`"choices": [{`)')
    report = sub.add_parser("report", help="energy, carbon and water totals from the ledger")
    report.add_argument("--config", help="registry file whose ledger.path to read (default: $WATTGATE_DATA_DIR)")
    report.add_argument("--by", choices=["model", "team", "day"], default="model")
    report.add_argument("--since", help="only records newer than this, e.g. 7d, 12h")
    report.add_argument(
        "--format",
        choices=["table", "csv", "json", "jsonl", "export-csv"],
        default="table",
        help="totals as table, csv or json; or every record as jsonl or export-csv (for ESG tooling)",
    )
    report.add_argument("--keep", help="first delete records older than this, e.g. 90d (retention)")
    args = parser.parse_args(argv)

    from wattgate.proxy.settings import ConfigError

    try:
        if args.command == "demo":
            logging.basicConfig(level=logging.WARNING)
            from wattgate.proxy.demo import run_demo

            return run_demo(keep_serving=args.keep_serving)
        if args.command == "simulate-upstream":
            return _simulate_upstream(args)
        if args.command == "report":
            return _report(args)
        return _serve(args)
    except ConfigError as exc:
        print(f"wattgate: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from wattgate.proxy.app import create_app
    from wattgate.proxy.settings import load_settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(load_settings(args.config))
    # One worker: attribution needs every request on a GPU in one process.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wattgate.proxy.ledger import default_path
    from wattgate.proxy.report import run_report
    from wattgate.proxy.settings import load_settings

    path = default_path()
    if args.config:
        path = load_settings(args.config).ledger.path or path
    try:
        print(run_report(Path(path), args.by, args.since, args.format, args.keep), end="")
    except (FileNotFoundError, ValueError) as exc:
        print(f"wattgate report: {exc}", file=sys.stderr)
        return 2
    return 0


def _simulate_upstream(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import uvicorn

    from wattgate.meter.sources.simulated import H100_LLAMA_8B, SimulatedGpu
    from wattgate.proxy.simulated_upstream import SimulatedUpstream

    profile = H100_LLAMA_8B if args.itl_ms is None else replace(H100_LLAMA_8B, itl_1_s=args.itl_ms / 1000)
    upstream = SimulatedUpstream(SimulatedGpu(profile), served_name=args.served_name, spaced_json=args.spaced_json)
    uvicorn.run(upstream, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
