"""A fake Slack on loopback: the Web API, Socket Mode and response_url, recording every request.

Start it with `fake_slack()` and point the real SDK at `fake.base_url`, the value a user puts in
`[slack] api_base_url`. The fake runs in its own thread: every helper here may be called from a
test's event loop, and the `wait_*` helpers poll without blocking it. The payload builders at
the bottom make events shaped like Slack's, for HTTP mode (with `sign`) or for `socket_send`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from slack_sdk.signature import SignatureVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.config import WSProtocolType

from tests.servers import run_asgi

TEAM_ID, APP_ID, BOT_USER_ID, BOT_ID = "T0001", "A0001", "UBOT", "BBOT"
BOT_TOKEN, APP_TOKEN = "xoxb-test", "xapp-test"
PAYLOADS = Path(__file__).resolve().parent.parent / "adapters" / "slack" / "payloads"
# Fields of chat.postMessage/chat.update kept on the stored message; form bodies carry the
# structured ones as JSON strings.
_KEPT = (
    "thread_ts",
    "blocks",
    "attachments",
    "mrkdwn",
    "unfurl_links",
    "unfurl_media",
    "reply_broadcast",
    "metadata",
)
_JSON_FIELDS = {"blocks", "attachments", "metadata"}


def _ws_impl() -> WSProtocolType:
    # wsproto first: uvicorn's "websockets" protocol is built on websockets.legacy, deprecated
    # since websockets 14, and tests turn warnings into errors.
    if importlib.util.find_spec("wsproto"):
        return "wsproto"
    if importlib.util.find_spec("websockets"):
        return "websockets-sansio"
    return "auto"  # no WebSocket library: Socket Mode cannot work (uvicorn refuses upgrades)


WS_IMPL: WSProtocolType = _ws_impl()
T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One Web API request: what was asked, with which token, and what the fake answered."""

    method: str
    params: dict[str, Any]
    headers: dict[str, str]  # lower-case names, without Authorization
    token: str | None
    http_verb: str
    status: int
    response: dict[str, Any]
    at: float


@dataclass(frozen=True)
class Ack:
    """A Socket Mode acknowledgement: `{"envelope_id": ..., "payload"?: ...}`."""

    envelope_id: str
    payload: dict[str, Any] | None
    at: float


@dataclass(frozen=True)
class Fault:
    status: int
    error: str
    retry_after: int
    landed: bool = False  # the call took effect; only its answer is the failure


class SlackError(Exception):
    """Raised by a method handler: answered as HTTP 200 `{"ok": false, "error": ...}`."""


class FakeSlack:
    """A Slack workspace with one bot: owns the Starlette app and everything it recorded."""

    def __init__(
        self,
        *,
        team_id: str = TEAM_ID,
        app_id: str = APP_ID,
        bot_user_id: str = BOT_USER_ID,
        bot_id: str = BOT_ID,
        bot_tokens: tuple[str, ...] = (BOT_TOKEN,),
        app_tokens: tuple[str, ...] = (APP_TOKEN,),
        scopes: tuple[str, ...] | None = None,
    ) -> None:
        """`scopes`: the bot token's, sent as `x-oauth-scopes` on its answers (None: no header)."""
        self.scopes = scopes
        self.team_id, self.app_id = team_id, app_id
        self.bot_user_id, self.bot_id = bot_user_id, bot_id
        self.bot_tokens, self.app_tokens = set(bot_tokens), set(app_tokens)
        self.root = ""  # http://127.0.0.1:P, set once started
        self.users: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.add_user("U0001", "alice", "Alice Example")
        self.add_user("U0002", "bob", "Bob Example")
        self.add_user(bot_user_id, "threadbridge", "Threadbridge", is_bot=True)
        self.add_channel("C0001", "general")
        self.add_channel("D0001", is_im=True, user="U0001")
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._acks: list[Ack] = []
        self._responses: list[tuple[str, Any]] = []
        self._socket_other: list[Any] = []
        self._faults: dict[str, list[Fault | None]] = {}
        self._delays: dict[str, float] = {}  # None: answer that call normally
        self._messages: dict[tuple[str, str], dict[str, Any]] = {}  # post order
        self._seq = itertools.count(1)
        self._tickets: set[str] = set()
        self._sockets: list[WebSocket] = []
        self._socket_count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.delete": self._delete,
            "chat.getPermalink": self._permalink,
            "assistant.threads.setStatus": lambda p: {},
            "assistant.threads.setTitle": lambda p: {},
            "assistant.threads.setSuggestedPrompts": lambda p: {},
            "users.info": lambda p: {"user": self._user(p.get("user", ""))},
            "conversations.info": lambda p: {"channel": self._channel(p.get("channel", ""))},
            "conversations.replies": self._replies,
            "apps.connections.open": self._connections_open,
        }
        self.app = Starlette(
            routes=[
                Route("/api/{method}", self._api, methods=["GET", "POST"]),
                Route("/response/{id}", self._response_url, methods=["POST"]),
                WebSocketRoute("/socket", self._socket),
            ],
            lifespan=self._lifespan,
        )

    @property
    def base_url(self) -> str:
        """The Web API base URL, with its trailing slash as slack_sdk expects."""
        return f"{self.root}/api/"

    # -- state set up by tests --------------------------------------------------------------

    def add_user(
        self,
        user_id: str,
        name: str,
        real_name: str = "",
        display_name: str = "",
        *,
        is_bot: bool = False,
    ) -> None:
        real_name = real_name or name.title()
        self.users[user_id] = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": real_name,
            "deleted": False,
            "is_bot": is_bot,
            "tz": "Europe/London",
            "profile": {"real_name": real_name, "display_name": display_name or name},
        }

    def add_channel(
        self, channel_id: str, name: str = "", *, is_im: bool = False, user: str = ""
    ) -> None:
        """Register a conversation; an IM has no name in Slack, only its `user`."""
        info: dict[str, Any] = {
            "id": channel_id,
            "created": 1700000000,
            "is_archived": False,
            "is_im": is_im,
            "is_mpim": False,
            "context_team_id": self.team_id,
        }
        if is_im:
            info.update(user=user or "U0001", is_open=True)
        else:
            info.update(
                name=name or channel_id.lower(),
                is_channel=True,
                is_group=False,
                is_private=False,
                is_member=True,
            )
        self.channels[channel_id] = info

    def fail(
        self,
        method: str,
        times: int = 1,
        *,
        status: int | None = None,
        error: str | None = None,
        retry_after: int = 1,
        after: int = 0,
        landed: bool = False,
    ) -> None:
        """Answer the next `times` authorized calls to `method` with a failure, once `after`
        calls have been answered normally.

        `status=429` sends `Retry-After` and error `ratelimited`; `status=500` an HTTP 500;
        `error=...` alone the usual HTTP 200 with `"ok": false`. `landed`: the call is carried
        out all the same (a message posted), as when Slack's answer is what got lost.
        """
        if status is None and error is None:
            raise ValueError("fail() needs a status or an error")
        status = status or 200
        default = {429: "ratelimited", 200: "fatal_error"}.get(status, "internal_error")
        with self._lock:
            queue = self._faults.setdefault(method, [])
            queue.extend([None] * after)
            queue.extend(Fault(status, error or default, retry_after, landed) for _ in range(times))

    def slow(self, method: str, seconds: float) -> None:
        """Answer every later call to `method` only after `seconds` (0: at once again)."""
        with self._lock:
            self._delays[method] = seconds

    # -- what was recorded ------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    @property
    def acks(self) -> list[Ack]:
        with self._lock:
            return list(self._acks)

    @property
    def responses(self) -> list[tuple[str, Any]]:
        """(response_url id, JSON body) of every POST to a response_url, in order."""
        with self._lock:
            return list(self._responses)

    @property
    def socket_other(self) -> list[Any]:
        """What clients sent over the socket that was not an ack (slack_sdk sends nothing else)."""
        with self._lock:
            return list(self._socket_other)

    @property
    def socket_connections(self) -> int:
        """How many Socket Mode connections were accepted so far."""
        with self._lock:
            return self._socket_count

    def posted(
        self, channel: str | None = None, thread_ts: str | None = None
    ) -> list[dict[str, Any]]:
        """The bot's messages as they stand now (edits applied, deletions gone), in post order.

        `thread_ts` selects the replies carrying that `thread_ts`, not the thread's root.
        """
        with self._lock:
            found = [dict(m) for m in self._messages.values() if not m.get("deleted")]
        return [
            m
            for m in found
            if (channel is None or m["channel"] == channel)
            and (thread_ts is None or m.get("thread_ts") == thread_ts)
        ]

    def texts(self, channel: str | None = None, thread_ts: str | None = None) -> list[str]:
        return [m.get("text", "") for m in self.posted(channel, thread_ts)]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait until `method` was called `count` times (failed calls count too)."""
        return await _poll(lambda: self.calls_to(method), count, timeout, f"{count} {method}")

    async def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> Ack:
        def found() -> list[Ack]:
            return [a for a in self.acks if a.envelope_id == envelope_id]

        return (await _poll(found, 1, timeout, f"ack of {envelope_id}"))[0]

    async def wait_connections(self, count: int, timeout: float = 5.0) -> None:
        """Wait until `count` Socket Mode connections were accepted in all."""

        def seen() -> list[int]:
            return list(range(self.socket_connections))

        await _poll(seen, count, timeout, f"{count} socket connections")

    # -- Socket Mode, driven from the test's loop -------------------------------------------

    async def socket_send(
        self,
        payload_type: str,
        payload: dict[str, Any],
        *,
        accepts_response_payload: bool | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Send an envelope (`events_api`, `slash_commands`, `interactive`) to every client.

        Waits up to `timeout` for a client to be connected; returns the envelope id.
        """
        await _poll(self._open_sockets, 1, timeout, "an open Socket Mode connection")
        envelope_id = str(uuid.uuid4())
        if accepts_response_payload is None:
            accepts_response_payload = payload_type == "slash_commands"
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id,
            "payload": payload,
            "type": payload_type,
            "accepts_response_payload": accepts_response_payload,
        }
        if payload_type == "events_api":
            envelope.update(retry_attempt=0, retry_reason="")
        await self._broadcast(envelope)
        return envelope_id

    async def socket_disconnect(self, reason: str = "refresh_requested") -> None:
        """Ask every client to reconnect, as Slack does before it recycles a connection.

        The client closes this socket and opens another through apps.connections.open: wait
        for it with `wait_connections` before sending the next envelope.
        """
        await self._broadcast(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}
        )

    def _open_sockets(self) -> list[WebSocket]:
        with self._lock:
            return list(self._sockets)

    async def _broadcast(self, message: dict[str, Any]) -> None:
        assert self._loop is not None, "the fake is not started"
        text = json.dumps(message)
        sent = asyncio.run_coroutine_threadsafe(self._send_all(text), self._loop)
        await asyncio.wrap_future(sent)

    async def _send_all(self, text: str) -> None:
        for socket in self._open_sockets():
            try:
                await socket.send_text(text)
            except Exception:  # closed under us: the client is reconnecting
                self._drop(socket)

    def _drop(self, socket: WebSocket) -> None:
        with self._lock:
            if socket in self._sockets:
                self._sockets.remove(socket)

    # -- the server side --------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        yield

    async def _api(self, request: Request) -> JSONResponse:
        method = request.path_params["method"]
        params = await _read_params(request)
        with self._lock:
            delay = self._delays.get(method, 0.0)
        if delay:
            await asyncio.sleep(delay)
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        token = token or params.pop("token", None)
        status, body, headers = self._answer(method, params, token)
        if self.scopes is not None and token in self.bot_tokens:
            headers = {**headers, "x-oauth-scopes": ",".join(self.scopes)}
        call = Call(
            method=method,
            params=params,
            token=token,
            http_verb=request.method,
            status=status,
            headers={k: v for k, v in request.headers.items() if k != "authorization"},
            response=body,
            at=time.time(),
        )
        with self._lock:
            self._calls.append(call)
        return JSONResponse(body, status_code=status, headers=headers)

    def _answer(
        self, method: str, params: dict[str, Any], token: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        handler = self._methods.get(method)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method"}, {}
        if not token:
            return 200, {"ok": False, "error": "not_authed"}, {}
        kind = "bot" if token in self.bot_tokens else "app" if token in self.app_tokens else None
        if kind is None:
            return 200, {"ok": False, "error": "invalid_auth"}, {}
        if kind != ("app" if method == "apps.connections.open" else "bot"):
            return 200, {"ok": False, "error": "not_allowed_token_type"}, {}
        with self._lock:
            queue = self._faults.get(method)
            fault = queue.pop(0) if queue else None
        if fault is not None:
            if fault.landed:
                with contextlib.suppress(SlackError):
                    handler(params)
            headers = {"Retry-After": str(fault.retry_after)} if fault.status == 429 else {}
            return fault.status, {"ok": False, "error": fault.error}, headers
        try:
            return 200, {"ok": True, **handler(params)}, {}
        except SlackError as e:
            return 200, {"ok": False, "error": str(e)}, {}

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.test/",
            "team": "Fake Team",
            "user": "threadbridge",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        if not channel:
            raise SlackError("channel_not_found")
        if not any(params.get(k) for k in ("text", "blocks", "attachments")):
            raise SlackError("no_text")
        with self._lock:
            ts = self._next_ts()
            message: dict[str, Any] = {
                "type": "message",
                "channel": channel,
                "user": self.bot_user_id,
                "bot_id": self.bot_id,
                "app_id": self.app_id,
                "team": self.team_id,
                "ts": ts,
                "text": params.get("text", ""),
            }
            message.update(_kept(params))
            self._messages[(channel, ts)] = message
            return {"channel": channel, "ts": ts, "message": _public(message)}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = params.get("channel", ""), params.get("ts", "")
        with self._lock:
            message = self._messages.get((channel, ts))
            if message is None or message.get("deleted"):
                raise SlackError("message_not_found")
            if "text" in params:
                message["text"] = params["text"]
            message.update(_kept(params))
            message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
            return {
                "channel": channel,
                "ts": ts,
                "text": message["text"],
                "message": _public(message),
            }

    def _delete(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = params.get("channel", ""), params.get("ts", "")
        with self._lock:
            message = self._messages.get((channel, ts))
            if message is None or message.get("deleted"):
                raise SlackError("message_not_found")
            message["deleted"] = True
        return {"channel": channel, "ts": ts}

    def _replies(self, params: dict[str, Any]) -> dict[str, Any]:
        """conversations.replies over the messages the fake holds (the bot's: what people
        write is not kept), the thread's root first, `limit` a page with a cursor to the next;
        `metadata` only with `include_all_metadata`, as Slack does."""
        channel, ts = params.get("channel", ""), params.get("ts", "")
        if not channel:
            raise SlackError("channel_not_found")
        if not ts:
            raise SlackError("thread_not_found")
        limit = max(1, min(int(params.get("limit") or 1000), 1000))
        metadata = str(params.get("include_all_metadata", "")).lower() in ("1", "true")
        with self._lock:
            thread = [
                _public(m)
                for m in self._messages.values()
                if m["channel"] == channel
                and not m.get("deleted")
                and ts in (m["ts"], m.get("thread_ts"))
            ]
        thread.sort(key=lambda m: float(m["ts"]))
        start = _cursor_start(params.get("cursor"), thread)
        page, rest = thread[start : start + limit], thread[start + limit :]
        if not metadata:
            page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]
        after = "next_ts:" + rest[0]["ts"] if rest else ""
        return {
            "messages": page,
            "has_more": bool(rest),
            "response_metadata": {"next_cursor": base64.b64encode(after.encode()).decode()},
        }

    def _permalink(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = params.get("channel", ""), params.get("message_ts", "")
        if not channel or not ts:
            raise SlackError("message_not_found")
        link = f"https://fake.slack.test/archives/{channel}/p{ts.replace('.', '')}"
        return {"channel": channel, "permalink": link}

    def _user(self, user_id: str) -> dict[str, Any]:
        if not user_id:
            raise SlackError("user_not_found")
        if user_id not in self.users:  # any id resolves: tests need not register everyone
            self.add_user(user_id, user_id.lower())
        return self.users[user_id]

    def _channel(self, channel_id: str) -> dict[str, Any]:
        if not channel_id:
            raise SlackError("channel_not_found")
        if channel_id not in self.channels:
            self.add_channel(channel_id, is_im=channel_id.startswith("D"))
        return self.channels[channel_id]

    def _connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        ticket = str(uuid.uuid4())
        with self._lock:
            self._tickets.add(ticket)
        ws_root = self.root.replace("http://", "ws://", 1)
        return {"url": f"{ws_root}/socket?ticket={ticket}&app_id={self.app_id}"}

    def _next_ts(self) -> str:
        n = next(self._seq)  # 1700000000.000100, .000200, ...: unique and increasing
        return f"{1700000000 + n // 10000}.{n % 10000 * 100:06d}"

    async def _response_url(self, request: Request) -> PlainTextResponse:
        body = await request.body()
        with self._lock:
            self._responses.append((request.path_params["id"], json.loads(body or b"null")))
        return PlainTextResponse("ok")

    def new_response_url(self) -> str:
        return f"{self.root}/response/{uuid.uuid4().hex}"

    def slash_command(
        self, command: str = "/agent", text: str = "", **fields: str
    ) -> dict[str, str]:
        """`slash_command(...)` whose response_url points at this fake."""
        return slash_command(command, text, response_url=self.new_response_url(), **fields)

    async def _socket(self, socket: WebSocket) -> None:
        if socket.query_params.get("ticket") not in self._tickets:
            await socket.close(code=1008)  # before accept: the handshake gets HTTP 403
            return
        await socket.accept()
        with self._lock:
            self._sockets.append(socket)
            self._socket_count += 1
            hello = {
                "type": "hello",
                "num_connections": len(self._sockets),
                "debug_info": {
                    "host": "fake-slack",
                    "build_number": 1,
                    "approximate_connection_time": 18060,
                },
                "connection_info": {"app_id": self.app_id},
            }
        try:
            await socket.send_json(hello)
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                self._on_socket_message(
                    message.get("text") or (message.get("bytes") or b"").decode()
                )
        finally:
            self._drop(socket)

    def _on_socket_message(self, text: str) -> None:
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        with self._lock:
            if isinstance(data, dict) and "envelope_id" in data:
                self._acks.append(Ack(data["envelope_id"], data.get("payload"), time.time()))
            else:
                self._socket_other.append(data)


@contextmanager
def fake_slack(**options: Any) -> Iterator[FakeSlack]:
    """A started `FakeSlack` (options go to its constructor); stopped on exit."""
    fake = FakeSlack(**options)
    with run_asgi(fake.app, ws=WS_IMPL) as root:
        fake.root = root
        yield fake


async def _poll(found: Callable[[], list[T]], count: int, timeout: float, what: str) -> list[T]:
    deadline = time.monotonic() + timeout
    while len(items := found()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fake Slack: no {what} within {timeout}s (saw {len(items)})")
        await asyncio.sleep(0.01)
    return items


async def _read_params(request: Request) -> dict[str, Any]:
    """Query string, then the body: JSON or form-encoded (multipart uploads are not handled)."""
    params: dict[str, Any] = dict(request.query_params)
    body = await request.body()
    if body:
        if request.headers.get("content-type", "").startswith("application/json"):
            parsed = json.loads(body)
            params.update(parsed if isinstance(parsed, dict) else {"_body": parsed})
        else:
            params.update(parse_qsl(body.decode(), keep_blank_values=True))
    return params


def _kept(params: dict[str, Any]) -> dict[str, Any]:
    kept = {k: params[k] for k in _KEPT if k in params}
    for key in _JSON_FIELDS & kept.keys():
        if isinstance(kept[key], str) and kept[key][:1] in "[{":
            kept[key] = json.loads(kept[key])
    return kept


def _cursor_start(cursor: Any, thread: list[dict[str, Any]]) -> int:
    """Where a conversations.replies cursor (base64 of `next_ts:TS`) points in `thread`."""
    if not cursor:
        return 0
    try:
        after = base64.b64decode(str(cursor), validate=True).decode().removeprefix("next_ts:")
        float(after)
    except ValueError:
        raise SlackError("invalid_cursor") from None
    return next((i for i, m in enumerate(thread) if float(m["ts"]) >= float(after)), len(thread))


def _public(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k not in ("channel", "deleted")}


# -- signed HTTP requests and payloads ---------------------------------------------------------


def sign(body: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """The `X-Slack-Request-Timestamp` and `X-Slack-Signature` headers Slack sends with `body`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature}


def load_payload(name: str) -> dict[str, Any]:
    """A recorded payload from tests/adapters/slack/payloads, by file stem."""
    data: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    return data


_ts_seq = itertools.count(1)


def new_ts() -> str:
    """A message ts near now, unique in this process."""
    return f"{int(time.time())}.{next(_ts_seq) % 1_000_000:06d}"


def rich_text(text: str) -> list[dict[str, Any]]:
    """The `rich_text` block Slack's clients attach to what a person types."""
    elements: list[dict[str, Any]] = []
    for i, part in enumerate(re.split(r"<@([UW][A-Z0-9]+)>", text)):
        if i % 2:
            elements.append({"type": "user", "user_id": part})
        elif part:
            elements.append({"type": "text", "text": part})
    section = {"type": "rich_text_section", "elements": elements}
    return [{"type": "rich_text", "block_id": uuid.uuid4().hex[:5], "elements": [section]}]


def event_callback(
    event: dict[str, Any],
    team_id: str = TEAM_ID,
    event_id: str | None = None,
    *,
    api_app_id: str = APP_ID,
    bot_user_id: str = BOT_USER_ID,
) -> dict[str, Any]:
    """The Events API envelope around `event`, as POSTed to /slack/events or in `events_api`."""
    return {
        "token": "verification-token",
        "team_id": team_id,
        "api_app_id": api_app_id,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(),
        "event_time": int(float(event.get("event_ts") or time.time())),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": team_id,
                "user_id": bot_user_id,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-" + uuid.uuid4().hex,
    }


def app_mention(
    text: str,
    channel: str = "C0001",
    user: str = "U0001",
    ts: str | None = None,
    thread_ts: str | None = None,
    *,
    team: str = TEAM_ID,
) -> dict[str, Any]:
    """An `app_mention` event; `thread_ts` when the mention is a reply in a thread."""
    ts = ts or new_ts()
    event: dict[str, Any] = {
        "client_msg_id": str(uuid.uuid4()),
        "type": "app_mention",
        "text": text,
        "user": user,
        "ts": ts,
        "team": team,
        "blocks": rich_text(text),
        "channel": channel,
        "event_ts": ts,
    }
    if thread_ts:
        event.update(thread_ts=thread_ts, parent_user_id=user)
    return event


def message(
    text: str,
    channel: str = "C0001",
    user: str = "U0001",
    ts: str | None = None,
    thread_ts: str | None = None,
    channel_type: str = "channel",
    subtype: str | None = None,
    bot_id: str | None = None,
    files: list[dict[str, Any]] | None = None,
    *,
    team: str = TEAM_ID,
) -> dict[str, Any]:
    """A `message` event: a person's, a bot's (`bot_id`), or one with `files` (file_share)."""
    ts = ts or new_ts()
    event: dict[str, Any] = {"type": "message", "text": text, "user": user, "ts": ts, "team": team}
    if bot_id:
        event.update(
            bot_id=bot_id,
            bot_profile={
                "id": bot_id,
                "app_id": "A0BOT",
                "name": "a bot",
                "deleted": False,
                "team_id": team,
            },
        )
    else:
        event.update(client_msg_id=str(uuid.uuid4()), blocks=rich_text(text))
    if files is not None:
        event.update(files=files, upload=False, display_as_bot=False)
        subtype = subtype or "file_share"
    if subtype:
        event["subtype"] = subtype
    if subtype == "bot_message":  # a classic bot's message: a username, no user
        event["username"] = event.pop("user")
    if thread_ts:
        event.update(thread_ts=thread_ts, parent_user_id=user)
    event.update(channel=channel, event_ts=ts, channel_type=channel_type)
    return event


def slash_command(
    command: str = "/agent",
    text: str = "",
    user_id: str = "U0001",
    channel_id: str = "C0001",
    team_id: str = TEAM_ID,
    *,
    response_url: str = "https://hooks.slack.com/commands/T0001/1/x",
    channel_name: str = "general",
    user_name: str = "alice",
) -> dict[str, str]:
    """A slash command's form fields, as Slack POSTs them (or sends them in `slash_commands`)."""
    return {
        "token": "verification-token",
        "team_id": team_id,
        "team_domain": "fake",
        "channel_id": channel_id,
        "channel_name": channel_name,
        "user_id": user_id,
        "user_name": user_name,
        "command": command,
        "text": text,
        "api_app_id": APP_ID,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": f"{next(_ts_seq)}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex[:32]}",
    }


def assistant_thread_started(
    channel: str = "D0001",
    user: str = "U0001",
    thread_ts: str | None = None,
    *,
    context_channel: str | None = "C0001",
    team: str = TEAM_ID,
) -> dict[str, Any]:
    """`assistant_thread_started`: a person opened the assistant pane (a thread in their DM)."""
    context: dict[str, Any] = {"enterprise_id": None}
    if context_channel:
        context.update(channel_id=context_channel, team_id=team)
    return {
        "type": "assistant_thread_started",
        "assistant_thread": {
            "user_id": user,
            "context": context,
            "channel_id": channel,
            "thread_ts": thread_ts or new_ts(),
        },
        "event_ts": new_ts(),
    }
