"""The Telegram channel: updates by long polling or webhook, commands, and posting replies.

We drive python-telegram-bot's `Bot` ourselves instead of its `Application`: the bridge runs
turns, so an update only has to be read and handed to `bridge.submit`. Polling confirms an
update (the next `getUpdates` offset) only after it is stored, so a crash loses nothing; the
update id is the event id, so a redelivered webhook is answered once.

Telegram lets one process poll a bot, so with several instances on one store only the one that
holds the role "telegram-poll:<bot id>" (core.leader) polls; the others stand by and take over
when it goes. Webhooks and posting replies run on every instance.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import warnings
from collections import OrderedDict
from datetime import timedelta
from typing import Any

from telegram import Bot, LinkPreviewOptions, ReplyParameters, Update
from telegram.constants import ChatAction, ParseMode
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning

from adapters.telegram.config import WEBHOOK_PATH, TelegramConfig
from adapters.telegram.convert import (
    SOURCE,
    TOPIC,
    WORKSPACE,
    BotInfo,
    Heard,
    hear,
    message_id_of,
    post_key,
    thread_of,
    to_inbound,
)
from adapters.telegram.format import plain, split_html, to_html
from core.bridge import Bridge
from core.errors import (
    MessageRejected,
    PlatformRejected,
    PlatformRetryable,
    StartupError,
)
from core.leader import Candidate
from core.model import Reply, ThreadRef
from core.pacing import Pacer

log = logging.getLogger(__name__)
# python-telegram-bot logs at DEBUG its API URL, which holds the bot token, and the parameters
# of each call, setWebhook's secret_token among them: its DEBUG lines never reach our logs.
logging.getLogger("telegram").setLevel(logging.INFO)

ALLOWED_UPDATES = ["message"]
TEXT_ONLY_NOTICE = "The agent reads text only: please write your question as a message."
COMMANDS = [
    ("new", "start a new conversation"),
    ("agent", "which agent answers here (admins: /agent NAME to change it)"),
    ("start", "say hello"),
]
# What reading an update with a field of the wrong type raises (Telegram's own never do).
MALFORMED = (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError)
MAX_WAIT_S = 30.0  # a 429 asking for longer goes back to the outbox instead of holding a worker


class TelegramAdapter:
    """Telegram chats ⇄ the bridge."""

    source = SOURCE
    working_every_s: float | None = 4.0  # "typing" lasts 5 s

    def __init__(self, config: TelegramConfig, server_public_url: str | None = None) -> None:
        self.config = config
        self.public_url = (config.public_url or server_public_url or "").rstrip("/")
        self.bridge: Bridge | None = None
        self.me: BotInfo | None = None
        base = config.api_base_url
        self.bot = Bot(
            config.secret("bot_token_env"),
            base_url=base,
            base_file_url=base.removesuffix("/bot") + "/file/bot",
            request=HTTPXRequest(connection_pool_size=64, read_timeout=30, write_timeout=30),
            get_updates_request=HTTPXRequest(read_timeout=config.poll_timeout_s + 15),
        )
        self._per_chat = Pacer(config.post_rate_per_chat, config.post_burst)
        self._per_group = Pacer(20 / 60 if config.post_rate_per_chat else 0, 20)
        self._overall = Pacer(30 if config.post_rate_per_chat else 0, 30)
        self._poller: Candidate | None = None
        self._webhook_set = False
        self._seen: OrderedDict[str, None] = OrderedDict()  # commands answered, by event id
        self._drafts: dict[str, int] = {}  # thread key -> the message a streamed answer grows in
        # post key -> thread key of the bot's latest group messages, known the moment they are
        # sent (the store learns them a moment later; a quick reply must still find its chain)
        self._recent_posts: OrderedDict[str, str] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, bridge: Bridge) -> None:
        self.bridge = bridge
        try:
            await self.bot.initialize()
        except InvalidToken:
            raise StartupError(
                f"telegram: Telegram refused the bot token in {self.config.bot_token_env}",
                "set it to the token BotFather gave you (123456:ABC…)",
            ) from None
        except NetworkError as exc:
            raise StartupError(
                f"telegram: cannot reach {self.config.api_base_url} ({exc})",
                "check the network, a proxy, or [telegram] api_base_url",
            ) from None
        self.me = BotInfo(self.bot.id, self.bot.username)
        try:
            await self.bot.set_my_commands(COMMANDS)
        except TelegramError as exc:
            log.warning("telegram: could not set the command menu: %s", exc)
        if self.config.mode == "webhook":
            url = self.public_url + WEBHOOK_PATH
            await self.bot.set_webhook(
                url,
                secret_token=self.config.secret("webhook_secret_env"),
                allowed_updates=ALLOWED_UPDATES,
            )
            self._webhook_set = True
            log.info("telegram: @%s receives updates by webhook at %s", self.me.username, url)
        else:
            leadership = bridge.store.leadership(f"telegram-poll:{self.me.id}")
            bridge.metrics.watch(leadership)
            self._poller = Candidate(
                leadership,
                self._poll,
                retry_s=self.config.standby_retry_s,
                on_lead=self._lead,
                on_standby=self._stand_by,
            )
            await self._poller.start()

    async def why_not_ready(self) -> str | None:
        """Why Telegram cannot bring messages now, or None: the webhook set, or the polling
        loop running, whether it polls here or stands by while another instance polls."""
        if self.config.mode == "webhook":
            return None if self._webhook_set else "the webhook is not set"
        if self._poller is None or not self._poller.running:
            return "the polling loop is not running"
        return None

    async def stop(self) -> None:
        if self._poller is not None:
            await self._poller.stop()
        await self.bot.shutdown()

    # -- intake --------------------------------------------------------------------------

    async def _lead(self) -> None:
        """This instance won the right to poll: no webhook may hold the updates."""
        assert self.me is not None
        await self.bot.delete_webhook()
        log.info("telegram: polling Telegram (leader) for @%s", self.me.username)

    def _stand_by(self) -> None:
        assert self.me is not None
        log.info("telegram: standing by: another instance polls Telegram for @%s", self.me.username)

    async def _poll(self) -> None:
        """Long-poll `getUpdates` while this instance leads; an update is confirmed only after
        it was handled, so updates a lost leader took but did not confirm come to the next."""
        assert self._poller is not None
        offset: int | None = None
        pause = 1.0
        while True:
            await self._poller.leadership.ensure()  # raises LeadershipLost: stop at once
            try:
                updates = await self.bot.get_updates(
                    offset=offset,
                    timeout=self.config.poll_timeout_s,
                    allowed_updates=ALLOWED_UPDATES,
                )
                pause = 1.0
            except RetryAfter as exc:
                await asyncio.sleep(_wait_of(exc))
                continue
            except Conflict as exc:
                log.error("telegram: another process polls this bot (%s); retrying in 5 s", exc)
                await asyncio.sleep(5)
                continue
            except TelegramError as exc:
                log.warning("telegram: getUpdates failed (%s); retrying in %.0f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30)
                continue
            for update in updates:
                try:
                    await self.handle(update)
                except MALFORMED as exc:  # asking again brings the same update: skip it
                    log.warning("telegram: malformed update %s skipped: %r", update.update_id, exc)
                except Exception:
                    log.exception(
                        "telegram: update %s not stored; it comes again", update.update_id
                    )
                    await asyncio.sleep(1)
                    break
                offset = update.update_id + 1

    async def webhook(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """One webhook delivery: (HTTP status, reason). Telegram redelivers on non-2xx."""
        secret = self.config.secret("webhook_secret_env").encode()
        given = headers.get("x-telegram-bot-api-secret-token", "").encode()
        if not hmac.compare_digest(given, secret):
            return 403, "wrong or missing secret token"
        if not headers.get("content-type", "").startswith("application/json"):
            return 400, "expected application/json"
        try:
            raw = json.loads(body)
            if not isinstance(raw, dict) or not isinstance(raw.get("update_id"), int):
                raise ValueError("no update_id")
            update = Update.de_json(raw, self.bot)
        except (*MALFORMED, RecursionError, OSError) as exc:  # OSError: a date beyond time_t
            log.warning("telegram: malformed update refused: %s", exc)
            return 400, "malformed update"
        try:
            await self.handle(update)
        except MALFORMED as exc:  # a field of the wrong type: a redelivery would fail again
            log.warning("telegram: malformed update %s refused: %r", update.update_id, exc)
            return 400, "malformed update"
        except Exception:
            log.exception("telegram: update %s not stored", update.update_id)
            return 503, "not stored; send it again"
        return 200, "ok"

    async def handle(self, update: Update) -> None:
        """Read one update and hand what is for the agent to the bridge."""
        assert self.bridge is not None
        assert self.me is not None
        heard = hear(update, self.me)
        if heard is None:
            return
        if heard.command is not None and heard.command in {"start", "new", "agent", "help"}:
            if self._first_time(heard.event_id):
                await self._command(heard)
            return
        chain = None
        if heard.place == "group" and heard.replied_to_bot is not None:
            key = post_key(heard.chat_id, heard.replied_to_bot)
            chain = self._recent_posts.get(key) or await self.bridge.store.thread_of_post(key)
        thread = thread_of(heard, chain)
        if not heard.for_the_bot and not await self._continues(heard, thread):
            return
        if heard.non_text is not None:
            if self._first_time(heard.event_id):
                await self.bridge.notify(thread, TEXT_ONLY_NOTICE)
            return
        try:
            await self.bridge.submit(to_inbound(heard, thread))
        except MessageRejected as exc:
            await self.bridge.notify(thread, exc.reason)

    async def _continues(self, heard: Heard, thread: ThreadRef) -> bool:
        """A message that does not address the bot: ours in a route that says respond = "all",
        or in a forum topic that already has a conversation."""
        assert self.bridge is not None
        decision = await self.bridge.router.agent_for(_chat_scope(heard.chat_id))
        if decision.route is not None and decision.route.respond == "all":
            return True
        return heard.place == "topic" and await self.bridge.store.thread_known(thread.key)

    def _first_time(self, event_id: str) -> bool:
        """Whether this process has not acted on the event yet (commands, notices)."""
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > 10_000:
            self._seen.popitem(last=False)
        return True

    # -- commands ------------------------------------------------------------------------

    async def _command(self, heard: Heard) -> None:
        assert self.bridge is not None
        thread = thread_of(heard)
        scope = _chat_scope(heard.chat_id)
        decision = await self.bridge.router.agent_for(scope)
        if heard.command in ("start", "help"):
            text = (
                f"Hello! Agent **{decision.agent}** answers here. "
                + (
                    "Write your question."
                    if heard.place == "private"
                    else "Mention me or reply to my messages."
                )
                + " /new starts a new conversation."
            )
        elif heard.command == "new":
            if heard.place == "group":
                text = "In a group every mention of me starts a new conversation."
            else:
                await self.bridge.new_conversation(thread)
                text = "Started afresh: your next message opens a new conversation."
        else:
            text = await self._agent_command(heard, scope, decision.agent, decision.why)
        await self.bridge.notify(thread, text)

    async def _agent_command(self, heard: Heard, scope: ThreadRef, agent: str, why: str) -> str:
        assert self.bridge is not None
        wanted = heard.args.strip()
        if not wanted:
            return f"Agent **{agent}** answers in this chat ({why})."
        if heard.author["user_id"] not in self.config.admins:
            return "Only a threadbridge admin can choose the agent of a chat."
        if wanted not in self.bridge.config.agent_configs:
            known = ", ".join(sorted(self.bridge.config.agent_configs))
            return f"There is no agent **{wanted}**. Agents: {known}."
        user = heard.author["user_id"]
        await self.bridge.store.set_route(
            SOURCE, WORKSPACE, scope.channel, wanted, set_by=f"telegram:{user}"
        )
        await self.bridge.router.reload()
        return f"Done: new conversations in this chat go to agent **{wanted}**."

    # -- posting -------------------------------------------------------------------------

    async def show_working(self, thread: ThreadRef) -> None:
        await self.bot.send_chat_action(
            int(thread.channel), ChatAction.TYPING, message_thread_id=_topic(thread)
        )

    async def post(self, reply: Reply) -> list[str]:
        """Post the reply's parts in order, as HTML (plain text if Telegram rejects it)."""
        thread = reply.thread
        parts = split_html(to_html(reply.text), self.config.max_chars) or ["…"]
        chat = int(thread.channel)
        quote = _quote(reply)
        posted: list[str] = []
        draft = self._drafts.pop(thread.key, None) if not reply.posted else None
        try:
            if draft is not None:  # the streamed answer's message becomes its first part
                await self._edit(chat, draft, parts[0])
                posted.append(str(draft))
            for part in parts[len(reply.posted) + len(posted) :]:
                await self._pace(chat)
                message = await self._send(thread, chat, part, quote)
                if message.chat_id != chat:  # the group became a supergroup on the way
                    chat = message.chat_id
                    thread = ThreadRef(SOURCE, WORKSPACE, str(chat), thread.thread)
                posted.append(str(message.message_id))
                if chat < 0 and _topic(thread) is None:
                    assert self.bridge is not None
                    key = post_key(chat, message.message_id)
                    self._recent_posts[key] = thread.key
                    if len(self._recent_posts) > 10_000:
                        self._recent_posts.popitem(last=False)
                    await self.bridge.store.remember_posts(thread.key, [key])
        except PlatformRetryable as exc:
            exc.posted = posted
            raise
        except Forbidden as exc:
            assert self.bridge is not None
            await self.bridge.new_conversation(thread)
            raise PlatformRejected(f"telegram: {exc.message}; the thread is closed") from exc
        return posted

    async def draft(self, thread: ThreadRef, text: str) -> None:
        """A streaming agent's answer so far: sent once, then edited as it grows."""
        shown = split_html(to_html(text), self.config.max_chars)[0]
        chat = int(thread.channel)
        message_id = self._drafts.get(thread.key)
        if message_id is None:
            await self._pace(chat)
            message = await self._send(thread, chat, shown, None)
            self._drafts[thread.key] = message.message_id
        else:
            await self._edit(chat, message_id, shown)

    async def _edit(self, chat: int, message_id: int, html: str) -> None:
        """Replace a message's text (plain if the HTML is refused; no change is no error)."""
        for parse_mode in (ParseMode.HTML, None):
            try:
                await self.bot.edit_message_text(
                    html if parse_mode else plain(html),
                    chat_id=chat,
                    message_id=message_id,
                    parse_mode=parse_mode,
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
                return
            except BadRequest as exc:
                reason = exc.message.lower()
                if "not modified" in reason:
                    return
                if parse_mode is None or "can't parse entities" not in reason:
                    raise PlatformRetryable(f"telegram: {exc.message}") from exc
            except RetryAfter as exc:
                raise PlatformRetryable(f"telegram: {exc}", retry_after=_wait_of(exc)) from exc
            except (NetworkError, TelegramError) as exc:
                raise PlatformRetryable(f"telegram: {exc}") from exc

    async def _pace(self, chat: int) -> None:
        """The chat's own slots first, the bot-wide one last: a slot of the shared 30/s
        taken early would go unused while the message waits for its chat."""
        if chat < 0:
            await self._per_group.wait(str(chat))
        await self._per_chat.wait(str(chat))
        await self._overall.wait("all")

    async def _send(self, thread: ThreadRef, chat: int, text: str, quote: int | None) -> Any:
        """One message; waits out short 429s, falls back to plain text, follows migrations."""
        html = True
        for _ in range(5):
            try:
                return await self.bot.send_message(
                    chat,
                    text if html else plain(text),
                    parse_mode=ParseMode.HTML if html else None,
                    message_thread_id=_topic(thread),
                    reply_parameters=(
                        ReplyParameters(quote, allow_sending_without_reply=True)
                        if quote is not None
                        else None
                    ),
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
            except RetryAfter as exc:
                wait = _wait_of(exc)
                if wait > MAX_WAIT_S:
                    raise PlatformRetryable(f"telegram: {exc}", retry_after=wait) from exc
                await asyncio.sleep(wait)
            except ChatMigrated as exc:
                chat = int(exc.new_chat_id)
                thread = await self._migrate(thread, chat)
            except BadRequest as exc:
                if html and "can't parse entities" in exc.message.lower():
                    log.warning("telegram: HTML refused (%s); sending plain text", exc.message)
                    html = False
                    continue
                raise PlatformRejected(f"telegram: {exc.message}") from exc
            except Forbidden:
                raise
            except (NetworkError, TelegramError) as exc:
                raise PlatformRetryable(f"telegram: {exc}") from exc
        raise PlatformRetryable("telegram: still rate limited after several waits")

    async def _migrate(self, thread: ThreadRef, chat: int) -> ThreadRef:
        """A group became a supergroup: its threads continue under the new chat id."""
        assert self.bridge is not None
        old = f"{SOURCE}:{WORKSPACE}/{thread.channel}/"
        new = f"{SOURCE}:{WORKSPACE}/{chat}/"
        moved = await self.bridge.store.move_threads(old, new, str(chat))
        log.info("telegram: chat %s is now %s; moved %d thread(s)", thread.channel, chat, moved)
        return ThreadRef(SOURCE, WORKSPACE, str(chat), thread.thread)


def _chat_scope(chat_id: int) -> ThreadRef:
    """The chat as a routing scope (routes match on workspace and channel)."""
    return ThreadRef(SOURCE, WORKSPACE, str(chat_id), "-")


def _topic(thread: ThreadRef) -> int | None:
    """The forum topic a thread is, or None (a private chat, a reply chain in a group)."""
    if thread.thread.startswith(TOPIC):
        return int(thread.thread.removeprefix(TOPIC))
    return None


def _quote(reply: Reply) -> int | None:
    """The message an answer replies to in a group: the person's message it answers, or for
    a notice the chain's first message. In a private chat nothing is quoted."""
    thread = reply.thread
    if not thread.channel.startswith("-"):
        return None
    quote = message_id_of(reply.reply_to)
    if quote is None and _topic(thread) is None:
        quote = int(thread.thread)
    return quote


def _wait_of(exc: RetryAfter) -> float:
    """Seconds to wait; python-telegram-bot 22 warns that this int becomes a timedelta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value: int | float | timedelta = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
