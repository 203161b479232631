"""The Slack channel: bolt's AsyncApp over HTTP events or Socket Mode, and posting replies.

Listeners only decide whether a message is for the agent and hand it to the bridge, which
stores it before Slack gets its acknowledgement (`process_before_response`), so an event is
never acknowledged and then lost. Replies come back through `post`, rendered to mrkdwn and
split at `max_chars`, in the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Coroutine
from typing import Any

import aiohttp
from slack_bolt import BoltResponse
from slack_bolt.async_app import AsyncApp
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.config import SlackConfig
from adapters.slack.convert import (
    SOURCE,
    BotIdentity,
    Heard,
    conversation_data,
    hear,
    post_args,
    to_inbound,
)
from adapters.slack.format import to_mrkdwn
from adapters.slack.marks import (
    parts_of,
    placeholder_mark,
    placeholders_in,
    read_marked,
    reply_mark,
)
from core.bridge import Bridge
from core.errors import MessageRejected, PlatformRejected, PlatformRetryable, StartupError
from core.model import Reply, ThreadRef
from core.pacing import Pacer
from core.search import storable
from core.text import split_text

log = logging.getLogger(__name__)
# bolt warns that the token is unused whenever SLACK_BOT_TOKEN is set and a client is given
# (we give one, for api_base_url); the warning is about bolt's own lookup, not a problem.
logging.getLogger("slack_bolt.AsyncApp").addFilter(
    lambda record: record.getMessage() != warning_client_prioritized_and_token_skipped()
)

# Errors after which a post can never succeed: the bot cannot see or write to the channel.
GONE = {"message_not_found", "cant_update_message", "cant_delete_message"}  # placeholder gone
FOR_GOOD = {
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "msg_too_long",
    "no_text",
    "restricted_action",
    "thread_not_found",
    "account_inactive",
    "invalid_auth",
    "not_authed",
}
NEW_WORDS = {"new", "/new"}
LOOKUP_S = 1.5  # the most a message's names and permalink may hold up Slack's acknowledgement
FILE_ONLY_NOTICE = (
    "The agent reads text only: it was given the file's name and link, not what is in it."
)


class SlackAdapter:
    """Slack threads ⇄ the bridge."""

    source = SOURCE
    working_every_s: float | None = None

    def __init__(self, config: SlackConfig) -> None:
        self.config = config
        self.bridge: Bridge | None = None
        self.me: BotIdentity | None = None
        self.client = AsyncWebClient(
            token=config.secret("bot_token_env"),
            base_url=config.api_base_url,
            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
        )
        http_mode = config.mode() == "http"
        self.app = AsyncApp(
            client=self.client,
            signing_secret=config.secret("signing_secret_env") or None,
            process_before_response=True,
            request_verification_enabled=http_mode,
        )
        self._socket: Any = None
        # thread key -> a "thinking" message being posted (its ts then lives in the store)
        self._placeholders: dict[str, asyncio.Task[str | None]] = {}
        # thread key -> the lock its posts take turns on (gone once no post holds it)
        self._posting: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._assistant_threads: set[str] = set()
        self._names: dict[str, str] = {}  # user id -> display name
        self._channel_names: dict[str, str] = {}
        self._ignored_channels: set[str] = set()
        self._workspace_url = ""  # https://TEAM.slack.com/, from auth.test
        self._pacer = Pacer(config.post_rate_per_channel, config.post_burst)
        self._register()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, bridge: Bridge) -> None:
        self.bridge = bridge
        # One connection pool for every Web API call; without it slack_sdk opens (and TLS
        # handshakes) a new connection per call, which capped the bridge at ~50 events/s.
        self.client.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.client.timeout)
        )
        try:
            identity = await self.client.auth_test()
        except SlackApiError as exc:
            error = str(exc.response.get("error", "")) if exc.response is not None else ""
            raise StartupError(
                f"slack: Slack refused the bot token in {self.config.bot_token_env} ({error})",
                "set it to the app's Bot User OAuth Token (xoxb-…), from OAuth & Permissions",
            ) from None
        except (OSError, TimeoutError) as exc:
            raise StartupError(
                f"slack: cannot reach {self.config.api_base_url} ({exc!r})",
                "check the network, a proxy, or [slack] api_base_url",
            ) from None
        self.me = BotIdentity(str(identity["user_id"]), str(identity.get("bot_id") or ""))
        self._workspace_url = str(identity.get("url") or "")
        if self.config.mode() == "socket":
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            self._socket = AsyncSocketModeHandler(self.app, self.config.secret("app_token_env"))
            await self._socket.connect_async()
            log.info("slack: Socket Mode connected as %s", self.me.user_id)
        else:
            log.info("slack: HTTP events at /slack/events, bot user %s", self.me.user_id)

    async def why_not_ready(self) -> str | None:
        """Why Slack cannot bring messages now, or None: auth.test must have passed, and in
        Socket Mode the socket be connected (it reconnects by itself)."""
        if self.me is None:
            return "auth.test has not passed"
        if self._socket is not None and not await self._socket.client.is_connected():
            return "Socket Mode is not connected"
        return None

    async def stop(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()
        session = getattr(self.client, "session", None)
        if session is not None:
            await session.close()

    # -- listeners -----------------------------------------------------------------------

    def _register(self) -> None:
        self.app.event("app_mention")(self._on_event)
        self.app.event("message")(self._on_event)
        self.app.event("assistant_thread_started")(self._on_assistant_thread)
        self.app.event("assistant_thread_context_changed")(self._ignore)
        self.app.command("/agent")(self._on_agent_command)
        self.app.error(self._on_error)

    async def _ignore(self, ack: Any) -> None:
        await ack()

    async def _on_error(self, error: Exception) -> BoltResponse | None:
        """A signed request bolt or a listener cannot read (a field of the wrong type): a 400,
        which Slack does not send again; anything else (the store down…) a 503, so Slack sends
        it again and the event id keeps it from being answered twice."""
        if isinstance(error, (TypeError, ValueError, AttributeError, KeyError, IndexError)):
            log.warning("slack: malformed request refused: %r", error)
            return BoltResponse(status=400, body="malformed request")
        log.error("slack: request failed; answered 503 so Slack sends it again", exc_info=error)
        return BoltResponse(status=503, body="not stored; send it again")

    async def _on_event(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        assert self.bridge is not None
        assert self.me is not None
        heard = hear(body, event, self.me)
        if heard is None or not await self._is_ours(heard):
            return
        if heard.kind == "dm" and event.get("thread_ts") and heard.text.lower() in NEW_WORDS:
            await self.bridge.new_conversation(heard.thread)
            await self.bridge.notify(
                heard.thread, "Started afresh: your next message here opens a new conversation."
            )
            return
        name, data = await self._facts(heard)
        if event.get("assistant_thread") or heard.thread.key in self._assistant_threads:
            self._assistant_threads.add(heard.thread.key)
        inbound = to_inbound(heard, name, data)
        try:
            await self.bridge.submit(inbound)
        except MessageRejected as exc:
            await self.bridge.notify(heard.thread, exc.reason)
            return
        if heard.files and not heard.text:
            await self.bridge.notify(heard.thread, FILE_ONLY_NOTICE)

    async def _is_ours(self, heard: Heard) -> bool:
        allowed = self.config.channels
        if allowed is not None and heard.kind != "dm" and heard.thread.channel not in allowed:
            if heard.thread.channel not in self._ignored_channels:
                self._ignored_channels.add(heard.thread.channel)
                log.info(
                    "slack: ignoring channel %s (not in [slack] channels)", heard.thread.channel
                )
            return False
        if heard.kind == "thread_reply":
            assert self.bridge is not None
            return await self.bridge.store.thread_known(heard.thread.key)
        return True

    async def _on_assistant_thread(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        info = event.get("assistant_thread") or {}
        channel, ts = info.get("channel_id"), info.get("thread_ts")
        if not channel or not ts:
            return
        team = str(body.get("team_id") or "-")
        if not all(storable(part) for part in (team, str(channel), str(ts))):
            return  # no Slack id holds a lone surrogate or a NUL: not from Slack
        thread = ThreadRef(SOURCE, team, str(channel), str(ts))
        self._assistant_threads.add(thread.key)
        assert self.bridge is not None
        decision = await self.bridge.router.agent_for(thread)
        await self.bridge.notify(thread, f"Hi! Agent *{decision.agent}* answers here. Ask away.")

    async def _on_agent_command(self, ack: Any, command: dict[str, Any]) -> None:
        await ack(await self._agent_command(command))

    async def _agent_command(self, command: dict[str, Any]) -> str:
        """`/agent` shows this channel's agent; `/agent NAME` routes the channel (admins)."""
        assert self.bridge is not None
        team, channel = str(command.get("team_id", "-")), str(command.get("channel_id", ""))
        user, wanted = str(command.get("user_id", "")), str(command.get("text", "")).strip()
        here = ThreadRef(SOURCE, team, channel, "-")
        decision = await self.bridge.router.agent_for(here)
        if not wanted:
            return f"Agent *{decision.agent}* answers in this channel ({decision.why})."
        if wanted == "new":
            if not channel.startswith("D"):
                return (
                    "`/agent new` works in a DM with me. In a channel, mention me in a new "
                    "message to start a new conversation."
                )
            ended = await self.bridge.store.end_threads_under(here.key.removesuffix("-"))
            return (
                f"Started afresh: {len(ended)} open conversation(s) here are closed; your next "
                "message opens a new one."
            )
        if user not in self.config.admins:
            return "Only a threadbridge admin can choose the agent of a channel; ask one of them."
        if wanted not in self.bridge.config.agent_configs:
            known = ", ".join(sorted(self.bridge.config.agent_configs))
            return f"There is no agent *{wanted}*. Agents: {known}."
        await self.bridge.store.set_route(SOURCE, team, channel, wanted, set_by=f"slack:{user}")
        await self.bridge.router.reload()
        return f"Done: new threads in this channel go to agent *{wanted}*."

    # -- Slack facts ---------------------------------------------------------------------

    async def _facts(self, heard: Heard) -> tuple[str, dict[str, Any]]:
        """The author's name and, for a new thread, the conversation's data. Best effort and
        at most LOOKUP_S: Slack wants its acknowledgement within 3 s, and it waits on this."""
        found: dict[str, str] = {}
        lookups: dict[str, Coroutine[Any, Any, str]] = {}
        known = {"user": self._names.get(heard.author_id)}
        if heard.kind != "thread_reply":
            known["channel"] = self._channel_names.get(heard.thread.channel)
            known["permalink"] = self._built_permalink(heard.thread)
        for key, value in known.items():
            if value is not None:
                found[key] = value  # known already: the common case needs no task
            elif key == "user":
                lookups[key] = self._user_name(heard.author_id)
            elif key == "channel":
                lookups[key] = self._channel_name(heard.thread.channel)
            else:
                lookups[key] = self._permalink(heard.thread)
        if lookups:
            tasks = {key: asyncio.ensure_future(lookup) for key, lookup in lookups.items()}
            done, late = await asyncio.wait(tasks.values(), timeout=LOOKUP_S)
            for task in late:
                task.cancel()
            if late:
                log.debug("slack: %d lookup(s) for %s were too slow", len(late), heard.thread.key)
            found.update({key: task.result() for key, task in tasks.items() if task in done})
        name = found.get("user", "")
        if heard.kind == "thread_reply":
            return name, {}
        data = conversation_data(
            heard,
            channel_name=found.get("channel", ""),
            user_name=name,
            permalink=found.get("permalink", ""),
        )
        return name, data

    async def _user_name(self, user_id: str) -> str:
        if user_id not in self._names:
            try:
                answer = await self.client.users_info(user=user_id)
            except (SlackApiError, OSError) as exc:
                log.debug("slack: users.info %s failed: %s", user_id, exc)
                return ""
            user = answer.get("user") or {}
            profile = user.get("profile") or {}
            self._names[user_id] = str(
                profile.get("display_name") or user.get("real_name") or user.get("name") or ""
            )
        return self._names[user_id]

    async def _channel_name(self, channel: str) -> str:
        if channel not in self._channel_names:
            try:
                answer = await self.client.conversations_info(channel=channel)
            except (SlackApiError, OSError) as exc:
                log.debug("slack: conversations.info %s failed: %s", channel, exc)
                return ""
            self._channel_names[channel] = str((answer.get("channel") or {}).get("name") or "")
        return self._channel_names[channel]

    def _built_permalink(self, thread: ThreadRef) -> str | None:
        if not self._workspace_url.startswith("https://"):
            return None
        ts = thread.thread.replace(".", "")
        return f"{self._workspace_url.rstrip('/')}/archives/{thread.channel}/p{ts}"

    async def _permalink(self, thread: ThreadRef) -> str:
        """The thread's link: built the way Slack builds it when auth.test gave the workspace's
        URL (no call before the acknowledgement), else asked of chat.getPermalink."""
        built = self._built_permalink(thread)
        if built is not None:
            return built
        try:
            answer = await self.client.chat_getPermalink(
                channel=thread.channel, message_ts=thread.thread
            )
        except (SlackApiError, OSError) as exc:
            log.debug("slack: chat.getPermalink %s failed: %s", thread.key, exc)
            return ""
        return str(answer.get("permalink") or "")

    # -- posting -------------------------------------------------------------------------

    async def show_working(self, thread: ThreadRef) -> None:
        if thread.key in self._assistant_threads:
            await self.client.api_call(
                "assistant.threads.setStatus",
                json={
                    "channel_id": thread.channel,
                    "thread_ts": thread.thread,
                    "status": "is thinking…",
                },
            )
            return
        await self._placeholder(thread, self.config.working_text)

    async def _placeholder(self, thread: ThreadRef, text: str) -> str | None:
        """The ts of the message the thread's next answer goes into: the one in the store
        (posted by any instance, before a restart too), or one posted now with `text`."""
        task = self._placeholders.get(thread.key)
        if task is None:
            assert self.bridge is not None
            known = await self.bridge.store.draft_of(thread.key)
            if known == "":  # another instance is posting it right now
                return await self._await_draft(thread)
            if known is not None:
                return known
            task = self._placeholders.get(thread.key)  # another caller may have started one
            if task is None:
                task = asyncio.create_task(self._post_placeholder(thread, text))
                self._placeholders[thread.key] = task
                task.add_done_callback(lambda _: self._placeholders.pop(thread.key, None))
        # The bridge cancels show_working when the answer is ready; the post goes on, and
        # the store learns its ts, so `post` never leaves a placeholder behind.
        return await asyncio.shield(task)

    async def _post_placeholder(self, thread: ThreadRef, text: str) -> str | None:
        """Note in the store that a placeholder is being posted, post it, then note its ts:
        an instance about to post the answer meanwhile waits for it (`_await_draft`)."""
        assert self.bridge is not None
        if not await self.bridge.store.keep_draft(thread.key, ""):
            return await self._await_draft(thread)
        try:
            args = post_args(thread, text, placeholder_mark(thread))
            answer = await self.client.chat_postMessage(**args)
        except BaseException:
            await self.bridge.store.drop_draft(thread.key, "")
            raise
        ts = str(answer["ts"])
        await self.bridge.store.fill_draft(thread.key, ts)
        return ts

    async def _await_draft(self, thread: ThreadRef, wait_s: float = 5.0) -> str | None:
        """The draft another instance is posting, once it has a ts; a note still without one
        after `wait_s` was left by a crash mid-post, and Slack tells whether that post landed."""
        assert self.bridge is not None
        deadline = asyncio.get_running_loop().time() + wait_s
        while (known := await self.bridge.store.draft_of(thread.key)) == "":
            if asyncio.get_running_loop().time() > deadline:
                return await self._adopt_placeholder(thread)
            await asyncio.sleep(0.05)
        return known

    async def _adopt_placeholder(self, thread: ThreadRef) -> str | None:
        """The placeholder a crash left unrecorded, found in the thread by its metadata: the
        newest becomes the thread's draft and older ones are deleted; None when none landed."""
        assert self.bridge is not None
        found = placeholders_in(await self._marked(thread))
        if not found:
            await self.bridge.store.drop_draft(thread.key, "")
            return None
        *older, newest = found
        await self.bridge.store.fill_draft(thread.key, newest)
        log.info("slack: %s: took over a placeholder a crash left unrecorded", thread.key)
        for ts in older:
            with contextlib.suppress(SlackApiError):
                await self.client.chat_delete(channel=thread.channel, ts=ts)
        return await self.bridge.store.draft_of(thread.key) or None

    async def _marked(self, thread: ThreadRef) -> list[dict[str, Any]]:
        """The bot's marked messages in the thread (adapters/slack/marks.py); none when Slack
        cannot say (a missing history scope, an outage): then a post goes ahead, as a message
        shown twice is better than one never shown."""
        assert self.me is not None
        try:
            return await read_marked(self.client, thread, self.me)
        except (SlackApiError, OSError, TimeoutError) as exc:
            error = _error_of(exc) if isinstance(exc, SlackApiError) else repr(exc)
            log.warning("slack: cannot read %s to check for earlier posts: %s", thread.key, error)
            return []

    async def draft(self, thread: ThreadRef, text: str) -> None:
        """A streaming agent's answer so far, in the placeholder (posted now if need be)."""
        parts = split_text(to_mrkdwn(text), self.config.max_chars)
        shown = parts[0] + (" …" if len(parts) > 1 else "")
        ts = await self._placeholder(thread, shown)
        if ts is not None:
            await self.client.chat_update(channel=thread.channel, ts=ts, text=shown)

    async def _take_placeholder(self, thread: ThreadRef) -> str | None:
        """The placeholder the answer goes into, once any post of it in flight is done."""
        assert self.bridge is not None
        task = self._placeholders.get(thread.key)
        if task is not None:
            with contextlib.suppress(Exception):  # never posted: nothing to update or delete
                await asyncio.wait_for(asyncio.shield(task), 10)
        known = await self.bridge.store.draft_of(thread.key)
        return await self._await_draft(thread) if known == "" else known

    async def post(self, reply: Reply) -> list[str]:
        """Post the reply's parts in order; a retry resumes after the parts already posted.

        A single-part answer replaces the placeholder; the placeholder is forgotten only after
        that, so a crash in between repeats the same edit rather than posting the answer twice.
        Each part is marked with metadata; a retry first reads the thread for marked parts an
        attempt cut short posted without recording them, and does not post those again. Posts
        in one thread go one at a time: a retry that took over a lapsed lease here waits for
        the attempt still under way, then reads what it posted.
        """
        lock = self._posting.get(reply.thread.key)
        if lock is None:
            lock = self._posting[reply.thread.key] = asyncio.Lock()
        async with lock:
            return await self._post_parts(reply)

    async def _post_parts(self, reply: Reply) -> list[str]:
        thread = reply.thread
        parts = split_text(to_mrkdwn(reply.text), self.config.max_chars) or ["…"]
        there = parts_of(await self._marked(thread), reply.key) if reply.retry else {}
        todo = range(len(reply.posted), len(parts))
        posted: list[str] = []
        try:
            if not reply.posted and not there:
                placeholder = await self._take_placeholder(thread)
                if placeholder is not None and await self._into_placeholder(
                    reply, parts, placeholder
                ):
                    return [placeholder]
            for index in todo:
                if index not in there:
                    await self._pacer.wait(f"{thread.workspace}/{thread.channel}")
                    args = post_args(thread, parts[index], reply_mark(reply.key, index))
                    there[index] = str((await self.client.chat_postMessage(**args))["ts"])
                posted.append(there[index])
        except SlackApiError as exc:
            raise _platform_error(exc, posted) from exc
        return posted

    async def _into_placeholder(self, reply: Reply, parts: list[str], placeholder: str) -> bool:
        """Write a single-part answer into the placeholder (True), or delete the placeholder
        so that the parts follow it as new messages (False; also when it is gone)."""
        assert self.bridge is not None
        channel = reply.thread.channel
        try:
            if len(parts) == 1:  # the store forgets it when the post is marked sent
                mark = reply_mark(reply.key, 0)
                await self.client.chat_update(
                    channel=channel, ts=placeholder, text=parts[0], metadata=mark
                )
                return True
            await self.client.chat_delete(channel=channel, ts=placeholder)
        except SlackApiError as exc:
            if _error_of(exc) not in GONE:
                raise
        await self.bridge.store.drop_draft(reply.thread.key, placeholder)
        return False


def _error_of(exc: SlackApiError) -> str:
    return str(exc.response.get("error", "")) if exc.response is not None else ""


def _platform_error(exc: SlackApiError, posted: list[str]) -> Exception:
    error = str(exc.response.get("error", "")) if exc.response is not None else ""
    if error in FOR_GOOD:
        return PlatformRejected(f"slack: {error}")
    retry_after = None
    if exc.response is not None and exc.response.status_code == 429:
        retry_after = float(exc.response.headers.get("retry-after", 1) or 1)
    return PlatformRetryable(f"slack: {error or exc}", retry_after=retry_after, posted=posted)
