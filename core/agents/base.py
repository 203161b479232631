"""The agent-service seam, and the HTTP policy every remote service shares.

A service is told about a conversation once (`open`, stateful services only) and then asked to
`respond` to new turns. Retry, backoff and error mapping live here once, above the I/O, so each
service module holds only its wire format.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field

from core.errors import AgentRejected, AgentServiceError, AgentUnavailable
from core.logs import trace_headers
from core.model import Conversation, ToolCall, Turn

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


# httpcore walks every connection of a pool, with a syscall or two each, on every request;
# with hundreds of connections in one pool that stalled the event loop for up to 0.45 s.
# Several small pools, each request sent through the least busy, keep that walk short.
POOL_SHARD = 32


class HttpAgentService:
    """Base of the HTTP clients: pooled httpx clients, retries, and error mapping."""

    stateful: bool = False

    def __init__(self, name: str, config: HttpAgentConfig, headers: dict[str, str]) -> None:
        self.name = name
        self.config = config
        shards = math.ceil(config.max_connections / POOL_SHARD)
        size = math.ceil(config.max_connections / shards)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        # pool=None: a call waits its turn for a connection instead of failing under load.
        timeout = httpx.Timeout(config.timeout_s, pool=None)
        self._pools = [
            httpx.AsyncClient(
                base_url=config.base_url.rstrip("/"),
                headers=headers,
                limits=limits,
                timeout=timeout,
                event_hooks={"request": [_send_trace]},
            )
            for _ in range(shards)
        ]
        self._in_flight = [0] * shards

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()

    async def _send(
        self, method: str, path: str, *, json: Any, params: dict[str, Any] | None
    ) -> httpx.Response:
        index = min(range(len(self._pools)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            return await self._pools[index].request(method, path, json=json, params=params)
        finally:
            self._in_flight[index] -= 1

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
        try:
            response = await self._send(method, path, json=json, params=params)
        except httpx.UnsupportedProtocol as exc:
            raise AgentRejected(f"base_url {self.config.base_url!r} is not an http(s) URL") from exc
        except httpx.TimeoutException as exc:
            raise AgentUnavailable(f"timed out after {self.config.timeout_s:g}s") from exc
        except httpx.TransportError as exc:
            raise AgentUnavailable(f"cannot reach {self.config.base_url}: {exc!r}") from exc
        status = response.status_code
        if status == 429 or status >= 500:
            raise AgentUnavailable(
                f"HTTP {status}: {_detail(response)}",
                status=status,
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        if status >= 400:
            raise AgentRejected(f"HTTP {status}: {_detail(response)}", status=status)
        try:
            return response.json()
        except ValueError as exc:
            raise AgentUnavailable(f"HTTP {status} with a body that is not JSON") from exc


async def _send_trace(request: httpx.Request) -> None:
    """Every call carries the trace id of the message it serves (X-Trace-Id), when there is one."""
    request.headers.update(trace_headers())


def _detail(response: httpx.Response) -> str:
    """The service's own words for an error, kept short (and never our request headers)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
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
