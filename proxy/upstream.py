"""The upstream leg: one pooled aiohttp session for every call to the model servers.

aiohttp, not httpx: relaying token streams is the gateway's hot path, and httpx
reads a chunked body through h11, a pure-Python parser, while aiohttp parses
with llhttp in C: a bare relay's upstream read costs about 150 us of CPU per
chunk more with httpx (bench/RESULTS.md, "Where a relayed chunk's CPU goes"). LiteLLM made the same
switch (aiohttp is its default transport) for the same reason.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

# What a call to the upstream may raise: TimeoutError for a connect or read
# timeout (aiohttp's own timeout errors subclass it), ClientError for the rest.
ERRORS = (TimeoutError, aiohttp.ClientError)

Response = aiohttp.ClientResponse


# Upstream response headers that callers act on, passed through: rate limits and retry hints
# (the OpenAI SDKs time their retries by retry-after / retry-after-ms), and the upstream's own id.
_PASSED = ("retry-after", "retry-after-ms", "x-ratelimit-", "openai-processing-ms")


def passed_headers(response: Response) -> dict[str, str]:
    out = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith(_PASSED)}
    if "x-request-id" in response.headers:
        out["x-upstream-request-id"] = response.headers["x-request-id"]
    return out


def describe(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__


class UpstreamClient:
    """The session; opened inside the event loop (``open``) and closed at shutdown.

    Timeouts follow the registry: ``connect_s`` bounds getting a connection,
    ``read_s`` the wait for each next byte, the first token included; ``keepalive_s`` how long
    a pooled connection may wait idle for its next request.
    """

    def __init__(self, connect_s: float, read_s: float, max_connections: int, keepalive_s: float) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s, sock_read=read_s)
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[URL, dict[str, Any]] = {}

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                           keepalive_timeout=self.keepalive_s),
            timeout=self.timeout,
            # One session serves every caller: a cookie an upstream sets for one must not go to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session used outside the app's lifespan")
        return self._session

    def _proxy(self, url: str) -> dict[str, Any]:
        """HTTP(S)_PROXY / NO_PROXY for ``url``'s origin, as httpx, requests and curl honour them.

        Looked up once per origin: aiohttp's ``trust_env`` does it per request,
        reading the environment and ~/.netrc each time (bench/RESULTS.md, "Gateway overhead").
        """
        parsed = URL(url)
        origin = parsed.origin()
        found = self._proxies.get(origin)
        if found is None:
            try:
                proxy, auth = get_env_proxy_for_url(parsed)
                found = {"proxy": proxy, "proxy_auth": auth}
            except LookupError:
                found = {}
            self._proxies[origin] = found
        return found

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """The response with its body unread: the caller reads it, then ``release``s or ``close``s it."""
        return await self.session.post(url, data=body, headers=headers, allow_redirects=False, **self._proxy(url))

    async def get(self, url: str, headers: dict[str, str] | None = None, timeout_s: float | None = None) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else self.timeout
        async with self.session.get(url, headers=headers, timeout=timeout, **self._proxy(url)) as r:
            return r.status, await r.read()
