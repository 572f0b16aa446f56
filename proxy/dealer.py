"""An even spread of connections over the relay workers: the supervisor accepts each one and deals it
to the next worker in turn, over a Unix socket (SCM_RIGHTS), as Node.js's cluster module does by default.

Why not let the kernel spread them: with a listening socket per worker (SO_REUSEPORT) it picks the
worker by a hash of the client's address and port, whatever each worker's load; with one socket that
all workers accept from, whichever wakes first takes it; either way the busiest worker held well over
the mean (``bench/RESULTS.md``, "Relay workers around one hub"). A chat client keeps its connections open for many streams, so the busiest worker sets the pace of the whole
gateway while the others idle. Dealt in turn, every worker holds the same number of connections, give or
take one per client that opened them.

The cost is one ``accept`` and one ``sendmsg`` in the supervisor per connection, not per token. A
worker's channel holds a few hundred connections until it takes them (as many as its socket buffer
has room for): when a burst fills every channel, the dealer waits for room, and the connections
behind it wait in the listener's backlog, rather than any being closed (tests/test_workers.py bursts
more connections than the channels hold).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import select
import socket
import threading
import time
from typing import Any

import uvicorn

log = logging.getLogger("wattgate.workers")

ACCEPT_POLL_S = 0.5  # how often the dealer's blocking accept looks up to see whether it should stop
# A connection no worker can take yet (every channel full, or every worker restarting) waits this long
# for one, then is closed. While it waits the dealer accepts no other: they queue in the listener's
# backlog, as in front of one busy process.
DEAL_WAIT_S = 10.0
ROOM_POLL_S = 0.05  # how often a waiting connection looks for room again


class Dealer:
    """In the supervisor: accepts on ``listener`` and deals each connection to the next live worker."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.listener.settimeout(ACCEPT_POLL_S)
        self._ends: dict[int, socket.socket] = {}  # the supervisor's end of each worker's channel
        self._ready: set[int] = set()  # workers that said they take connections (a restarting one has not)
        self._lock = threading.Lock()
        self._next = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wattgate-dealer", daemon=True)

    def channel(self, worker: int) -> socket.socket:
        """A new channel to ``worker`` (replacing any it had): the end to pass to the worker's process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Never waits: a full channel passes the worker over. (MSG_DONTWAIT alone still blocked once the
        # peer's queue was full, on the project's VM's Linux 6.18.)
        ours.setblocking(False)
        with self._lock:
            old = self._ends.pop(worker, None)
            self._ends[worker] = ours
            self._ready.discard(worker)
        if old is not None:
            old.close()
        return theirs

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop dealing; connections not yet accepted wait in the listener's queue until it closes."""
        self._stopping.set()
        self._thread.join(timeout=ACCEPT_POLL_S + 1)
        with self._lock:
            for end in self._ends.values():
                end.close()
            self._ends.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # out of descriptors, a connection reset before it was taken
                log.warning("accepting a connection failed: %s", exc)
                self._stopping.wait(0.05)
                continue
            with conn:  # the worker holds its own descriptor once it is sent
                try:
                    self._deal(conn)
                except Exception:  # a bug here must not stop the gateway taking connections
                    log.exception("dealing a connection failed: it is closed")

    def _deal(self, conn: socket.socket) -> None:
        """Send ``conn`` to the next worker in turn with room for it, waiting for room if none has."""
        deadline = time.monotonic() + DEAL_WAIT_S
        while not self._stopping.is_set():
            full = self._offer(conn)
            if full is None:
                return
            if time.monotonic() >= deadline:
                break
            # A channel holds a few hundred connections (its socket buffer: 278 on the project's VM),
            # and a busy worker takes them once per turn of its loop: a burst of new connections can
            # fill every channel. Wait for room rather than drop the connection.
            if full:
                try:
                    select.select([], full, [], ROOM_POLL_S)
                except (OSError, ValueError):  # a channel closed meanwhile (its worker replaced): offer again
                    pass
            else:
                self._stopping.wait(ROOM_POLL_S)
        log.warning("no worker took a connection within %g s: it is closed", DEAL_WAIT_S)

    def _offer(self, conn: socket.socket) -> list[socket.socket] | None:
        """Send ``conn`` to the next worker in turn that takes it: None once sent, else the channels
        that were full."""
        with self._lock:
            workers = sorted(self._ends)
            ends = dict(self._ends)
            start = self._next
        order = [workers[(start + k) % len(workers)] for k in range(len(workers))]
        full = []
        # The next worker in turn that is ready; while none is (all starting), the next in turn: the
        # connection waits on its channel until it is.
        for worker in [w for w in order if self._is_ready(w, ends[w])] or order:
            try:
                socket.send_fds(ends[worker], [b"c"], [conn.fileno()])
            except BlockingIOError:  # its channel is full: it has not taken the last ones yet
                full.append(ends[worker])
                continue
            except OSError:  # gone (being restarted): it takes no connections now
                continue
            self._next = (workers.index(worker) + 1) % len(workers)
            return None
        return full

    def _is_ready(self, worker: int, end: socket.socket) -> bool:
        if worker in self._ready:
            return True
        try:
            said = end.recv(1)  # a worker says b"r" once it serves
        except OSError:  # nothing yet (BlockingIOError), or gone
            return False
        if said == b"r":
            with self._lock:
                if self._ends.get(worker) is end:
                    self._ready.add(worker)
            return True
        return False


class DealtServer(uvicorn.Server):
    """A uvicorn server whose connections come dealt over ``channel`` rather than from a listening socket."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel
        self._starting: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's lifespan and uvicorn's state, no listening socket
        # What uvicorn's own listening server builds for each connection it accepts.
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,  # type: ignore[call-arg]
                                     server_state=self.server_state, app_state=self.lifespan.state)
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self._take, loop, protocol)
        self.channel.send(b"r")  # ready: the dealer may send connections this way

    def _take(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
        """Serve every connection waiting on the channel."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 16, 16)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:  # the supervisor is gone: it stops this worker too
                loop.remove_reader(self.channel.fileno())
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                if self.should_exit:  # shutting down: no new connections
                    conn.close()
                    continue
                task = loop.create_task(self._connect(loop, protocol, conn))
                self._starting.add(task)  # held until it runs: the loop keeps only weak references
                task.add_done_callback(self._starting.discard)

    @staticmethod
    async def _connect(loop: asyncio.AbstractEventLoop, protocol: Any, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(protocol, conn)
        except OSError:  # reset by the client before it was taken
            conn.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.channel.fileno())
        self.channel.close()  # connections sent but not taken close with it, as in a listening socket's queue
        await super().shutdown(sockets)
