"""A fake Telegram Bot API on loopback, recording every call.

Start it with `fake_telegram()` and point python-telegram-bot at `fake.base_url` and
`fake.base_file_url`. The fake runs in its own thread: every helper may be called from a test's
event loop, and the `wait_*` helpers poll without blocking it. The builders (`private_message`,
`group_message`, `topic_message`, ...) return updates shaped like the payloads in
tests/adapters/telegram/payloads (written after the Bot API reference and real captures, and
checked against python-telegram-bot); hand them to `queue_update` or `webhook_post`.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import json
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.servers import run_asgi

BOT_ID, BOT_USERNAME = 7000000001, "tb_test_bot"
BOT_TOKEN = f"{BOT_ID}:AAFakeTokenForThreadbridgeTests0000"
ALICE = {"id": 1001, "is_bot": False, "first_name": "Alice", "username": "alice"}
BOB = {"id": 1002, "is_bot": False, "first_name": "Bob", "username": "bob"}
ALICE["language_code"] = BOB["language_code"] = "en"
PRIVATE_CHAT, GROUP_CHAT = 1001, -4000000001
SUPERGROUP_CHAT, FORUM_CHAT = -1001000000001, -1001000000002
TEXT_LIMIT = 4096
PAYLOADS = Path(__file__).resolve().parent.parent / "adapters" / "telegram" / "payloads"
# Form bodies carry every value as a string, structured ones JSON-encoded; these stay strings.
_STRINGS = {"text", "caption", "parse_mode", "url", "secret_token", "action", "language_code"}
_ACTIONS = {"typing", "upload_photo", "record_video", "upload_video", "record_voice"}
_ACTIONS |= {"upload_voice", "upload_document", "choose_sticker", "find_location"}
_ACTIONS |= {"record_video_note", "upload_video_note"}
_DESCRIPTIONS = {
    400: 'Bad Request: can\'t parse entities: Unsupported start tag "x" at byte offset 0',
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    409: "Conflict: terminated by other getUpdates request; make sure that only one bot "
    "instance is running",
    500: "Internal Server Error",
}
_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
T = TypeVar("T")
Json = dict[str, Any]
User = Json | None  # a Telegram User object; None means ALICE


def load_payload(name: str) -> Json:
    """A recorded payload from tests/adapters/telegram/payloads, by file stem."""
    data: Json = json.loads((PAYLOADS / f"{name}.json").read_text())
    return data


@dataclass(frozen=True)
class Call:
    """One Bot API request: the method, its parsed parameters, and what the fake answered.

    `at` is when it came and `answered` when it was answered (a held getUpdates spans the two);
    `via` the client's name when it came through `base_url_for(via)`, else "".
    """

    method: str
    params: Json
    token: str
    status: int
    response: Json
    at: float
    answered: float = 0.0
    via: str = ""


@dataclass(frozen=True)
class Fault:
    status: int
    description: str
    parameters: Json
    chat_id: int | str | None


class ApiError(Exception):
    """Raised by a method handler: answered `{"ok": false, "error_code", "description"}`."""

    def __init__(self, status: int, description: str, parameters: Json | None = None):
        super().__init__(description)
        self.status, self.description, self.parameters = status, description, parameters or {}

    def body(self) -> Json:
        body = {"ok": False, "error_code": self.status, "description": self.description}
        return body | ({"parameters": self.parameters} if self.parameters else {})


@dataclass(frozen=True)
class Limits:
    """Telegram's posting limits, enforced on sendMessage when a fake is given them.

    Token buckets: per chat `per_chat` a second, per group `per_group_per_min` a minute, and
    `overall` a second, each in bursts of its `…_burst` (Telegram allows "short bursts"; it
    does not say how long). `jitter_s` of refill is forgiven: a message leaves on time and
    arrives a little later or earlier than the one before it. Over a limit: 429, `retry_after`.
    """

    per_chat: float = 1.0
    per_chat_burst: int = 3
    per_group_per_min: float = 20.0
    per_group_burst: int = 20
    overall: float = 30.0
    overall_burst: int = 30
    jitter_s: float = 0.05


class _Limiter:
    """The buckets of one fake; `take` spends a token of each, or says how long to wait."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, chat_id: str, now: float) -> float:
        """0 when the message may go (its tokens are spent); else the seconds to wait."""
        lim = self.limits
        buckets = [("all", lim.overall, lim.overall_burst)]  # (key, rate a second, burst)
        buckets.append((f"chat:{chat_id}", lim.per_chat, lim.per_chat_burst))
        if chat_id.startswith("-"):  # groups, supergroups and channels
            buckets.append((f"group:{chat_id}", lim.per_group_per_min / 60, lim.per_group_burst))
        levels: dict[str, float] = {}
        wait = 0.0
        for key, rate, burst in buckets:
            tokens, when = self._buckets.get(key, (float(burst), now))
            levels[key] = min(burst, tokens + (now - when) * rate)
            forgiven = min(burst, tokens + (now + lim.jitter_s - when) * rate)
            if forgiven < 1:
                wait = max(wait, (1 - forgiven) / rate)
        if wait == 0:
            for key, _, _ in buckets:
                self._buckets[key] = (levels[key] - 1, now)
        return wait


class FakeTelegram:
    """One bot's view of Telegram: owns the Starlette app and everything it recorded."""

    def __init__(
        self,
        *,
        token: str = BOT_TOKEN,
        username: str = BOT_USERNAME,
        first_name: str = "Threadbridge Test",
        can_read_all_group_messages: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.token, self.username = token, username
        self._limiter = _Limiter(limits) if limits else None
        self.me = load_payload("get_me_result") | {
            "id": int(token.split(":")[0]),
            "first_name": first_name,
            "username": username,
            "can_read_all_group_messages": can_read_all_group_messages,  # privacy mode off
        }
        self.bot = {k: self.me[k] for k in ("id", "is_bot", "first_name", "username")}
        self.root = ""  # http://127.0.0.1:P, set once started
        self.chats: dict[int, Json] = {}
        self.add_chat(PRIVATE_CHAT, user=ALICE)
        self.add_chat(BOB["id"], user=BOB)
        self.add_chat(GROUP_CHAT, "group", title="Test group")
        self.add_chat(SUPERGROUP_CHAT, "supergroup", title="Test supergroup")
        self.add_chat(FORUM_CHAT, "supergroup", title="Test forum", is_forum=True)
        self.webhook: Json | None = None  # url, secret_token, allowed_updates, ...
        self.commands: list[Json] = []
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._updates: list[Json] = []
        self._update_id = 500000000
        self._message_ids: dict[int, int] = {}
        self._seen: dict[tuple[int, int], Json] = {}  # every message, for replies
        self._sent: dict[tuple[int, int], Json] = {}  # the bot's, in send order
        self._faults: dict[str, list[Fault]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived = asyncio.Event()  # replaced at each wake-up; used on the server loop
        self._closing = False
        # False: an offset no longer confirms (forgets) the updates below it, as when a poller
        # dies before its next getUpdates: a poller starting afresh gets them again.
        self.confirming = True
        self._methods: dict[str, Callable[[Json], Any]] = {
            "getMe": lambda p: self.me,
            "getUpdates": self._get_updates,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._webhook_info,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "deleteMessage": self._delete_message,
            "sendChatAction": self._send_chat_action,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": lambda p: self.commands,
            "getChat": lambda p: self._chat(p.get("chat_id")) | _CHAT_INFO,
        }
        self._names = {name.lower(): name for name in self._methods}  # names are case-blind
        # No file downloads: base_file_url is there for the builder, nothing serves it.
        routes = [
            Route("/bot{token}/{method}", self._api, methods=["GET", "POST"]),
            Route("/via/{via}/bot{token}/{method}", self._api, methods=["GET", "POST"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    @property
    def base_url(self) -> str:
        """What `ApplicationBuilder().base_url(...)` takes: calls go to `{base_url}{token}/...`."""
        return f"{self.root}/bot"

    def base_url_for(self, via: str) -> str:
        """A base URL whose calls are recorded with `via`: tells apart several clients of
        one bot (say, the instances that share it), whose requests look alike otherwise."""
        return f"{self.root}/via/{via}/bot"

    @property
    def base_file_url(self) -> str:
        return f"{self.root}/file/bot"

    # -- state set up by tests --------------------------------------------------------------

    def add_chat(
        self,
        chat_id: int,
        chat_type: str = "private",
        *,
        title: str = "",
        user: Json | None = None,
        is_forum: bool = False,
    ) -> Json:
        """Make a chat known: "private" (named after `user`), "group" or "supergroup"."""
        chat: Json = {"id": chat_id}
        if chat_type == "private":
            user = user or {"first_name": f"User {chat_id}"}
            chat |= {k: user[k] for k in ("first_name", "last_name", "username") if k in user}
        else:
            chat["title"] = title or f"Chat {chat_id}"
        chat |= {"is_forum": True} if is_forum else {}
        chat["type"] = chat_type
        if chat_type == "group":  # still sent for basic groups, though no longer documented
            chat["all_members_are_administrators"] = True
        self.chats[chat_id] = chat
        return chat

    def fail(
        self,
        method: str,
        status: int,
        times: int = 1,
        *,
        description: str | None = None,
        retry_after: int = 1,
        migrate_to_chat_id: int | None = None,
        chat_id: int | str | None = None,
    ) -> None:
        """Answer the next `times` calls to `method` (to `chat_id` only, if given) with an error.

        429 carries `retry_after`; 400 with `migrate_to_chat_id` is a group upgraded to a
        supergroup; 400 alone a parse error, 403 a bot blocked by the user.
        """
        parameters: Json = {}
        if status == 429:
            parameters["retry_after"] = retry_after
            description = description or f"Too Many Requests: retry after {retry_after}"
        if migrate_to_chat_id is not None:
            parameters["migrate_to_chat_id"] = migrate_to_chat_id
            description = description or "Bad Request: group chat was upgraded to a supergroup chat"
        text = description or _DESCRIPTIONS.get(status, f"Error {status}")
        with self._lock:
            queue = self._faults.setdefault(method, [])
            queue.extend(Fault(status, text, parameters, chat_id) for _ in range(times))

    def queue_update(self, update: Json) -> Json:
        """Queue an update for getUpdates (numbered with the next `update_id` if it has none)."""
        with self._lock:
            update = self._numbered(update)
            self._updates.append(update)
        self._wake()
        return update

    # -- what was recorded ------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    @property
    def pending_updates(self) -> list[Json]:
        """Updates queued and not yet confirmed by a getUpdates `offset`."""
        with self._lock:
            return list(self._updates)

    def sent(self, chat_id: int | None = None, thread_id: int | None = None) -> list[Json]:
        """The bot's messages as they stand now (edits applied, deletions gone), in send order.

        Each is `{message_id, chat_id, thread_id, text, parse_mode, entities, reply_to, edited,
        message}`: text, parse mode and entities as the bot sent them; `message` the Message
        object Telegram answered (plain text, parsed entities).
        """
        with self._lock:
            found = [dict(m) for m in self._sent.values() if not m["deleted"]]
        return [
            m
            for m in found
            if chat_id in (None, m["chat_id"]) and thread_id in (None, m["thread_id"])
        ]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait until `method` was answered `count` times (failed calls count too)."""
        return await _poll(lambda: self.calls_to(method), count, timeout, f"{count} {method}")

    async def wait_sent(
        self,
        count: int = 1,
        chat_id: int | None = None,
        thread_id: int | None = None,
        timeout: float = 5.0,
    ) -> list[Json]:
        """Wait until the bot has `count` messages standing (in that chat and thread)."""
        return await _poll(lambda: self.sent(chat_id, thread_id), count, timeout, "messages")

    async def webhook_post(
        self, url: str, update: Json, secret: str | None = None
    ) -> httpx.Response:
        """POST `update` to `url` as Telegram does: a JSON body and the secret-token header.

        `secret=None` sends the secret registered with setWebhook, `""` no header at all.
        """
        with self._lock:
            update = self._numbered(update)
        if secret is None:
            secret = (self.webhook or {}).get("secret_token", "")
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            return await client.post(url, json=update, headers=headers)

    # -- the server side --------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        yield

    def close(self) -> None:
        """Answer every held getUpdates at once, so that the server stops without waiting."""
        self._closing = True
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def _api(self, request: Request) -> JSONResponse:
        at = time.time()
        token, name = request.path_params["token"], request.path_params["method"]
        method, params = self._names.get(name.lower(), name), {}
        try:
            params = await _read_params(request)
            status, body = 200, {"ok": True, "result": await self._answer(token, method, params)}
        except ApiError as e:
            status, body = e.status, e.body()
        with self._lock:
            via = request.path_params.get("via", "")
            self._calls.append(Call(method, params, token, status, body, at, time.time(), via))
        return JSONResponse(body, status_code=status)

    async def _answer(self, token: str, method: str, params: Json) -> Any:
        if token != self.token:
            raise ApiError(401, "Unauthorized")
        handler = self._methods.get(method)
        if handler is None:
            raise ApiError(404, "Not Found")
        with self._lock:
            queue = self._faults.get(method, [])
            fault = next((f for f in queue if f.chat_id in (None, params.get("chat_id"))), None)
            if fault is not None:
                queue.remove(fault)
        if fault is not None:
            raise ApiError(fault.status, fault.description, fault.parameters)
        if self._limiter is not None and method == "sendMessage":
            self._check_limits(params)
        result = handler(params)
        return await result if inspect.isawaitable(result) else result

    def _check_limits(self, p: Json) -> None:
        assert self._limiter is not None
        with self._lock:
            wait = self._limiter.take(str(p.get("chat_id")), time.monotonic())
        if wait > 0:
            retry_after = math.ceil(wait)
            raise ApiError(
                429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}
            )

    async def _get_updates(self, p: Json) -> list[Json]:
        if self.webhook:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use "
                "deleteWebhook to delete the webhook first",
            )
        offset, limit = int(p.get("offset") or 0), min(max(int(p.get("limit") or 100), 1), 100)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(p.get("timeout") or 0)
        with self._lock:  # the offset confirms when the call comes, however long it is held
            if offset > 0 and self.confirming:  # confirms (forgets) every update below it
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            elif offset < 0:  # the last -offset updates; older ones are forgotten
                self._updates = self._updates[offset:]
        while True:
            arrived = self._arrived  # taken before looking: a wake-up after the look sets it
            with self._lock:
                found = [u for u in self._updates if u["update_id"] >= offset][:limit]
            remaining = deadline - loop.time()
            if found or self._closing or remaining <= 0:
                return found
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                pass

    def _set_webhook(self, p: Json) -> bool:
        if not p.get("url"):  # an empty url removes the webhook
            return self._delete_webhook(p)
        if not str(p["url"]).startswith("https://"):
            raise ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided")
        self._delete_webhook(p)
        keys = ("url", "secret_token", "allowed_updates", "max_connections", "ip_address")
        self.webhook = {k: p[k] for k in keys if k in p}
        return True

    def _delete_webhook(self, p: Json) -> bool:
        with self._lock:
            if p.get("drop_pending_updates"):
                self._updates.clear()
            self.webhook = None
        return True

    def _webhook_info(self, p: Json) -> Json:
        hook = self.webhook or {}  # like Telegram, never shows the secret token
        info: Json = {"url": hook.get("url", ""), "has_custom_certificate": False}
        info["pending_update_count"] = len(self.pending_updates)
        if hook:
            info["max_connections"] = hook.get("max_connections", 40)
            info |= {k: hook[k] for k in ("allowed_updates", "ip_address") if k in hook}
        return info

    def _send_message(self, p: Json) -> Json:
        chat = self._chat(p.get("chat_id"))
        plain, entities = _read_text(p)
        thread_id = p.get("message_thread_id")
        reply_to = (p.get("reply_parameters") or {}).get("message_id") or p.get(
            "reply_to_message_id"
        )
        message = self._message(chat, self.bot, thread_id, reply_to, text=plain, entities=entities)
        if "reply_markup" in p:
            message["reply_markup"] = p["reply_markup"]
        record = {"message_id": message["message_id"], "chat_id": chat["id"]}
        record |= {"thread_id": thread_id, "reply_to": reply_to, "edited": False}
        record |= {k: p.get(k) for k in ("text", "parse_mode", "entities")}
        with self._lock:
            self._sent[(chat["id"], message["message_id"])] = record | {
                "deleted": False,
                "message": message,
            }
        return message

    def _edit_message_text(self, p: Json) -> Json | bool:
        if p.get("inline_message_id"):
            return True
        chat = self._chat(p.get("chat_id"))
        plain, entities = _read_text(p)
        with self._lock:
            record = self._sent.get((chat["id"], int(p.get("message_id") or 0)))
            if record is None or record["deleted"]:
                raise ApiError(400, "Bad Request: message to edit not found")
            message = record["message"]
            if plain == message["text"] and entities == message.get("entities", []):
                raise ApiError(400, _NOT_MODIFIED)
            message.pop("entities", None)
            message |= {"text": plain, "edit_date": _now()}
            message |= {"entities": entities} if entities else {}
            record |= {k: p.get(k) for k in ("text", "parse_mode", "entities")} | {"edited": True}
            return message

    def _delete_message(self, p: Json) -> bool:
        key = (self._chat(p.get("chat_id"))["id"], int(p.get("message_id") or 0))
        with self._lock:
            if key not in self._seen or self._sent.get(key, {}).get("deleted"):
                raise ApiError(400, "Bad Request: message to delete not found")
            if key in self._sent:
                self._sent[key]["deleted"] = True
        return True

    def _send_chat_action(self, p: Json) -> bool:
        self._chat(p.get("chat_id"))
        if p.get("action") not in _ACTIONS:
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    def _set_my_commands(self, p: Json) -> bool:
        commands = p.get("commands")
        if not isinstance(commands, list) or not all(
            isinstance(c, dict) and c.get("command") and c.get("description") for c in commands
        ):
            raise ApiError(400, "Bad Request: can't parse BotCommand array")
        self.commands = commands
        return True

    def _chat(self, chat_id: Any) -> Json:
        if chat_id in (None, ""):
            raise ApiError(400, "Bad Request: chat_id is empty")
        if isinstance(chat_id, str) and chat_id.lstrip("-").isdigit():
            chat_id = int(chat_id)
        for chat in list(self.chats.values()):
            if chat_id in (chat["id"], f"@{chat.get('username')}"):
                return chat
        raise ApiError(400, "Bad Request: chat not found")

    def _numbered(self, update: Json) -> Json:
        if "update_id" in update:
            self._update_id = max(self._update_id, update["update_id"])
            return update
        self._update_id += 1
        return {"update_id": self._update_id, **update}

    def _message(
        self,
        chat: Json,
        sender: Json | None,
        thread_id: int | None = None,
        reply_to: Any = None,
        **content: Any,
    ) -> Json:
        """A message as Telegram stores it, numbered in its chat. In a forum topic a message
        that answers nothing carries the topic's creation message as `reply_to_message`.
        """
        in_topic = bool(thread_id and chat.get("is_forum"))
        for key, entities in (("text", "entities"), ("caption", "caption_entities")):
            if content.get(key) is not None and content.get(entities) is None:
                content[entities] = _auto_entities(content[key])
        with self._lock:
            message_id = self._message_ids[chat["id"]] = self._message_ids.get(chat["id"], 0) + 1
            message = {"message_id": message_id, "from": sender or ALICE, "chat": chat}
            message |= {"date": _now()} | ({"message_thread_id": thread_id} if thread_id else {})
            if reply_to is not None:
                message["reply_to_message"] = self._replied(chat, reply_to)
            elif in_topic:
                message["reply_to_message"] = _topic_created(chat, thread_id or 0)
            message |= {k: v for k, v in content.items() if v not in (None, [])}
            message |= {"is_topic_message": True} if in_topic else {}
            self._seen[(chat["id"], message_id)] = message
        return message

    def _replied(self, chat: Json, target: Any) -> Json:
        """What Telegram nests as `reply_to_message`: the message, without its own reply."""
        if isinstance(target, dict):  # an update, a sent() record or a message
            target = target.get("message") or target.get("edited_message") or target
            target = target if "date" in target else target["message_id"]
        if not isinstance(target, dict):
            minimal = {"message_id": int(target), "chat": chat, "date": _now()}
            target = self._seen.get((chat["id"], int(target)), minimal)
        return {k: v for k, v in target.items() if k != "reply_to_message"}

    def _any_chat(self, chat_id: int) -> Json:
        if chat_id in self.chats or chat_id < 0:
            return self._group(chat_id)
        return self.add_chat(chat_id)

    def _group(self, chat_id: int, *, is_forum: bool = False) -> Json:
        if chat_id in self.chats:
            return self.chats[chat_id]
        kind = "supergroup" if str(chat_id).startswith("-100") or is_forum else "group"
        return self.add_chat(chat_id, kind, is_forum=is_forum)

    # -- builders: updates as Telegram delivers them (`user` defaults to ALICE) -------------

    def private_message(self, text: str, chat_id: int = PRIVATE_CHAT, user: User = None) -> Json:
        """A person's message in their private chat with the bot (chat id = their user id)."""
        chat = self.chats.get(chat_id) or self.add_chat(chat_id, user=user)
        user = user or next((u for u in (ALICE, BOB) if u["id"] == chat_id), None)
        return {"message": self._message(chat, user, text=text)}

    def group_message(
        self, text: str, chat_id: int = GROUP_CHAT, user: User = None, **more: Any
    ) -> Json:
        """A group message; `@botname` in it gets its `mention` entity, as Telegram adds.

        `reply_to=` a message id, a message or update built here, or a `sent()` record;
        `entities=` replaces the ones worked out from the text.
        """
        return {"message": self._message(self._group(chat_id), user, text=text, **more)}

    def topic_message(
        self,
        text: str,
        chat_id: int = FORUM_CHAT,
        thread_id: int = 2,
        user: User = None,
        **more: Any,
    ) -> Json:
        """A message in a forum topic: `message_thread_id`, `is_topic_message`, and (unless it
        answers a message) the topic's creation message as `reply_to_message`.
        """
        chat = self._group(chat_id, is_forum=True)
        return {"message": self._message(chat, user, thread_id, text=text, **more)}

    def command(
        self,
        text: str = "/new",
        chat_id: int = PRIVATE_CHAT,
        user: User = None,
        thread_id: int | None = None,
    ) -> Json:
        """A command (`/new`, `/new@tb_test_bot more`) with its `bot_command` entity."""
        return {"message": self._message(self._any_chat(chat_id), user, thread_id, text=text)}

    def photo_message(
        self, caption: str | None = None, chat_id: int = PRIVATE_CHAT, user: User = None
    ) -> Json:
        photo = load_payload("photo_message")["message"]["photo"]
        chat = self._any_chat(chat_id)
        return {"message": self._message(chat, user, photo=photo, caption=caption)}

    def sticker_message(self, chat_id: int = PRIVATE_CHAT, user: User = None) -> Json:
        sticker = load_payload("sticker_message")["message"]["sticker"]
        return {"message": self._message(self._any_chat(chat_id), user, sticker=sticker)}

    def edited_message(self, original: Json, text: str) -> Json:
        """The `edited_message` update for a message (or update) built earlier, now `text`."""
        message = dict(original.get("message") or original)
        message.pop("entities", None)
        message |= {"edit_date": _now(), "text": text}
        message |= {"entities": found} if (found := _auto_entities(text)) else {}
        return {"edited_message": message}


_CHAT_INFO = {  # what getChat adds to a chat: the ChatFullInfo fields PTB requires, and more
    k: v
    for k, v in load_payload("get_chat_result").items()
    if k not in ("id", "title", "type", "is_forum")
}


@contextmanager
def fake_telegram(**options: Any) -> Iterator[FakeTelegram]:
    """A started `FakeTelegram` (options go to its constructor); stopped on exit."""
    fake = FakeTelegram(**options)
    with run_asgi(fake.app) as root:
        fake.root = root
        try:
            yield fake
        finally:
            fake.close()


# -- what Telegram makes of a text -----------------------------------------------------------

_VALUE = r"""(?:"([^"]*)"|'([^']*)'|([^\s>"']+))"""
_ATTR = re.compile(rf"([\w-]+)(?:\s*=\s*{_VALUE})?")
_ATTRS = r"""(?:\s+[\w-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>"']+))?)*"""
_TAG = re.compile(rf"<(/?)([A-Za-z][\w-]*)({_ATTRS})\s*>")
_CHAR_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#\d{1,7}|#x[0-9A-Fa-f]{1,6});")
_KINDS = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline"}
_KINDS |= {"ins": "underline", "s": "strikethrough", "strike": "strikethrough"}
_KINDS |= {"del": "strikethrough", "code": "code", "pre": "pre", "a": "text_link"}
_KINDS |= {"tg-spoiler": "spoiler", "span": "spoiler", "blockquote": "blockquote"}
_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z]\w{3,31})?")
_MENTION = re.compile(r"(?<![\w@/])@[A-Za-z]\w{3,31}")


def parse_html(text: str) -> tuple[str, list[Json]]:
    """Telegram's reading of an HTML parse-mode text: the plain text and its entities.

    Raises ValueError with a reason worded like what Telegram puts after "can't parse
    entities: ". Stricter than Telegram, as our formatter must be: a bare `>` or `&` is an error.
    """
    out, stack, entities = [], [], []
    units, i = 0, 0  # entity offsets count UTF-16 code units
    while i < len(text):
        if text[i] == "<":
            m = _TAG.match(text, i)
            if m is None:
                raise _bad("Unclosed start tag", text, i)
            name = m.group(2).lower()
            if m.group(1) and not stack:
                raise _bad("Unexpected end tag", text, i)
            if m.group(1):
                opened, entity = stack.pop()
                if opened != name:
                    found = f'expected "</{opened}>", found "</{name}>"'
                    raise _bad("Unmatched end tag", text, i, found)
                if entity is not None:
                    entity["length"] = units - entity["offset"]
            else:
                entity = _entity(name, _attrs(m.group(3)), stack, units, text, i)
                entities += [entity] if entity else []
                stack.append((name, entity))
            i = m.end()
            continue
        if text[i] == ">":
            raise _bad('Unexpected ">"', text, i, 'write "&gt;"')
        char_entity = _CHAR_ENTITY.match(text, i) if text[i] == "&" else None
        if text[i] == "&" and char_entity is None:
            raise _bad("Unsupported character entity", text, i, 'write "&amp;"')
        char = html.unescape(char_entity.group()) if char_entity else text[i]
        i = char_entity.end() if char_entity else i + 1
        out.append(char)
        units += _u16(char)
    if stack:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return "".join(out), [e for e in entities if e["length"] > 0]


def _entity(
    name: str, attrs: dict[str, str], stack: list[Any], offset: int, text: str, i: int
) -> Json | None:
    if name not in _KINDS:
        raise _bad(f'Unsupported start tag "{name}"', text, i)
    parent, parent_entity = stack[-1] if stack else ("", None)
    if name == "span" and attrs.get("class") != "tg-spoiler":
        raise _bad('Tag "span" must have class "tg-spoiler"', text, i)
    if name == "code" and parent == "pre":  # <pre><code class="language-x">: one pre entity
        language = attrs.get("class", "")
        if language.startswith("language-") and parent_entity is not None:
            parent_entity["language"] = language.removeprefix("language-")
        return None
    if name == "code" and "class" in attrs:
        raise _bad('Tag "code" may have a class only inside "pre"', text, i)
    entity: Json = {"offset": offset, "length": 0, "type": _KINDS[name]}
    if name == "a":
        if not attrs.get("href"):
            return None
        entity["url"] = attrs["href"]
    if name == "blockquote" and "expandable" in attrs:
        entity["type"] = "expandable_blockquote"
    return entity


def _bad(reason: str, text: str, i: int, more: str = "") -> ValueError:
    where = f"{reason} at byte offset {len(text[:i].encode())}"
    return ValueError(f"{where}, {more}" if more else where)


def _attrs(source: str) -> dict[str, str]:
    return {
        m.group(1).lower(): html.unescape(next((g for g in m.groups()[1:] if g is not None), ""))
        for m in _ATTR.finditer(source)
    }


def _auto_entities(text: str) -> list[Json]:
    """The `bot_command` and `mention` entities Telegram attaches to what a person types."""
    found = [
        {"offset": _u16(text[: m.start()]), "length": _u16(m.group()), "type": kind}
        for kind, pattern in (("bot_command", _COMMAND), ("mention", _MENTION))
        for m in pattern.finditer(text)
    ]
    return sorted(found, key=lambda e: e["offset"])


def _read_text(p: Json) -> tuple[str, list[Json]]:
    """The text and entities Telegram would store for sendMessage/editMessageText params."""
    text, mode = str(p.get("text") or ""), str(p.get("parse_mode") or "")
    entities = p.get("entities") or []
    if mode.upper() == "HTML":
        try:
            text, entities = parse_html(text)
        except ValueError as e:
            raise ApiError(400, f"Bad Request: can't parse entities: {e}") from None
    if not text.strip():
        raise ApiError(400, "Bad Request: message text is empty")
    if len(text) > TEXT_LIMIT:
        raise ApiError(400, "Bad Request: message is too long")
    return text, entities


async def _read_params(request: Request) -> Json:
    """Query string, then the body: JSON, or a form whose values are JSON-encoded."""
    pairs = list(request.query_params.items())
    body = await request.body()
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/"):
        raise ApiError(400, "Bad Request: the fake takes no file uploads")
    if body and kind.startswith("application/json"):
        return {k: _decoded(k, v) for k, v in pairs} | json.loads(body)
    pairs += parse_qsl(body.decode(), keep_blank_values=True)
    return {k: _decoded(k, v) for k, v in pairs}


def _decoded(key: str, value: str) -> Any:
    if key in _STRINGS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value  # "@channelname", a plain word


def _topic_created(chat: Json, thread_id: int) -> Json:
    created = {"name": f"Topic {thread_id}", "icon_color": 7322096}
    return {"message_id": thread_id, "from": ALICE, "chat": chat, "date": 1700000000} | {
        "message_thread_id": thread_id,
        "forum_topic_created": created,
        "is_topic_message": True,
    }


def _u16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _now() -> int:
    return int(time.time())


async def _poll(found: Callable[[], list[T]], count: int, timeout: float, what: str) -> list[T]:
    deadline = time.monotonic() + timeout
    while len(items := found()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fake Telegram: no {what} within {timeout}s (saw {len(items)})")
        await asyncio.sleep(0.01)
    return items
