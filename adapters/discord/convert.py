"""Discord messages ⇄ threadbridge's core types: the pure functions where Discord's rules live.

A mention in a guild text channel starts a thread on that message; Discord gives such a thread
the message's own id, so the thread is known (and stored) before it is created, and a replay of
the message after a RESUME finds the same thread. No I/O here; `app.py` does that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import discord

from core.model import Author, Inbound, ThreadRef

SOURCE = "discord"
DM_WORKSPACE = "@me"
THREAD_TYPES = {
    discord.ChannelType.public_thread,
    discord.ChannelType.private_thread,
    discord.ChannelType.news_thread,
}
THREAD_NAME_CHARS = 90  # Discord allows 100

Kind = Literal["dm", "mention", "thread"]


@dataclass(frozen=True, slots=True)
class Heard:
    """A person's message that may be for the agent, and why."""

    kind: Kind  # dm; a mention in a channel (open a thread); a message in a thread
    thread: ThreadRef
    message_id: int
    mentioned: bool
    text: str
    author: Author
    data: dict[str, Any]
    open_thread_in: int | None = None  # the channel to open the thread in (kind "mention")


def hear(message: discord.Message, bot_id: int) -> Heard | None:
    """The message as the bridge sees it, or None: bots (ourselves too), system messages."""
    if message.author.bot or message.type not in (
        discord.MessageType.default,
        discord.MessageType.reply,
    ):
        return None
    channel = message.channel
    mentioned = any(user.id == bot_id for user in message.mentions)
    text = agent_text(message, bot_id)
    author = Author(str(message.author.id), message.author.display_name)
    facts: dict[str, Any] = {
        "user_id": str(message.author.id),
        "username": message.author.name,
        "display_name": message.author.display_name,
        "jump_url": message.jump_url,
    }
    if message.guild is None:
        thread = ThreadRef(SOURCE, DM_WORKSPACE, str(channel.id), str(channel.id))
        return Heard("dm", thread, message.id, mentioned, text, author, {
            "channel_id": str(channel.id), **facts,
        })  # fmt: skip
    guild = {"guild_id": str(message.guild.id), "guild_name": message.guild.name}
    if getattr(channel, "type", None) in THREAD_TYPES:
        parent = getattr(channel, "parent", None)
        parent_id = getattr(channel, "parent_id", None) or channel.id
        thread = ThreadRef(SOURCE, str(message.guild.id), str(parent_id), str(channel.id))
        return Heard("thread", thread, message.id, mentioned, text, author, {
            **guild,
            "channel_id": str(parent_id),
            "channel_name": getattr(parent, "name", "") or "",
            "thread_id": str(channel.id),
            **facts,
        })  # fmt: skip
    if not mentioned:
        return None
    thread = ThreadRef(SOURCE, str(message.guild.id), str(channel.id), str(message.id))
    return Heard(
        "mention",
        thread,
        message.id,
        mentioned,
        text,
        author,
        {
            **guild,
            "channel_id": str(channel.id),
            "channel_name": getattr(channel, "name", "") or "",
            "thread_id": str(message.id),
            **facts,
        },
        open_thread_in=channel.id,
    )


def agent_text(message: discord.Message, bot_id: int) -> str:
    """The words without the bot's mention, and a line per attachment (agents read text)."""
    text = re.sub(rf"<@!?{bot_id}>", "", message.content or "")
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    lines = [text] if text else []
    lines += [f"[attachment: {a.filename} {a.url}]" for a in message.attachments]
    return "\n".join(lines)


def thread_name(text: str) -> str:
    """A thread's name: the first words of the message that opened it."""
    words = " ".join(text.split()).strip() or "Conversation"
    if len(words) <= THREAD_NAME_CHARS:
        return words
    cut = words[:THREAD_NAME_CHARS].rsplit(" ", 1)[0] or words[:THREAD_NAME_CHARS]
    return cut + "…"


def to_inbound(heard: Heard) -> Inbound:
    return Inbound(
        event_id=f"{SOURCE}:{heard.message_id}",
        thread=heard.thread,
        author=heard.author,
        text=heard.text,
        data=heard.data,
    )


def message_id_of(event_id: str | None) -> int | None:
    """The Discord message id inside one of our event ids."""
    if not event_id or not event_id.startswith(f"{SOURCE}:"):
        return None
    tail = event_id.removeprefix(f"{SOURCE}:")
    return int(tail) if tail.isdigit() else None
