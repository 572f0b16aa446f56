"""The ``wattgate`` command: ``serve``, ``demo``, ``simulate-upstream`` and ``report``."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def version() -> str:
    try:
        return importlib.metadata.version("wattgate")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Says an option's default, unless there is none to say (None, a flag's False) or its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    defaults = _Defaults
    parser = argparse.ArgumentParser(prog="wattgate", description="Energy-metering gateway for OpenAI-compatible APIs")
    parser.add_argument("-V", "--version", action="version", version=f"wattgate {version()}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    serve = sub.add_parser("serve", help="run the gateway", formatter_class=defaults,
                           description="Run the gateway in front of the registry's upstreams, metering every request.")
    serve.add_argument("--config", default="models_registry.yaml", help="registry file (models, GPUs, site factors)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level of the gateway and uvicorn")
    serve.add_argument("--workers", type=_positive, default=1,
                       help="relay processes sharing the port; above 1, a hub process keeps the meter and the books")
    serve.add_argument("--spread", choices=("even", "kernel"), default="even",
                       help="with --workers: how connections reach the workers: dealt to each in turn by the "
                            "supervisor, or spread by the kernel over a socket per worker (SO_REUSEPORT: by a hash "
                            "of the client's address, whatever each worker's load)")
    demo = sub.add_parser("demo", help="run the gateway on a simulated upstream and GPU, send a workload, print figures",
                          formatter_class=defaults)
    demo.add_argument("--port", type=int, default=0, help="the gateway's port (0: a free one)")
    demo.add_argument("--keep-serving", action="store_true", help="leave the gateway up afterwards")
    sim = sub.add_parser("simulate-upstream", help="serve the built-in vLLM-like simulated upstream (no GPU)",
                         formatter_class=defaults)
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=8000, help="port to listen on")
    sim.add_argument("--served-name", default="meta-llama/Llama-3.1-8B-Instruct", help="the model name it answers to")
    sim.add_argument("--itl-ms", type=float, help="time between two tokens of a lone sequence (default: an H100's)")
    sim.add_argument("--spaced-json", action="store_true", help='write JSON with spaces (`"choices": [{`)')
    report = sub.add_parser("report", help="energy, carbon and water totals from the ledger", formatter_class=defaults)
    where = report.add_mutually_exclusive_group()
    where.add_argument("--config", help="registry file whose ledger to read (default: $WATTGATE_DATA_DIR/ledger.db)")
    where.add_argument("--ledger", help="ledger to read: a file (e.g. the demo's, which it prints) or a fleet's "
                                        "postgresql://user@host/db (password from PGPASSWORD or PGPASSFILE)")
    report.add_argument("--by", choices=["model", "team", "day", "method", "gateway"], default="model",
                        help="one row per")
    report.add_argument("--since", help="only records newer than this, e.g. 7d, 12h")
    report.add_argument(
        "--format",
        choices=["table", "csv", "json", "jsonl", "export-csv"],
        default="table",
        help="totals as table, csv or json; or every record as jsonl or export-csv (for ESG tooling)",
    )
    report.add_argument("--keep", help="delete records older than this, e.g. 90d (retention); says how many unless --yes")
    report.add_argument("--yes", action="store_true", help="with --keep: really delete them")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `wattgate`: what it can do, not only that a command is missing
        parser.print_help(sys.stderr)
        return 2

    from wattgate.proxy.settings import ConfigError

    try:
        if args.command == "demo":
            logging.basicConfig(level=logging.WARNING)
            from wattgate.proxy.demo import run_demo

            return run_demo(keep_serving=args.keep_serving, port=args.port)
        if args.command == "simulate-upstream":
            return _simulate_upstream(args)
        if args.command == "report":
            return _report(args)
        return _serve(args)
    except ConfigError as exc:
        print(f"wattgate: {exc}", file=sys.stderr)
        return 2


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _serve(args: argparse.Namespace) -> int:
    if args.workers > 1:
        from wattgate.proxy.workers import serve_workers

        return serve_workers(args.config, args.host, args.port, args.workers, args.log_level, args.spread)

    import uvicorn

    from wattgate.proxy.app import create_app
    from wattgate.proxy.http_limits import uvicorn_options
    from wattgate.proxy.registry_file import load_settings
    from wattgate.proxy.settings import serving_on
    from wattgate.proxy.startup import log_startup

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = serving_on(load_settings(args.config), args.port)
    app = create_app(settings)
    log_startup(settings, app.state.gateway.keys, args.host, args.port)
    # One process: the meter, the books and the relay together.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1,
                **uvicorn_options(settings.gateway.limits))
    return 0


def _report(args: argparse.Namespace) -> int:
    from wattgate.proxy.ledger_file import default_path
    from wattgate.proxy.ledger_store import ledger_place, open_store, store_for
    from wattgate.proxy.registry_file import load_settings
    from wattgate.proxy.report import run_report

    try:
        if args.config:
            ledger = load_settings(args.config).ledger  # a database as the gateway reaches it; a file must exist
            store = open_store(ledger) if ledger.url is not None else store_for(ledger_place(ledger))
        else:
            store = store_for(args.ledger or str(default_path()))
        print(run_report(store, args.by, args.since, args.format, args.keep, delete=args.yes), end="")
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
    print(f"wattgate simulate-upstream: {args.served_name} on a simulated H100 at http://{args.host}:{args.port}/v1 "
          f"({profile.itl_1_s * 1000:g} ms per token alone; Ctrl-C stops)", flush=True)
    uvicorn.run(upstream, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
