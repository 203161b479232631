"""Message metadata that marks what the bot posted, so that a retried post can see it.

A crash between a post and its record in the store leaves a message in Slack that the store
does not know. Every message the bot posts therefore carries metadata saying what it is — part
`n` of outbox reply `item`, or a "thinking" placeholder — and a post that may have been tried
before reads the thread (`conversations.replies` with `include_all_metadata`) to skip what is
already there. A first attempt never reads: it costs no extra call.
"""

from __future__ import annotations

from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.convert import BotIdentity
from core.model import ThreadRef

REPLY = "threadbridge_reply"
PLACEHOLDER = "threadbridge_placeholder"
PAGE = 200  # messages per conversations.replies call (Slack advises at most 200)
MAX_PAGES = 50  # a thread longer than 10,000 messages is read only that far


def reply_mark(key: str, part: int) -> dict[str, Any] | None:
    """The metadata of part `part` of the reply kept as outbox item `key` (None: no key)."""
    if not key:
        return None
    return {"event_type": REPLY, "event_payload": {"item": key, "part": part}}


def placeholder_mark(thread: ThreadRef) -> dict[str, Any]:
    """The metadata of a "thinking" placeholder: a crash before its ts is stored leaves it
    findable, so the next answer goes into it instead of leaving it thinking."""
    return {"event_type": PLACEHOLDER, "event_payload": {"thread": thread.key}}


def parts_of(messages: list[dict[str, Any]], key: str) -> dict[int, str]:
    """Part number → ts of the messages that hold parts of reply `key` (the first of each)."""
    found: dict[int, str] = {}
    for message in messages:
        metadata = message.get("metadata") or {}
        payload = metadata.get("event_payload") or {}
        if metadata.get("event_type") != REPLY or str(payload.get("item")) != key:
            continue
        part = payload.get("part")
        if isinstance(part, int | str) and str(part).isdigit():
            found.setdefault(int(part), str(message["ts"]))
    return found


def placeholders_in(messages: list[dict[str, Any]]) -> list[str]:
    """The ts of the placeholders still in the thread (no answer went into them), oldest first.

    An answer written into a placeholder replaces its metadata with a reply mark."""
    found = [
        str(m["ts"]) for m in messages if (m.get("metadata") or {}).get("event_type") == PLACEHOLDER
    ]
    return sorted(found, key=float)


async def read_marked(
    client: AsyncWebClient, thread: ThreadRef, me: BotIdentity
) -> list[dict[str, Any]]:
    """The bot's own marked messages in the thread, page by page as Slack hands them out.

    Needs the history scope of the conversation's kind (channels:, groups:, im:, mpim:history);
    raises slack_sdk's errors for the caller to judge."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        answer = await client.conversations_replies(
            channel=thread.channel,
            ts=thread.thread,
            include_all_metadata=True,
            limit=PAGE,
            cursor=cursor,
        )
        for message in answer.get("messages") or []:
            mine = message.get("user") == me.user_id or (
                bool(me.bot_id) and message.get("bot_id") == me.bot_id
            )
            if mine and isinstance(message.get("metadata"), dict) and message.get("ts"):
                found.append(message)
        cursor = str((answer.get("response_metadata") or {}).get("next_cursor") or "") or None
        if cursor is None:
            break
    return found
