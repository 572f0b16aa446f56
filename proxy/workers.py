"""``wattgate serve --workers N``: N relay workers on one port, one hub that keeps the books, one supervisor.

- The supervisor (:func:`serve_workers`) binds the port first (a clear error if it
  is taken), starts the hub, waits until it answers, then starts the workers. It
  restarts any of them that exits, and on SIGINT or SIGTERM stops the workers
  (they finish their calls) and then the hub (it settles what it can and closes
  the ledger).
- The hub (:func:`~proxy.children.run_hub`, :mod:`proxy.hub`) owns the sampler, the meter, the
  records, the metrics, the ledger and the foreign-load poller, and answers
  ``/metrics``, ``/readyz`` and ``/v1/energy/{id}`` over a Unix socket.
- Each worker (:func:`~proxy.children.run_worker`) relays the calls on the connections the
  supervisor deals it in turn (:mod:`proxy.dealer`), or, with ``spread="kernel"``,
  on those the kernel hands the listening socket each worker opens with
  SO_REUSEPORT (by a hash of the client's address, whatever each worker's load),
  and sends their windows to the hub (:mod:`proxy.hub_link`).

Every child runs in its own process group, so a terminal's Ctrl-C reaches only the
supervisor, which stops them in that order; a child whose supervisor is gone
(killed) stops itself.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from wattgate.proxy.children import GRACE_S, listening_socket, run_hub, run_worker
from wattgate.proxy.dealer import Dealer
from wattgate.proxy.hub import api_path
from wattgate.proxy.keys import GatewayKeys
from wattgate.proxy.ledger_store import open_store
from wattgate.proxy.registry_file import load_settings
from wattgate.proxy.settings import ConfigError, gateway_id, serving_on
from wattgate.proxy.startup import log_startup

log = logging.getLogger("wattgate.workers")

HUB_START_S = 60.0  # the hub must answer within this (NVML start-up included)
RESTART_WAIT_S = (0.5, 10.0)  # first and longest wait before restarting a process that exited
FAST_EXIT_S = 10.0  # a process that exits this soon after starting counts towards giving up
GIVE_UP_AFTER = 5  # fast exits in a row


@dataclass
class Child:
    """One supervised process, started again whenever it exits."""

    name: str
    target: Callable[..., None]
    make_args: Callable[[], tuple[Any, ...]]  # its arguments, made anew at each start
    process: BaseProcess | None = None
    started_at: float = 0.0
    fast_exits: int = 0
    restart_at: float | None = None

    def start(self, ctx: multiprocessing.context.SpawnContext) -> None:
        args = self.make_args()
        self.process = ctx.Process(target=self.target, args=args, name=self.name, daemon=False)
        self.process.start()
        for arg in args:  # a socket went to the child as a duplicate of its descriptor, made at start
            if isinstance(arg, socket.socket):
                arg.close()
        self.started_at = time.monotonic()
        self.restart_at = None

    def exited(self) -> None:
        """It exited: schedule its restart, waiting longer after each fast exit."""
        assert self.process is not None
        lived = time.monotonic() - self.started_at
        self.fast_exits = self.fast_exits + 1 if lived < FAST_EXIT_S else 0
        wait = min(RESTART_WAIT_S[0] * 2 ** max(self.fast_exits - 1, 0), RESTART_WAIT_S[1])
        log.warning("%s (pid %s) exited with code %s after %.1f s; restarting in %.1f s",
                    self.name, self.process.pid, self.process.exitcode, lived, wait)
        self.restart_at = time.monotonic() + wait

    def stop(self, timeout_s: float) -> None:
        p = self.process
        if p is None or not p.is_alive():
            return
        p.terminate()  # SIGTERM: uvicorn shuts down gracefully
        p.join(timeout_s)
        if p.is_alive():
            log.warning("%s (pid %s) did not stop in %.0f s; killing it", self.name, p.pid, timeout_s)
            p.kill()
            p.join()


class Supervisor:
    """Starts the hub and the workers, keeps them running, stops them in order."""

    def __init__(self, config: str, host: str, port: int, workers: int, log_level: str,
                 dealer: Dealer | None = None, gateway_id: str | None = None) -> None:
        self.runtime_dir = tempfile.mkdtemp(prefix="wattgate-")
        self.ctx = multiprocessing.get_context("spawn")
        self.dealer = dealer
        self.hub = Child("wattgate-hub", run_hub, lambda: (config, self.runtime_dir, log_level, gateway_id))

        def worker_args(i: int) -> tuple[Any, ...]:
            channel = dealer.channel(i) if dealer is not None else None  # a new one at each (re)start
            return config, host, port, self.runtime_dir, i, log_level, channel

        self.workers = [Child(f"wattgate-worker-{i}", run_worker, functools.partial(worker_args, i))
                        for i in range(1, workers + 1)]
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)
        try:
            self.hub.start(self.ctx)
            if not self._hub_answers():
                return 1
            for w in self.workers:
                w.start(self.ctx)
            if self.dealer is not None:
                self.dealer.start()
            return self._supervise()
        finally:
            if self.dealer is not None:
                self.dealer.stop()  # first: no connection dealt to a worker that is stopping
            for w in self.workers:
                w.stop(GRACE_S + 5)
            self.hub.stop(30)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _hub_answers(self) -> bool:
        deadline = time.monotonic() + HUB_START_S
        path = str(api_path(self.runtime_dir))
        while not self.stopping and time.monotonic() < deadline:
            assert self.hub.process is not None
            if not self.hub.process.is_alive():
                log.error("the hub exited with code %s while starting", self.hub.process.exitcode)
                return False
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return True
                except OSError:
                    time.sleep(0.05)
        log.error("the hub did not start within %.0f s", HUB_START_S)
        return False

    def _supervise(self) -> int:
        children = [self.hub, *self.workers]
        while not self.stopping:
            sentinels = [c.process.sentinel for c in children if c.process is not None and c.restart_at is None]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            now = time.monotonic()
            for c in children:
                assert c.process is not None
                if c.restart_at is None and not c.process.is_alive():
                    c.exited()
                    if c.fast_exits >= GIVE_UP_AFTER:
                        log.error("%s exited %d times within %.0f s of starting; giving up", c.name,
                                  c.fast_exits, FAST_EXIT_S)
                        return 1
                if c.restart_at is not None and now >= c.restart_at and not self.stopping:
                    c.start(self.ctx)
        return 0


def serve_workers(config: str, host: str, port: int, workers: int, log_level: str, spread: str = "even") -> int:
    """Run the gateway as ``workers`` relay processes and a hub; returns the exit code. ``spread``: how
    connections reach the workers, ``even`` (dealt in turn) or ``kernel`` (see the module's docstring)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    # A wrong file, auth without keys or a ledger that cannot be opened is refused before any process starts.
    settings = load_settings(config)
    keys = GatewayKeys.from_settings(settings.gateway.auth)
    if settings.ledger.enabled:
        open_store(settings.ledger).close()
    dealt = spread == "even"
    try:
        # Spread by the kernel: held, never listened on, so that the port is ours, or a clear error now.
        sock = listening_socket(host, port, reuse_port=not dealt)
        if dealt:
            sock.listen(2048)  # connections wait here for the dealer, also while a worker restarts
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    with sock:
        port = sock.getsockname()[1]
        settings = serving_on(settings, port)
        log_startup(settings, keys, host, port, workers)
        log.info("wattgate: %d workers (connections spread %s), one hub", workers, "in turn" if dealt else "by the kernel")
        return Supervisor(config, host, port, workers, log_level, Dealer(sock) if dealt else None,
                          gateway_id(settings)).run()
