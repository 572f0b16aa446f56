"""What a relay worker and the hub (:mod:`proxy.hub`) say to each other: every message defined once,
with one encoder and one decoder, so the two ends cannot disagree on a field's place.

The worker's events go over a Unix socket, one batch per line: a JSON array
``[tokens, events]``. ``tokens`` is flat, ``cid, n, t`` for every ``n`` tokens of a
stream that arrived at ``t`` (the one event per relayed chunk, so the cheapest to
read; see :func:`token_triples`); ``events`` are the others, in order, each
``[kind, field, ...]`` with the fields of its class below. Times are on
CLOCK_MONOTONIC, which every process on the host shares. A worker flushes its
batch at once after an event that needs a reply (:class:`Open`, :class:`End`), so
a batch holds at most one, last: the hub applies the tokens first, then the
events, and a call's tokens are never in a batch before its opening.

``cid`` numbers a call within its worker's connection. The hub answers
:class:`Hello` with :class:`Methods` (how each model's calls are metered now),
:class:`Open` with :class:`Opened` (the id changes only when the client chose one
the team already used) and :class:`End` with :class:`Figure` (``energy`` null for
a call it does not have: the worker then estimates it and sends it as
:class:`Estimated`). A worker whose connection closes (it died) has its open calls
ended as ``client_closed``, settled and recorded like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Any, NamedTuple

import orjson

from wattgate.meter import Fault, Measurement, Method, Status

MAX_LINE_BYTES = 64 * 1024 * 1024  # one batch of events; far above what a worker sends in one flush


class Hello(NamedTuple):
    """A worker's first words on a connection."""

    KIND = "hello"
    worker_index: int
    pid: int


class Open(NamedTuple):
    """A call opened on the worker (answered by :class:`Opened`)."""

    KIND = "open"
    cid: int
    request_id: str
    client_chose: bool
    model_name: str
    team: str | None
    prompt_tokens: int
    t: float


class Done(NamedTuple):
    """A plain response's completion tokens."""

    KIND = "done"
    cid: int
    n: int


class Use(NamedTuple):
    """The upstream's usage for a call."""

    KIND = "use"
    cid: int
    prompt_tokens: int | None
    completion_tokens: int | None


class End(NamedTuple):
    """A call ended on the worker (answered by :class:`Figure`)."""

    KIND = "end"
    cid: int
    status: str  # a Status
    t: float
    latency_s: float


class Lag(NamedTuple):
    """The worker's event-loop lag."""

    KIND = "lag"
    seconds: float


class Estimated(NamedTuple):
    """A call the worker estimated itself while the hub was away, for the hub to record."""

    KIND = "rec"
    model_name: str
    team: str | None
    request_id: str
    latency_s: float
    measurement: list[Any]  # measurement_fields(m)


class Lost(NamedTuple):
    """Calls estimated while the hub was away that the worker could not keep for it."""

    KIND = "lost"
    n: int


class Unanswered(Enum):
    """What a worker's wait for a reply got instead of one."""

    GONE = "gone"  # none will come: the connection closed, or the hub was away
    LATE = "late"  # none came in time (the hub still gets the event and answers it later)


class Methods(NamedTuple):
    """The hub's answer to :class:`Hello`: how each model's calls are metered now."""

    KIND = "methods"
    methods: dict[str, str]


class Opened(NamedTuple):
    """The hub's answer to :class:`Open`: the id the call is recorded under, and how it is metered."""

    KIND = "opened"
    cid: int
    request_id: str
    key: str
    method: str


class Figure(NamedTuple):
    """The hub's answer to :class:`End`: the call's energy object (None: the hub does not have the call)."""

    KIND = "energy"
    cid: int
    energy: dict[str, Any] | None


Event = Hello | Open | Done | Use | End | Lag | Estimated | Lost
Reply = Methods | Opened | Figure

_EVENTS: dict[str, type[Any]] = {c.KIND: c for c in (Hello, Open, Done, Use, End, Lag, Estimated, Lost)}
_REPLIES: dict[str, type[Any]] = {c.KIND: c for c in (Methods, Opened, Figure)}


def encode(message: Event | Reply) -> list[Any]:
    """``message`` as the JSON array that goes over the socket: its kind, then its fields in order."""
    return [message.KIND, *message]


def reply_line(reply: Reply) -> bytes:
    return orjson.dumps(encode(reply)) + b"\n"


def _decode(table: dict[str, type[Any]], fields: list[Any]) -> Any:
    """Raises ValueError for an unknown kind, TypeError for the wrong number of fields."""
    kind, *values = fields
    cls = table.get(kind)
    if cls is None:
        raise ValueError(f"unknown message {kind!r}")
    return cls(*values)


def decode_event(fields: list[Any]) -> Event:
    return _decode(_EVENTS, fields)


def decode_reply(fields: list[Any]) -> Reply:
    return _decode(_REPLIES, fields)


def token_triples(tokens: list[Any]) -> Iterator[tuple[int, float, float]]:
    """A batch's flat token events as ``(cid, n, t)``."""
    it = iter(tokens)
    return zip(it, it, it, strict=True)


def measurement_fields(m: Measurement) -> list[Any]:
    """``m`` as a JSON array (a worker's estimate, for the hub to record)."""
    return [m.request_id, {str(g): j for g, j in m.joules_by_gpu.items()}, m.method, m.settled, m.start, m.end,
            m.prompt_tokens, m.completion_tokens, m.status, m.fault, m.host_joules]


def measurement_from(fields: list[Any]) -> Measurement:
    rid, joules, method, settled, start, end, prompt, completion, status, fault, host = fields
    return Measurement(str(rid), {int(g): float(j) for g, j in joules.items()}, Method(method), bool(settled),
                       float(start), float(end), int(prompt), int(completion), Status(status),
                       None if fault is None else Fault(fault), float(host))
