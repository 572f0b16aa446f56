"""What each child process of ``wattgate serve --workers N`` runs (:mod:`proxy.workers` starts and
watches them): the hub, which keeps the books, and a relay worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from wattgate.proxy.app import books_running, new_app
from wattgate.proxy.dealer import DealtServer
from wattgate.proxy.gateway_state import GatewayState
from wattgate.proxy.http_limits import uvicorn_options
from wattgate.proxy.hub import HubServer, api_path, events_path
from wattgate.proxy.hub_link import HubLink, add_hub_routes
from wattgate.proxy.metering import build_meter
from wattgate.proxy.registry_file import load_settings
from wattgate.proxy.routes import add_book_routes, add_call_routes
from wattgate.proxy.settings import serving_on

GRACE_S = 5  # a stopping worker lets its calls finish this long


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


def run_hub(config: str, runtime_dir: str, log_level: str, gateway_id: str | None = None) -> None:
    """The hub process: the books, the workers' events, and the routes that read the books; its records
    name the gateway ``gateway_id`` (the supervisor's host and port) unless the registry names it."""
    _as_child(log_level)
    settings = load_settings(config)
    if gateway_id is not None:
        settings = serving_on(settings, gateway_id)
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
