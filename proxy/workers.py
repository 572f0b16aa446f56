"""``wattgate serve --workers N``: N relay workers on one port, one hub that keeps the books, one supervisor.

- The supervisor (:func:`serve_workers`) binds the port first (a clear error if it
  is taken), starts the hub, waits until it answers, then starts the workers. It
  restarts any of them that exits, and on SIGINT or SIGTERM stops the workers
  (they finish their calls) and then the hub (it settles what it can and closes
  the ledger).
- The hub (:func:`run_hub`, :mod:`proxy.hub`) owns the sampler, the meter, the
  records, the metrics, the ledger and the foreign-load poller, and answers
  ``/metrics``, ``/readyz`` and ``/v1/energy/{id}`` over a Unix socket.
- Each worker (:func:`run_worker`) relays the calls on the connections the
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
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from wattgate.proxy.app import books_running, new_app
from wattgate.proxy.dealer import Dealer, DealtServer
from wattgate.proxy.gateway_state import GatewayState
from wattgate.proxy.http_limits import uvicorn_options
from wattgate.proxy.hub import HubServer, api_path, events_path
from wattgate.proxy.hub_link import HubLink, add_hub_routes
from wattgate.proxy.keys import GatewayKeys
from wattgate.proxy.ledger_file import connect, ledger_path
from wattgate.proxy.metering import build_meter
from wattgate.proxy.registry_file import load_settings
from wattgate.proxy.routes import add_book_routes, add_call_routes
from wattgate.proxy.settings import ConfigError
from wattgate.proxy.startup import log_startup

log = logging.getLogger("wattgate.workers")

GRACE_S = 5  # a stopping worker lets its calls finish this long
HUB_START_S = 60.0  # the hub must answer within this (NVML start-up included)
RESTART_WAIT_S = (0.5, 10.0)  # first and longest wait before restarting a process that exited
FAST_EXIT_S = 10.0  # a process that exits this soon after starting counts towards giving up
GIVE_UP_AFTER = 5  # fast exits in a row


def listening_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A socket bound to ``host:port``; with ``reuse_port``, one that other processes of this user can
    bind too (SO_REUSEPORT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _as_child(log_level: str) -> None:
    """Set up a child process: its own process group, logging, and an end when its supervisor ends."""
    os.setpgrp()
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    supervisor = os.getppid()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # graceful: uvicorn finishes what it can

    threading.Thread(target=watch, name="watch-supervisor", daemon=True).start()


def run_hub(config: str, runtime_dir: str, log_level: str) -> None:
    """The hub process: the books, the workers' events, and the routes that read the books."""
    _as_child(log_level)
    settings = load_settings(config)
    meter, drive = build_meter(settings)
    gw = GatewayState.local(settings, meter, drive)
    books = gw.books
    assert books is not None
    server = HubServer(books)

    @asynccontextmanager
    async def running() -> AsyncIterator[None]:
        async with books_running(gw, books), server.serving(events_path(runtime_dir)):
            yield

    app = new_app(gw, running)
    add_book_routes(app, gw, books, more_ready=lambda: {"hub_pid": os.getpid(), "workers": server.state()})
    config_ = uvicorn.Config(app, uds=str(api_path(runtime_dir)), log_level=log_level, access_log=False,
                             timeout_graceful_shutdown=GRACE_S)
    uvicorn.Server(config_).run()


def run_worker(config: str, host: str, port: int, runtime_dir: str, index: int, log_level: str,
               channel: socket.socket | None = None) -> None:
    """A relay worker: the calls on the connections dealt over ``channel`` (None: on its own socket on the
    shared port); the books at the hub."""
    _as_child(log_level)
    settings = load_settings(config)
    link = HubLink(settings, runtime_dir, index)
    gw = GatewayState(settings, link)
    app = new_app(gw, link.running)
    add_call_routes(app, gw)
    add_hub_routes(app, link)
    config_ = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACE_S,
                             **uvicorn_options(settings.gateway.limits))
    if channel is not None:
        DealtServer(config_, channel).run()
    else:
        uvicorn.Server(config_).run(sockets=[listening_socket(host, port)])


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
                 dealer: Dealer | None = None) -> None:
        self.runtime_dir = tempfile.mkdtemp(prefix="wattgate-")
        self.ctx = multiprocessing.get_context("spawn")
        self.dealer = dealer
        self.hub = Child("wattgate-hub", run_hub, lambda: (config, self.runtime_dir, log_level))

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
        connect(ledger_path(settings.ledger)).close()
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
        log_startup(settings, keys, host, port, workers)
        log.info("wattgate: %d workers (connections spread %s), one hub", workers, "in turn" if dealt else "by the kernel")
        return Supervisor(config, host, port, workers, log_level, Dealer(sock) if dealt else None).run()
