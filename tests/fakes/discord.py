"""A fake Discord on loopback: REST API v10 and the gateway, recording every request.

Start it with `fake_discord()` and point discord.py at it (both settings are process-global:
restore them after the test)::

    discord.http.Route.BASE = fake.api_base_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

The world: one bot (whose user id is also the application id), one guild with the text channel
#general and an open thread in it, Alice, Bob and another bot as members, and Alice's DM with the
bot. The fake runs in its own thread: every helper may be called from a test's event loop, and
the `wait_*` helpers poll without blocking it. The builders (`guild_message`, `thread_message`,
`dm_message`, `bot_message`, `interaction`) return event data shaped like the recorded frames in
tests/adapters/discord/payloads; hand them to `dispatch`. The gateway is in `discord_gateway`.
"""

from __future__ import annotations

import asyncio
import copy
import email.parser
import email.policy
import hashlib
import json
import math
import mimetypes
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from tests.fakes.discord_gateway import Gateway, Resume
from tests.fakes.slack import WS_IMPL
from tests.servers import run_asgi

Json = dict[str, Any]
T = TypeVar("T")
PAYLOADS = Path(__file__).resolve().parent.parent / "adapters" / "discord" / "payloads"


def load_payload(name: str) -> Json:
    """A recorded gateway frame `{"t", "s", "op", "d"}` from tests/adapters/discord/payloads."""
    data: Json = json.loads((PAYLOADS / f"{name}.json").read_text())
    return data


_GUILD: Json = load_payload("guild_create")["d"]
_READY: Json = load_payload("ready")["d"]
_USERS: dict[str, Json] = {m["user"]["id"]: m["user"] for m in _GUILD["members"]}
BOT_ID, APPLICATION_ID = int(_READY["user"]["id"]), int(_READY["application"]["id"])
GUILD_ID, THREAD_ID = int(_GUILD["id"]), int(_GUILD["threads"][0]["id"])
CHANNEL_ID, DM_CHANNEL_ID = int(_GUILD["channels"][0]["id"]), 1100000000000000030
BOT_USER = _USERS[str(BOT_ID)]
ALICE, BOB, OTHER_BOT = (
    _USERS[u] for u in ("1300000000000000001", "1300000000000000002", "1300000000000000009")
)
BOT_TOKEN = "MTIwMDAwMDAwMDAwMDAwMDAwMQ.GfAkE1.threadbridge-fake-discord-token-000000000000"
EVERYONE_PERMISSIONS = _GUILD["roles"][0]["permissions"]
TEXT_LIMIT, THREAD_NAME_LIMIT = 2000, 100
DISCORD_EPOCH = 1420070400000
# Application flags, "limited" variants (a bot in fewer than 100 servers), per privileged intent.
_INTENT_FLAGS = {"presences": 1 << 13, "members": 1 << 15, "message_content": 1 << 19}
_COMMAND_BADGE = 1 << 23
_ERRORS = {
    400: "400: Bad Request",
    401: "401: Unauthorized",
    403: "Missing Permissions",
    404: "404: Not Found",
    405: "405: Method Not Allowed",
    500: "500: Internal Server Error",
}
_OPTION_TYPES = {str: 3, int: 4, bool: 5, float: 10}


@dataclass(frozen=True)
class Call:
    """One REST request: what was asked and what the fake answered."""

    method: str
    path: str  # after /api/v10, e.g. /channels/1100000000000000010/messages
    query: dict[str, str]
    json: Any  # the JSON body (multipart: its payload_json), None without one
    headers: dict[str, str]  # lower-case names, without Authorization
    status: int
    response: Any
    at: float


@dataclass(frozen=True)
class InteractionResponse:
    """A POST to an interaction's callback URL: `type` 4 = message, 5 = deferred, ..."""

    interaction_id: str
    token: str
    type: int
    data: Json
    at: float


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: float
    global_: bool
    code: int | None
    message: str | None
    via: bool


@dataclass
class _Req:
    method: str
    path: dict[str, str]
    query: dict[str, str]
    json: Any
    files: list[tuple[str, str, bytes]]  # name, content type, bytes


class ApiError(Exception):
    """Raised by a route handler: answered `{"message", "code", "errors"?}` with `status`."""

    def __init__(self, status: int, code: int, message: str, errors: Json | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "code": code}
        if errors:
            self.body["errors"] = errors


def _form_error(field: str, code: str, message: str) -> ApiError:
    errors = {field: {"_errors": [{"code": code, "message": message}]}}
    return ApiError(400, 50035, "Invalid Form Body", errors)


class FakeDiscord:
    """The bot's view of Discord: owns the Starlette app, the world and what it recorded."""

    def __init__(
        self,
        *,
        token: str = BOT_TOKEN,
        shards: int = 1,
        heartbeat_interval: int = 41250,
        privileged_intents: Iterable[str] = ("members", "presences", "message_content"),
        echo: bool = True,
        interaction_deadline: float = 3.0,
    ) -> None:
        """`privileged_intents` are those switched on for the app in the developer portal (an
        IDENTIFY asking for another is closed with 4014); `echo` sends the bot's own messages
        back over the gateway, as Discord does; an interaction not answered within
        `interaction_deadline` seconds is gone (404, code 10062).
        """
        self.token, self.shards, self.heartbeat_interval = token, shards, heartbeat_interval
        self.echo, self.interaction_deadline = echo, interaction_deadline
        self.bot_id = str(BOT_ID)
        flags = _COMMAND_BADGE | sum(_INTENT_FLAGS[i] for i in set(privileged_intents))
        self.application = _application(flags)
        self.root = ""  # http://127.0.0.1:P, set once started
        self._lock = threading.RLock()
        self._guild = copy.deepcopy(_GUILD)
        self._channels: dict[str, Json] = {}
        for channel in [*self._guild.pop("channels"), *self._guild.pop("threads")]:
            self._channels[channel["id"]] = channel | {"guild_id": str(GUILD_ID)}
        self._dm_channel(ALICE, str(DM_CHANNEL_ID))
        self._messages: dict[str, Json] = {}  # every message the fake knows, by id
        self._allowed: dict[str, Any] = {}  # allowed_mentions of the bot's messages
        self._deleted: set[str] = set()
        self._created_threads: list[str] = []
        self._commands: dict[str | None, list[Json]] = {}
        self._interactions: dict[str, Json] = {}
        self._responses: list[InteractionResponse] = []
        self._files: dict[str, tuple[str, bytes]] = {}
        self._faults: list[_Fault] = []
        self._calls: list[Call] = []
        self._last_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gateway = Gateway(self)
        self._routes = _compile(
            [
                ("GET", "/users/@me", lambda r: self.bot_user),
                ("GET", "/users/{user}", lambda r: self._user(r.path["user"])),
                ("POST", "/users/@me/channels", self._open_dm),
                ("GET", "/oauth2/applications/@me", lambda r: self.application),
                ("GET", "/applications/@me", lambda r: self.application),
                ("GET", "/gateway", lambda r: {"url": self.gateway_url}),
                ("GET", "/gateway/bot", self._gateway_bot),
                ("GET", "/channels/{ch}", lambda r: self._channel(r.path["ch"])),
                ("GET", "/channels/{ch}/messages", self._history),
                ("POST", "/channels/{ch}/messages", self._post_message),
                ("GET", "/channels/{ch}/messages/{m}", lambda r: self._message_in(r, False)),
                ("PATCH", "/channels/{ch}/messages/{m}", self._edit_message),
                ("DELETE", "/channels/{ch}/messages/{m}", self._delete_message),
                ("POST", "/channels/{ch}/messages/{m}/threads", self._start_thread),
                ("POST", "/channels/{ch}/threads", self._start_thread),
                ("POST", "/channels/{ch}/typing", lambda r: self._channel(r.path["ch"]) and None),
                ("PUT", "/channels/{ch}/thread-members/@me", lambda r: None),
                ("GET", "/applications/{app}/commands", lambda r: self.commands()),
                ("PUT", "/applications/{app}/commands", self._put_commands),
                ("GET", "/applications/{app}/guilds/{g}/commands", self._guild_commands),
                ("PUT", "/applications/{app}/guilds/{g}/commands", self._put_commands),
                ("POST", "/interactions/{i}/{token}/callback", self._callback),
                ("POST", "/webhooks/{app}/{token}", self._followup),
                ("GET", "/webhooks/{app}/{token}/messages/{m}", self._webhook_message),
                ("PATCH", "/webhooks/{app}/{token}/messages/{m}", self._webhook_message),
                ("DELETE", "/webhooks/{app}/{token}/messages/{m}", self._webhook_message),
            ]
        )
        self.app = Starlette(
            routes=[
                Route(
                    "/api/v10/{path:path}",
                    self._api,
                    methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
                ),
                Route("/attachments/{path:path}", self._attachment),
                WebSocketRoute("/gw", self.gateway.endpoint),
            ],
            lifespan=self._lifespan,
        )

    @property
    def api_base_url(self) -> str:
        """What `discord.http.Route.BASE` takes."""
        return f"{self.root}/api/v10"

    @property
    def gateway_url(self) -> str:
        """What `DiscordWebSocket.DEFAULT_GATEWAY` takes (as a `yarl.URL`); also READY's
        `resume_gateway_url` and the `url` of `GET /gateway/bot`.
        """
        return self.root.replace("http://", "ws://", 1) + "/gw"

    @property
    def bot_user(self) -> Json:
        return _READY["user"] | {"id": self.bot_id}

    # -- what the gateway asks of the world ---------------------------------------------------

    def ready(self) -> Json:
        app = {"id": self.application["id"], "flags": self.application["flags"]}
        return copy.deepcopy(_READY) | {"user": self.bot_user, "application": app}

    def guilds(self) -> list[Json]:
        with self._lock:
            channels = [c for c in self._channels.values() if c.get("guild_id")]
            guild = copy.deepcopy(self._guild)
        guild["channels"] = [
            _without(c, "guild_id") for c in channels if "thread_metadata" not in c
        ]
        guild["threads"] = [c for c in channels if "thread_metadata" in c]
        guild["member_count"] = len(guild["members"])
        return [guild]

    # -- faults -------------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        path_regex: str,
        status: int = 429,
        times: int = 1,
        retry_after: float = 0.2,
        global_: bool = False,
        *,
        code: int | None = None,
        message: str | None = None,
        via: bool = True,
    ) -> None:
        """Answer the next `times` requests whose path (after /api/v10) fully matches
        `path_regex` with `status`.

        429 comes as Discord's edge sends it: `Via`, `Retry-After`, `X-RateLimit-*` and
        `{"message", "retry_after", "global"}` (`via=False` drops `Via`: discord.py then takes
        it for a Cloudflare ban and raises). 403 is code 50013 Missing Permissions.
        """
        pattern = re.compile(path_regex)
        fault = _Fault(
            method.upper(), pattern, status, times, retry_after, global_, code, message, via
        )
        with self._lock:
            self._faults.append(fault)

    # -- what was recorded --------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str, path_regex: str) -> list[Call]:
        """The calls with `method` whose path (after /api/v10) fully matches `path_regex`."""
        pattern = re.compile(path_regex)
        return [c for c in self.calls if c.method == method.upper() and pattern.fullmatch(c.path)]

    def messages(self, channel_id: int | str) -> list[Json]:
        """The bot's messages in a channel as they stand (edits applied, deletions gone), in
        post order: each the message object Discord answered, plus the `allowed_mentions` the
        bot sent (None without).
        """
        with self._lock:
            return [
                copy.deepcopy(m) | {"allowed_mentions": self._allowed.get(m["id"])}
                for m in self._messages.values()
                if m["channel_id"] == str(channel_id)
                and m["author"]["id"] == self.bot_id
                and m["id"] not in self._deleted
            ]

    @property
    def threads(self) -> list[Json]:
        """The threads created through the API, in order, as they stand."""
        with self._lock:
            return [copy.deepcopy(self._channels[t]) for t in self._created_threads]

    def commands(self, guild_id: int | str | None = None) -> list[Json]:
        """The application commands registered (globally, or in `guild_id`)."""
        with self._lock:
            return copy.deepcopy(
                self._commands.get(None if guild_id is None else str(guild_id), [])
            )

    @property
    def interaction_responses(self) -> list[InteractionResponse]:
        with self._lock:
            return list(self._responses)

    @property
    def identifies(self) -> list[Json]:
        """Every IDENTIFY's `d` (without the token) plus the `session_id` it got."""
        return self.gateway.identifies

    @property
    def sessions_resumed(self) -> list[Resume]:
        return self.gateway.resumes

    async def wait_for(
        self, method: str, path_regex: str, count: int = 1, timeout: float = 5.0
    ) -> list[Call]:
        """Wait until `count` matching calls were answered (failed ones count too)."""
        what = f"{count} {method} {path_regex}"
        return await _poll(lambda: self.calls_to(method, path_regex), count, timeout, what)

    async def wait_messages(
        self, channel_id: int | str, count: int = 1, timeout: float = 5.0
    ) -> list[Json]:
        """Wait until the bot has `count` messages standing in the channel."""
        what = f"{count} bot messages in {channel_id}"
        return await _poll(lambda: self.messages(channel_id), count, timeout, what)

    async def wait_identifies(self, count: int = 1, timeout: float = 5.0) -> list[Json]:
        return await _poll(lambda: self.identifies, count, timeout, f"{count} IDENTIFY")

    async def wait_resumes(self, count: int = 1, timeout: float = 5.0) -> list[Resume]:
        return await _poll(lambda: self.sessions_resumed, count, timeout, f"{count} RESUME")

    async def wait_interaction_responses(
        self, count: int = 1, timeout: float = 5.0
    ) -> list[InteractionResponse]:
        what = f"{count} interaction responses"
        return await _poll(lambda: self.interaction_responses, count, timeout, what)

    # -- the gateway, driven from the test's loop ---------------------------------------------

    async def dispatch(self, event: str, data: Json, timeout: float = 5.0) -> int:
        """Send a dispatch to every session it is routed to (by shard and intents); return how
        many got it. Waits up to `timeout` for a session to exist; one whose client is
        reconnecting keeps the event for its RESUME.
        """
        await _poll(lambda: [1] * self.gateway.live_sessions, 1, timeout, "a gateway session")
        if event == "MESSAGE_CREATE":
            self._remember(data)
        if event == "INTERACTION_CREATE":  # a recorded one: its callback must work too
            self._expect_interaction(data)
        return int(await self._on_loop(self.gateway.dispatch, event, data))

    async def disconnect(self, code: int = 4000) -> int:
        """Close every gateway connection with `code`: discord.py reconnects and RESUMEs
        (unless the code is fatal, e.g. 4004 or 4014)."""
        return int(await self._on_loop(self.gateway.disconnect, code))

    async def request_resume(self) -> int:
        """Send op 7 RECONNECT: the client reconnects and RESUMEs, and gets what it missed."""
        return int(await self._on_loop(self.gateway.reconnect))

    async def invalidate_session(self, resumable: bool = False) -> int:
        """Send op 9 INVALID_SESSION (the client IDENTIFYs anew unless `resumable`)."""
        return int(await self._on_loop(self.gateway.invalidate, resumable))

    async def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None, "the fake is not started"

        async def call() -> Any:
            return fn(*args)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._loop))

    # -- builders: event data as the gateway delivers it (author defaults to ALICE) -----------

    def guild_message(
        self,
        content: str,
        author: Json | None = None,
        channel_id: int | str = CHANNEL_ID,
        *,
        mentions_bot: bool = True,
        attachments: dict[str, bytes] | None = None,
    ) -> Json:
        """MESSAGE_CREATE data for a message in a guild channel (or thread); `mentions_bot`
        puts `<@bot>` in front of the content unless it is there already. `attachments` maps
        file names to bytes that the fake serves at the attachment's `url`.
        """
        if mentions_bot and f"<@{self.bot_id}>" not in content:
            content = f"<@{self.bot_id}> {content}"
        channel = self._channel(str(channel_id))
        message = self._message(channel, author or ALICE, content, nonce=self._snowflake())
        message["attachments"] = self._attach_files(message, attachments or {})
        self._remember(message)
        return self._gateway_form(message)

    def thread_message(
        self,
        content: str,
        author: Json | None = None,
        thread_id: int | str = THREAD_ID,
        *,
        mentions_bot: bool = False,
        attachments: dict[str, bytes] | None = None,
    ) -> Json:
        """MESSAGE_CREATE data for a message in a thread: `channel_id` is the thread's id."""
        return self.guild_message(
            content, author, thread_id, mentions_bot=mentions_bot, attachments=attachments
        )

    def dm_message(
        self,
        content: str,
        author: Json | None = None,
        *,
        attachments: dict[str, bytes] | None = None,
    ) -> Json:
        """MESSAGE_CREATE data for a DM to the bot: no `guild_id`, no `member`."""
        author = author or ALICE
        channel = self._dm_channel(author)
        message = self._message(channel, author, content, nonce=self._snowflake())
        message["attachments"] = self._attach_files(message, attachments or {})
        self._remember(message)
        return self._gateway_form(message)

    def bot_message(
        self,
        content: str,
        author: Json | None = None,
        channel_id: int | str = CHANNEL_ID,
        *,
        mentions_bot: bool = True,
    ) -> Json:
        """MESSAGE_CREATE data for another bot's message (`author.bot` is true)."""
        author = author or OTHER_BOT
        return self.guild_message(content, author, channel_id, mentions_bot=mentions_bot)

    def interaction(
        self,
        command: str = "agent",
        options: dict[str, Any] | None = None,
        *,
        channel_id: int | str = CHANNEL_ID,
        guild: bool = True,
        user: Json | None = None,
        permissions: int | str = EVERYONE_PERMISSIONS,
    ) -> Json:
        """INTERACTION_CREATE data for a slash command, in a guild channel (the member has
        `permissions`) or, with `guild=False`, in the user's DM with the bot.
        """
        user = user or ALICE
        data: Json = {"id": self._command_id(command, guild), "name": command, "type": 1}
        if options:
            data["options"] = [
                {"name": k, "type": _OPTION_TYPES.get(type(v), 3), "value": v}
                for k, v in options.items()
            ]
        payload = load_payload("interaction_agent")["d"]
        interaction_id = self._snowflake()
        token = f"aW50ZXJhY3Rpb246{interaction_id}O{secrets.token_urlsafe(60)}"
        payload |= {"id": interaction_id, "token": token, "data": data}
        if guild:
            channel = _without(self._channel(str(channel_id)), "permission_overwrites", "member")
            payload["channel"] = channel | {"permissions": str(payload["app_permissions"])}
            payload["member"] |= {"user": user, "permissions": str(permissions)}
        else:
            channel = self._dm_channel(user)
            for key in ("guild", "guild_id", "guild_locale", "member"):
                payload.pop(key)
            payload |= {"user": user, "context": 1, "authorizing_integration_owners": {"0": "0"}}
            payload["channel"] = channel
        payload["channel_id"] = channel["id"]
        self._expect_interaction(payload)
        return payload

    def _expect_interaction(self, payload: Json) -> None:
        """Accept one callback for this interaction, within the deadline from now."""
        with self._lock:
            if payload["id"] not in self._interactions:
                self._interactions[payload["id"]] = {
                    "token": payload["token"],
                    "channel_id": payload["channel_id"],
                    "at": time.monotonic(),
                    "type": None,
                    "original": None,
                }

    # -- the server side ----------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        yield

    async def _api(self, request: Request) -> Response:
        at, method, path = time.time(), request.method, "/" + request.path_params["path"]
        req = _Req(method, {}, dict(request.query_params), None, [])
        try:
            req.json, req.files = _parse_body(
                request.headers.get("content-type", ""), await request.body()
            )
            status, answer, headers = self._answer(req, path, request.headers.get("authorization"))
        except ApiError as e:
            status, answer, headers = e.status, e.body, {}
        body = json.dumps(answer)  # now: the stored message may be edited later
        seen = {k: v for k, v in request.headers.items() if k != "authorization"}
        call = Call(method, path, req.query, req.json, seen, status, json.loads(body), at)
        with self._lock:
            self._calls.append(call)
        if status == 204:  # no body, so no Content-Type: discord.py would try to parse ""
            return Response(status_code=204, headers=headers)
        return Response(body, status, headers=headers, media_type="application/json")

    def _answer(self, req: _Req, path: str, auth: str | None) -> tuple[int, Any, dict[str, str]]:
        found = [(m, h, a, p.fullmatch(path)) for m, p, h, a in self._routes]
        found = [f for f in found if f[3] is not None]
        if not found:
            raise ApiError(404, 0, _ERRORS[404])
        route = next((f for f in found if f[0] == req.method), None)
        if route is None:
            raise ApiError(405, 0, _ERRORS[405])
        _, handler, needs_auth, match = route
        if needs_auth and auth != f"Bot {self.token}":
            raise ApiError(401, 0, _ERRORS[401])
        fault = self._take_fault(req.method, path)
        if fault is not None:
            return _fault_answer(fault, req.method, path)
        req.path = match.groupdict() if match else {}
        answer = handler(req)
        return (204 if answer is None else 200), answer, _bucket_headers(req.method, path)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.path.fullmatch(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    async def _attachment(self, request: Request) -> Response:
        with self._lock:
            found = self._files.get(request.path_params["path"])
        if found is None:
            return Response(json.dumps({"message": "404: Not Found", "code": 0}), 404)
        return Response(found[1], media_type=found[0])

    def _gateway_bot(self, r: _Req) -> Json:
        started = len(self.gateway.identifies)
        limit = {"total": 1000, "remaining": max(0, 1000 - started)}
        limit |= {"reset_after": 86_400_000, "max_concurrency": 1}
        return {"url": self.gateway_url, "shards": self.shards, "session_start_limit": limit}

    def _open_dm(self, r: _Req) -> Json:
        user = self._users().get(str((r.json or {}).get("recipient_id")))
        if user is None:
            raise ApiError(400, 50033, "Invalid Recipient(s)")
        return self._dm_channel(user)

    def _history(self, r: _Req) -> list[Json]:
        channel = self._channel(r.path["ch"])
        before, after = int(r.query.get("before", 1 << 63)), int(r.query.get("after", 0))
        with self._lock:
            found = [
                copy.deepcopy(m)
                for m in self._messages.values()
                if m["channel_id"] == channel["id"] and m["id"] not in self._deleted
            ]
        found = [m for m in found if after < int(m["id"]) < before]
        return sorted(found, key=lambda m: -int(m["id"]))[: int(r.query.get("limit", 50))]

    def _post_message(self, r: _Req) -> Json:
        channel, body = self._channel(r.path["ch"]), r.json or {}
        content = _content(body, r.files)
        kept = {k: body[k] for k in ("embeds", "components", "tts", "flags", "nonce") if k in body}
        message = self._message(channel, BOT_USER, content, **kept)
        if body.get("message_reference"):
            self._reference(message, body["message_reference"], channel)
        message["attachments"] = self._attach_files(message, {n: d for n, _, d in r.files})
        self._store(message, body.get("allowed_mentions"))
        return message

    def _message_in(self, r: _Req, own: bool = True) -> Json:
        channel = self._channel(r.path["ch"])
        with self._lock:
            message = self._messages.get(r.path["m"])
        if (
            message is None
            or message["channel_id"] != channel["id"]
            or message["id"] in self._deleted
        ):
            raise ApiError(404, 10008, "Unknown Message")
        if own and message["author"]["id"] != self.bot_id:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        return message

    def _edit_message(self, r: _Req) -> Json:
        message = self._message_in(r)
        self._apply_edit(message, r.json or {})
        return message

    def _delete_message(self, r: _Req) -> None:
        self._remove(self._message_in(r, own=False))

    def _start_thread(self, r: _Req) -> Json:
        parent, body = self._channel(r.path["ch"]), r.json or {}
        if parent["type"] not in (0, 5):
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= THREAD_NAME_LIMIT:
            raise _form_error(
                "name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        starter = self._message_in(r, own=False) if "m" in r.path else None
        if starter is not None and starter.get("thread"):
            raise ApiError(400, 160004, "A thread has already been created for this message")
        # A thread started from a message takes the message's id.
        thread_id = starter["id"] if starter else self._snowflake()
        kind = (11 if parent["type"] == 0 else 10) if starter else int(body.get("type", 12))
        now = _now()
        duration = body.get("auto_archive_duration") or parent.get("default_auto_archive_duration")
        metadata = {"archived": False, "archive_timestamp": now, "locked": False}
        metadata |= {"auto_archive_duration": duration or 4320, "create_timestamp": now}
        metadata |= {"invitable": bool(body.get("invitable", True))} if kind == 12 else {}
        member = {"id": thread_id, "user_id": self.bot_id, "join_timestamp": now, "flags": 0}
        thread = {"id": thread_id, "type": kind, "guild_id": parent["guild_id"]}
        thread |= {"parent_id": parent["id"], "owner_id": self.bot_id, "name": name}
        thread |= {"last_message_id": None, "message_count": 0, "member_count": 1}
        thread |= {"total_message_sent": 0, "flags": 0, "thread_metadata": metadata}
        thread |= {"rate_limit_per_user": body.get("rate_limit_per_user", 0), "member": member}
        with self._lock:
            self._channels[thread_id] = thread
            self._created_threads.append(thread_id)
            if starter is not None:
                starter["thread"] = copy.deepcopy(thread)
                starter["flags"] = starter.get("flags", 0) | 1 << 5  # HAS_THREAD
        self.gateway.dispatch("THREAD_CREATE", thread | {"newly_created": True})
        return thread

    def _put_commands(self, r: _Req) -> list[Json]:
        guild_id, body = r.path.get("g"), r.json
        if not isinstance(body, list):
            raise ApiError(400, 50035, "Invalid Form Body")
        with self._lock:
            known = {(c["name"], c["type"]): c["id"] for c in self._commands.get(guild_id, [])}
        registered = []
        for i, command in enumerate(body):
            kind, name = command.get("type", 1), str(command.get("name", ""))
            description = str(command.get("description", ""))
            if not re.fullmatch(r"[-_\w]{1,32}", name) or (kind == 1 and name != name.lower()):
                raise _form_error(f"{i}.name", "APPLICATION_COMMAND_INVALID_NAME", "Invalid name")
            if kind == 1 and not 1 <= len(description) <= 100:
                raise _form_error(f"{i}.description", "BASE_TYPE_BAD_LENGTH", "Must be 1-100")
            stored = {"type": 1, "description": "", "default_member_permissions": None}
            stored |= {"nsfw": False, "contexts": None, "integration_types": [0]} | command
            stored |= {"id": known.get((name, kind)) or self._snowflake()}
            stored |= {"application_id": str(APPLICATION_ID), "version": self._snowflake()}
            stored |= {"guild_id": guild_id} if guild_id else {}
            registered.append(stored)
        with self._lock:
            self._commands[guild_id] = registered
        return registered

    def _guild_commands(self, r: _Req) -> list[Json]:
        return self.commands(r.path["g"])

    def _callback(self, r: _Req) -> Json | None:
        with self._lock:
            found = self._interactions.get(r.path["i"])
        if found is None or found["token"] != r.path["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if found["type"] is not None:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        if time.monotonic() - found["at"] > self.interaction_deadline:
            raise ApiError(404, 10062, "Unknown interaction")
        kind, data = int((r.json or {}).get("type", 0)), (r.json or {}).get("data") or {}
        flags = int(data.get("flags") or 0) & 64  # EPHEMERAL
        content = _content(data, r.files) if kind == 4 else ""
        with self._lock:
            found["type"] = kind
            self._responses.append(
                InteractionResponse(r.path["i"], r.path["token"], kind, data, time.time())
            )
        message = None
        if kind in (4, 5):  # a message, or "thinking..." (LOADING) until @original is edited
            loading = 1 << 7 if kind == 5 else 0
            message = self._interaction_message(found, content, data, flags | loading)
            found["original"] = message["id"]
        if r.query.get("with_response", "").lower() not in ("1", "true"):
            return None
        answer = {"id": r.path["i"], "type": 2, "response_message_loading": kind == 5}
        answer |= {"response_message_ephemeral": bool(flags)}
        answer |= {"response_message_id": message["id"]} if message else {}
        resource = {"type": kind} | ({"message": message} if message else {})
        return {"interaction": answer, "resource": resource}

    def _followup(self, r: _Req) -> Json | None:
        found, body = self._by_token(r.path["token"]), r.json or {}
        message = self._interaction_message(
            found, _content(body, r.files), body, int(body.get("flags") or 0) & 64
        )
        return message if r.query.get("wait", "").lower() in ("1", "true") else None

    def _webhook_message(self, r: _Req) -> Json | None:
        found = self._by_token(r.path["token"])
        message_id = found["original"] if r.path["m"] == "@original" else r.path["m"]
        with self._lock:
            message = self._messages.get(message_id or "")
        if message is None or message["id"] in self._deleted:
            raise ApiError(404, 10008, "Unknown Message")
        if r.method == "DELETE":
            return self._remove(message)
        if r.method == "PATCH":
            self._apply_edit(message, r.json or {}, loading_done=True)
        return message

    # -- the world ----------------------------------------------------------------------------

    def _users(self) -> dict[str, Json]:
        with self._lock:
            return {m["user"]["id"]: m["user"] for m in self._guild["members"]}

    def _user(self, user_id: str) -> Json:
        user = self._users().get(user_id)
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return user

    def _channel(self, channel_id: str) -> Json:
        with self._lock:
            channel = self._channels.get(channel_id)
            if channel is None:
                raise ApiError(404, 10003, "Unknown Channel")
            return copy.deepcopy(channel)

    def _dm_channel(self, user: Json, channel_id: str | None = None) -> Json:
        with self._lock:
            for channel in self._channels.values():
                if channel["type"] == 1 and channel["recipients"][0]["id"] == user["id"]:
                    return copy.deepcopy(channel)
            channel = {"id": channel_id or self._snowflake(), "type": 1, "last_message_id": None}
            channel |= {"flags": 0, "recipients": [user]}
            self._channels[channel["id"]] = channel
            return copy.deepcopy(channel)

    def _snowflake(self) -> str:
        with self._lock:
            now = (int(time.time() * 1000) - DISCORD_EPOCH) << 22 | 1 << 17
            self._last_id = max(now, self._last_id + 1)
            return str(self._last_id)

    def _command_id(self, command: str, guild: bool) -> str:
        scopes = [str(GUILD_ID), None] if guild else [None]
        for scope in scopes:
            for registered in self.commands(scope):
                if registered["name"] == command:
                    return str(registered["id"])
        return _RECORDED_COMMAND_IDS.get(command) or self._snowflake()

    def _message(self, channel: Json, author: Json, content: str, **more: Any) -> Json:
        """A message as the REST API returns it (no guild_id, member or channel_type)."""
        message: Json = {"type": 0, "content": content, "mentions": self._mentions(content)}
        message |= {"mention_roles": [], "attachments": [], "embeds": [], "timestamp": _now()}
        message |= {"edited_timestamp": None, "flags": 0, "components": []}
        message |= {"id": self._snowflake(), "channel_id": channel["id"], "author": author}
        message |= {"pinned": False, "mention_everyone": False, "tts": False}
        return message | more

    def _mentions(self, content: str) -> list[Json]:
        users = self._users()
        ids = dict.fromkeys(re.findall(r"<@!?(\d+)>", content))
        return [copy.deepcopy(users[i]) for i in ids if i in users]

    def _gateway_form(self, message: Json) -> Json:
        """The message as MESSAGE_CREATE carries it: with `channel_type`, and in a guild with
        `guild_id`, the author's `member` and each mention's `member`.
        """
        out = copy.deepcopy(message)
        with self._lock:
            channel = self._channels.get(message["channel_id"], {})
            members = {m["user"]["id"]: _without(m, "user") for m in self._guild["members"]}
        out["channel_type"] = channel.get("type", 0)
        if channel.get("guild_id"):
            out["guild_id"] = channel["guild_id"]
            if not message.get("webhook_id") and message["author"]["id"] in members:
                out["member"] = copy.deepcopy(members[message["author"]["id"]])
            for user in out["mentions"]:
                if user["id"] in members:
                    user["member"] = copy.deepcopy(members[user["id"]])
        return out

    def _remember(self, data: Json) -> None:
        """Know a message sent to the bot, so that threads, replies and fetches can find it."""
        message = _without(data, "guild_id", "member", "channel_type")
        message["mentions"] = [_without(u, "member") for u in message.get("mentions", [])]
        with self._lock:
            self._messages.setdefault(str(message["id"]), message)

    def _store(self, message: Json, allowed_mentions: Any) -> None:
        with self._lock:
            self._messages[message["id"]] = message
            self._allowed[message["id"]] = allowed_mentions
            channel = self._channels.get(message["channel_id"])
            if channel is not None:
                channel["last_message_id"] = message["id"]
                if "thread_metadata" in channel:
                    channel["message_count"] += 1
                    channel["total_message_sent"] += 1
        self._echo("MESSAGE_CREATE", self._gateway_form(message))

    def _remove(self, message: Json) -> None:
        with self._lock:
            self._deleted.add(message["id"])
            guild_id = self._channels.get(message["channel_id"], {}).get("guild_id")
        deleted = {"id": message["id"], "channel_id": message["channel_id"]}
        self._echo("MESSAGE_DELETE", deleted | ({"guild_id": guild_id} if guild_id else {}))

    def _apply_edit(self, message: Json, body: Json, loading_done: bool = False) -> None:
        content = _content(body, [], empty_ok=True) if "content" in body else None
        with self._lock:  # tests read the stored messages from their own thread
            if content is not None:
                message |= {"content": content, "mentions": self._mentions(content)}
            message.update({k: body[k] for k in ("embeds", "components", "flags") if k in body})
            if loading_done:
                message["flags"] = message.get("flags", 0) & ~(1 << 7)
            if "allowed_mentions" in body:
                self._allowed[message["id"]] = body["allowed_mentions"]
            message["edited_timestamp"] = _now()
        self._echo("MESSAGE_UPDATE", self._gateway_form(message))

    def _reference(self, message: Json, ref: Json, channel: Json) -> None:
        """Echo `message_reference`; a reply (type 0) embeds the message it answers, if known."""
        target_id = str(ref.get("message_id"))
        reference = {
            "type": ref.get("type", 0),
            "channel_id": str(ref.get("channel_id") or channel["id"]),
        }
        reference |= {"message_id": target_id}
        reference |= {"guild_id": channel["guild_id"]} if channel.get("guild_id") else {}
        message["message_reference"] = reference
        with self._lock:
            target = copy.deepcopy(self._messages.get(target_id))
        if reference["type"] == 0:
            message["type"] = 19  # REPLY
            if target is not None:
                message["referenced_message"] = _without(target, "referenced_message")

    def _attach_files(self, message: Json, files: dict[str, bytes]) -> list[Json]:
        attached = []
        for name, data in files.items():
            attachment_id = self._snowflake()
            path = f"{message['channel_id']}/{attachment_id}/{name}"
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            kind += "; charset=utf-8" if kind.startswith("text/") else ""
            with self._lock:
                self._files[path] = (kind, data)
            url = f"{self.root}/attachments/{path}"
            attachment = {"id": attachment_id, "filename": name, "size": len(data), "url": url}
            attachment |= {"proxy_url": url, "content_type": kind, "content_scan_version": 3}
            attached.append(attachment)
        return attached

    def _interaction_message(self, found: Json, content: str, data: Json, flags: int) -> Json:
        channel = self._channel(found["channel_id"])
        message = self._message(channel, BOT_USER, content, type=20, flags=flags)
        message |= {k: data[k] for k in ("embeds", "components") if k in data}
        message |= {"webhook_id": str(APPLICATION_ID), "application_id": str(APPLICATION_ID)}
        self._store(message, data.get("allowed_mentions"))
        return message

    def _by_token(self, token: str) -> Json:
        with self._lock:
            found = next((i for i in self._interactions.values() if i["token"] == token), None)
        if found is None or found["type"] is None:
            raise ApiError(404, 10015, "Unknown Webhook")
        return found

    def _echo(self, event: str, data: Json) -> None:
        if self.echo:
            self.gateway.dispatch(event, data)


_RECORDED_COMMAND_IDS = {
    load_payload(name)["d"]["data"]["name"]: load_payload(name)["d"]["data"]["id"]
    for name in ("interaction_agent", "interaction_new")
}


@contextmanager
def fake_discord(**options: Any) -> Iterator[FakeDiscord]:
    """A started `FakeDiscord` (options go to its constructor); stopped on exit."""
    fake = FakeDiscord(**options)
    with run_asgi(fake.app, ws=WS_IMPL) as root:
        fake.root = root
        yield fake


def _application(flags: int) -> Json:
    """`GET /oauth2/applications/@me`: discord.py's login needs `owner`, `verify_key` and the
    rest; `interactions_endpoint_url` must be null, or interactions skip the gateway.
    """
    app: Json = {"id": str(APPLICATION_ID), "name": "threadbridge", "icon": None}
    app |= {"description": "", "summary": "", "type": None, "hook": True, "bot_public": False}
    app |= {"bot_require_code_grant": False, "verify_key": hashlib.sha256(b"tb").hexdigest()}
    app |= {"flags": flags, "owner": ALICE, "team": None, "bot": BOT_USER, "rpc_origins": []}
    app |= {"redirect_uris": [], "interactions_endpoint_url": None, "tags": []}
    app |= {"role_connections_verification_url": None, "integration_types_config": {"0": {}}}
    app |= {"approximate_guild_count": 1, "approximate_user_install_count": 0}
    return app | {"is_monetized": False, "install_params": None}


def _compile(
    routes: list[tuple[str, str, Callable[[_Req], Any]]],
) -> list[tuple[str, re.Pattern[str], Callable[[_Req], Any], bool]]:
    """(method, template, handler) -> (method, regex, handler, needs `Authorization: Bot`);
    interaction callbacks and webhooks are authorized by the token in their path.
    """
    return [
        (method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)), handler, auth)
        for method, template, handler in routes
        for auth in [not template.startswith(("/interactions/", "/webhooks/"))]
    ]


def _bucket_headers(
    method: str, path: str, remaining: int = 4, reset_after: float = 1.0
) -> dict[str, str]:
    route = re.sub(r"/\d+", "/:id", f"{method} {path}")
    return {
        "X-RateLimit-Bucket": hashlib.sha256(route.encode()).hexdigest()[:32],
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
        "X-RateLimit-Reset-After": f"{reset_after:.3f}",
    }


def _fault_answer(fault: _Fault, method: str, path: str) -> tuple[int, Json, dict[str, str]]:
    if fault.status != 429:
        code = fault.code if fault.code is not None else 50013 if fault.status == 403 else 0
        message = fault.message or _ERRORS.get(fault.status, f"{fault.status}: Error")
        return fault.status, {"message": message, "code": code}, {}
    body: Json = {"message": fault.message or "You are being rate limited."}
    body |= {"retry_after": fault.retry_after, "global": fault.global_}
    body |= {"code": fault.code} if fault.code is not None else {}
    headers = {"Retry-After": str(math.ceil(fault.retry_after))}
    if fault.global_:
        headers |= {"X-RateLimit-Global": "true", "X-RateLimit-Scope": "global"}
    else:
        headers |= _bucket_headers(method, path, 0, fault.retry_after)
        headers["X-RateLimit-Scope"] = "user"
    if fault.via:  # Discord's edge adds it; a 429 without it is Cloudflare's ban
        headers["Via"] = "1.1 google"
    return 429, body, headers


def _content(body: Json, files: list[Any], empty_ok: bool = False) -> str:
    content = str(body.get("content") or "")
    if len(content) > TEXT_LIMIT:
        raise _form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    filled = ("embeds", "components", "sticker_ids", "poll", "attachments")
    if not (empty_ok or content or files or any(body.get(k) for k in filled)):
        raise ApiError(400, 50006, "Cannot send an empty message")
    return content


def _parse_body(content_type: str, raw: bytes) -> tuple[Any, list[tuple[str, str, bytes]]]:
    """The JSON body, or a multipart body's `payload_json` and files (as discord.py uploads)."""
    if not raw:
        return None, []
    if not content_type.startswith("multipart/form-data"):
        try:
            return json.loads(raw), []
        except ValueError:
            raise ApiError(400, 50109, "The request body contains invalid JSON.") from None
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    payload, files = None, []
    for part in parsed.iter_parts():  # type: ignore[attr-defined]
        data = part.get_payload(decode=True) or b""
        if part.get_param("name", header="content-disposition") == "payload_json":
            payload = json.loads(data)
        elif part.get_filename():
            files.append((part.get_filename(), part.get_content_type(), data))
    return payload, files


def _without(data: Json, *keys: str) -> Json:
    return {k: copy.deepcopy(v) for k, v in data.items() if k not in keys}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


async def _poll(found: Callable[[], list[T]], count: int, timeout: float, what: str) -> list[T]:
    deadline = time.monotonic() + timeout
    while len(items := found()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fake Discord: no {what} within {timeout}s (saw {len(items)})")
        await asyncio.sleep(0.01)
    return items
