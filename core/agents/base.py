"""The agent-service seam, and the HTTP policy every remote service shares.

A service is told about a conversation once (`open`, stateful services only) and then asked to
`respond` to new turns. Retry, backoff and error mapping live here once, above the I/O, so each
service module holds only its wire format.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from json import dumps, loads
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from core.errors import AgentRejected, AgentServiceError, AgentUnavailable
from core.logs import trace_headers
from core.model import Conversation, ToolCall, Turn

if TYPE_CHECKING:
    # Imported where it is used: aiohttp takes ~0.15 s to import, and a bridge with only
    # built-in agents never needs it (start-up is benchmark 7).
    import aiohttp

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AgentResponse:
    """What one call to a service produced."""

    turns: list[Turn] = field(default_factory=list)  # agent messages to store, in order
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls for the bridge to run
    remote_id: str | None = None  # the service's id for the conversation, when it made one
    state: dict[str, Any] | None = None  # opaque service state to send back next time

    @property
    def visible(self) -> list[str]:
        """The texts to show the user: agent turns not marked hidden."""
        return [t.content for t in self.turns if t.role == "agent" and not t.hidden and t.content]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One step of a streamed reply: the text so far, and on the last event the whole answer."""

    text: str
    response: AgentResponse | None = None

    @property
    def done(self) -> bool:
        return self.response is not None


class AgentService(Protocol):
    """An agent platform the bridge can talk to."""

    name: str
    stateful: bool

    async def open(self, conversation: Conversation) -> str | None:
        """Create the conversation at the service; return its id (None when stateless)."""
        ...

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send `new` turns (stateless services also get `history`) and return the answer."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class StreamingService(AgentService, Protocol):
    """A service that can also stream its answer as it is written (`streaming` is on)."""

    streaming: bool

    def stream(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AsyncGenerator[StreamEvent, None]:
        """Events with the text so far; the last one carries the whole AgentResponse."""
        ...


class AgentConfigBase(BaseModel):
    """Keys every agent takes, whatever its service."""

    model_config = ConfigDict(extra="forbid")

    service: str
    memory: int = Field(
        default=50, ge=1, description="turns of history a stateless service is sent"
    )
    tools: list[str] = Field(
        default_factory=list, description="names of the [tools.NAME] the agent may call"
    )


class HttpAgentConfig(AgentConfigBase):
    """Keys of every agent reached over HTTP."""

    base_url: str
    api_key_env: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=3, ge=0, description="extra attempts after a retryable failure")
    backoff_s: float = Field(default=1.0, ge=0, description="first backoff; doubles, with jitter")
    max_backoff_s: float = Field(default=30.0, ge=0)
    max_connections: int = Field(default=100, ge=1)


def env_secret(name: str | None) -> str:
    """The value of the environment variable `name` ('' when unnamed or unset)."""
    return os.environ.get(name, "") if name else ""


def retry_after_seconds(value: str | None) -> float | None:
    """Read a Retry-After header: seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# An idle connection is dropped after this, before servers that close theirs at 5 s (uvicorn's
# default: vLLM, LiteLLM) do; a call sent on a connection the server is closing would fail.
KEEPALIVE_S = 4.0
DNS_TTL_S = 10  # a host's addresses are looked up again for new connections after this


# Read once per client: aiohttp's own trust_env looks the proxy up in a thread on every request.
def env_proxy(url: str) -> str | None:
    """The proxy HTTP_PROXY / HTTPS_PROXY name for `url`, unless NO_PROXY exempts its host."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


def tls_context() -> ssl.SSLContext:
    """Check servers against certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set (what the
    agent clients have always trusted, whatever the system's store holds)."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


@dataclass(frozen=True, slots=True)
class HttpReply:
    """An answer read whole."""

    status: int
    reason: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class HttpAgentService:
    """Base of the HTTP clients: one pooled aiohttp session, retries, and error mapping."""

    stateful: bool = False

    def __init__(self, name: str, config: HttpAgentConfig, headers: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self._headers = headers
        self._root = config.base_url.rstrip("/")  # its path is a prefix: /v1 + /chat/completions
        self._http: aiohttp.ClientSession | None = None  # made on the running loop, first call
        self._closed = False
        self._proxy = env_proxy(self._root)
        self._in_flight = 0  # calls waiting for, or holding, a connection

    def _session(self) -> aiohttp.ClientSession:
        if self._http is not None:
            return self._http
        if self._closed:
            raise RuntimeError(f"agent {self.name}: the client is closed")
        import aiohttp

        config = self.config
        # One pool: aiohttp hands out free connections from a queue, so the work per call stays
        # flat with hundreds open (bench 3: 300 calls in flight add ~2 ms, p99 under 20 ms).
        connector = aiohttp.TCPConnector(
            limit=config.max_connections,
            limit_per_host=0,  # every call goes to base_url's host: `limit` is the cap
            keepalive_timeout=KEEPALIVE_S,
            ttl_dns_cache=DNS_TTL_S,
            ssl=tls_context() if self._root.lower().startswith("https:") else True,
        )
        self._http = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # Connecting, and each wait for bytes from the service, within timeout_s; a call
            # waiting for a free connection waits its turn instead of failing under load.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=config.timeout_s, sock_read=config.timeout_s
            ),
            # A cookie the service sets (a load balancer's affinity) comes back on later calls.
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )
        return self._http

    async def aclose(self) -> None:
        self._closed = True
        if self._http is not None:
            await self._http.close()

    async def _open(
        self, method: str, path: str, *, json: Any, params: dict[str, Any] | None
    ) -> aiohttp.ClientResponse:
        """Send a call and read its status line and headers; the body is the caller's to read
        and the response theirs to release."""
        headers = trace_headers()  # every call carries its message's trace id (X-Trace-Id)
        data = None
        if json is not None:
            data = _json_bytes(json)
            headers["Content-Type"] = "application/json"
        return await self._session().request(
            method,
            self._root + (path if path.startswith("/") else f"/{path}"),
            params=_query(params) if params else None,
            data=data,
            headers=headers,
            allow_redirects=False,  # a redirect is an answer like any other (not JSON)
            proxy=self._proxy,
        )

    async def _send(
        self, method: str, path: str, *, json: Any, params: dict[str, Any] | None
    ) -> HttpReply:
        self._in_flight += 1
        try:
            return await read_whole(await self._open(method, path, json=json, params=params))
        finally:
            self._in_flight -= 1

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Make one call, retrying what is worth retrying; return the decoded JSON body."""
        attempt = 0
        while True:
            try:
                return await self._request_once(method, path, json=json, params=params)
            except AgentUnavailable as exc:
                if attempt >= self.config.retries:
                    raise
                if exc.retry_after is not None and exc.retry_after > self.config.max_backoff_s:
                    raise  # the service asks for a longer wait than a person should sit through
                delay = self._backoff(attempt, exc.retry_after)
                log.warning(
                    "agent %s: %s %s failed (%s); retry %d/%d in %.2fs",
                    self.name,
                    method,
                    path,
                    exc,
                    attempt + 1,
                    self.config.retries,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        base: float = min(self.config.backoff_s * (2**attempt), self.config.max_backoff_s)
        return base * (0.5 + random.random() / 2)

    async def _request_once(
        self, method: str, path: str, *, json: Any, params: dict[str, Any] | None
    ) -> Any:
        import aiohttp

        try:
            response = await self._send(method, path, json=json, params=params)
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:  # no scheme, or host
            raise AgentRejected(f"base_url {self.config.base_url!r} is not an http(s) URL") from exc
        except TimeoutError as exc:  # before aiohttp's ClientError: its timeouts are both
            raise AgentUnavailable(f"timed out after {self.config.timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise AgentUnavailable(f"cannot reach {self.config.base_url}: {why(exc)}") from exc
        status = response.status
        if status == 429 or status >= 500:
            raise AgentUnavailable(
                f"HTTP {status}: {_detail(response)}",
                status=status,
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        if status >= 400:
            raise AgentRejected(f"HTTP {status}: {_detail(response)}", status=status)
        try:
            return loads(response.body)
        except ValueError as exc:
            raise AgentUnavailable(f"HTTP {status} with a body that is not JSON") from exc


async def read_whole(response: aiohttp.ClientResponse) -> HttpReply:
    """Read a response to its end and release it (its connection goes back to the pool)."""
    try:
        body = await response.read()
    finally:
        response.release()
    return HttpReply(response.status, response.reason or "", response.headers, body)


def why(exc: BaseException) -> str:
    """An aiohttp error in words. Never its repr: that shows the request's headers (the key)."""
    return f"{type(exc).__name__}: {exc}"


def _json_bytes(body: Any) -> bytes:
    # Compact UTF-8; NaN is refused (JSON has no word for it).
    return dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _query(params: dict[str, Any]) -> dict[str, str]:
    # aiohttp refuses booleans and None as query values: "true"/"false" and "" instead.
    return {
        key: "true"
        if value is True
        else "false"
        if value is False
        else ""
        if value is None
        else str(value)
        for key, value in params.items()
    }


def _detail(response: HttpReply) -> str:
    """The service's own words for an error, kept short (and never our request headers)."""
    try:
        body = loads(response.body)
    except ValueError:
        return response.body.decode("utf-8", "replace")[:200] or response.reason
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if key in body:
                return str(body[key])[:200]
    return str(body)[:200]


def require(body: Any, kind: type, what: str) -> Any:
    """Check a decoded body's shape, or raise AgentServiceError naming what was expected."""
    if not isinstance(body, kind):
        raise AgentServiceError(f"expected {what}, got {type(body).__name__}")
    return body
