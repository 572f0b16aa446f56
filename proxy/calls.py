"""The seam between the HTTP side and the meter: a call's window (:class:`CallWindow`), where calls
are opened (:class:`CallOpener`: the books of this process, or a worker's link to the hub) and the
request ids that name them."""

from __future__ import annotations

import re
import uuid
from typing import Any, Protocol

from wattgate.meter import Method, Status

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class CallWindow(Protocol):
    """One call's window and record, wherever the meter runs (this process or the hub)."""

    request_id: str  # as the client knows it
    key: str  # the record's key: unique across teams

    @property
    def method(self) -> Method:
        """How the call is metered, as far as is known while it runs (a stream's header says it)."""
        ...

    def tokens(self, n: float = 1) -> None:
        """``n`` tokens arrived now (streams)."""
        ...

    def completed(self, n: int) -> None:
        """A plain response's ``n`` tokens, whose arrival times the gateway cannot see."""
        ...

    def usage(self, prompt_tokens: object, completion_tokens: object) -> None:
        """The upstream's usage report; what is not a count is ignored."""
        ...

    def end(self, status: Status) -> None:
        """Close the window (the first call only) and count the call; never raises."""
        ...

    async def energy(self) -> dict[str, Any]:
        """The ``energy`` object of the ended call (provisional unless already final)."""
        ...


def new_request_id() -> str:
    return f"wg-{uuid.uuid4().hex}"


def request_id_from(given: str) -> str:
    """A client's ``x-request-id`` when it can name a record, else a new id. "." and "..": a URL path
    cannot carry them (clients normalise them away), so the record could not be fetched."""
    return given if _REQUEST_ID.fullmatch(given) and given.strip(".") else new_request_id()


class CallOpener(Protocol):
    """Where calls are metered: :class:`~proxy.books.Books`, or a worker's link to the hub."""

    async def open(self, request_id: str, client_chose: bool, name: str, team: str | None,
                   prompt_tokens: int) -> CallWindow: ...

    def observe_loop_lag(self, seconds: float) -> None: ...
