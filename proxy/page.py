"""``GET /chat`` and ``GET /widget.js``: the per-chat energy page and the drop-in widget, static files
shipped in the package (``static/``), served with a strict Content-Security-Policy."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from wattgate.proxy.equivalents import EQUIVALENTS

# The page runs only its own files and talks only to this gateway: no inline script or style, no frames.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_COMMON = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-cache"}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    headers: dict[str, str]

    @functools.cached_property
    def etag(self) -> str:
        return f'"{hashlib.sha256(self.body).hexdigest()[:16]}"'

    def response(self, request: Request) -> Response:
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers={**self.headers, "etag": self.etag})
        return Response(self.body, media_type=self.media_type, headers={**self.headers, "etag": self.etag})


def _read(name: str) -> str:
    return resources.files("wattgate.proxy").joinpath(f"static/{name}").read_text("utf-8")


def static_files() -> dict[str, StaticFile]:
    """Route path -> file. The widget carries the everyday equivalents (one table with ``wattgate report``)."""
    page = {**_COMMON, "content-security-policy": PAGE_POLICY}
    # Loaded by other origins' pages: a script tag needs no CORS, a module or `crossorigin` script does.
    widget = {**_COMMON, "access-control-allow-origin": "*", "cross-origin-resource-policy": "cross-origin"}
    table = json.dumps(EQUIVALENTS)
    return {
        "/chat": StaticFile(_read("chat.html").encode(), "text/html; charset=utf-8", page),
        "/chat/chat.css": StaticFile(_read("chat.css").encode(), "text/css; charset=utf-8", page),
        "/chat/chat.js": StaticFile(_read("chat.js").encode(), "text/javascript; charset=utf-8", page),
        "/chat/icon.svg": StaticFile(_read("icon.svg").encode(), "image/svg+xml", page),
        "/widget.js": StaticFile(_read("widget.js").replace("/*EQUIVALENTS*/[]", table).encode(),
                                 "text/javascript; charset=utf-8", widget),
    }


def add_page_routes(app: FastAPI) -> None:
    """The chat page and the widget (``gateway.chat_page``)."""
    for path, file in static_files().items():

        async def serve(request: Request, file: StaticFile = file) -> Response:
            return file.response(request)

        app.add_route(path, serve, methods=["GET", "HEAD"])
