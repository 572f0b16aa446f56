"""Run an ASGI app under uvicorn in a background thread (demo and tests)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Self

import uvicorn

from wattgate.proxy.http_limits import uvicorn_options

log = logging.getLogger(__name__)
STOP_S = 10.0  # how long leaving the context waits for the server to stop


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """``with ServerThread(app) as srv: srv.url`` serves ``app`` on a free localhost port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, **config: Any) -> None:
        self.host = host
        self.port = port or free_port(host)
        config.setdefault("log_level", "warning")
        # A request still open at exit (a hanging upstream, a client that never reads) is cut after 1 s,
        # not waited on until the thread's join gives up.
        config.setdefault("timeout_graceful_shutdown", 1)
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None:  # a gateway app: served with the HTTP limits it is served with in production
            config = {**uvicorn_options(gateway.settings.gateway.limits), **config}
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=STOP_S)
        if self.thread.is_alive():  # its shutdown (the app's lifespan: the meter, the ledger) is stuck
            log.warning("server on port %d still stopping after %g s; leaving it behind", self.port, STOP_S)
