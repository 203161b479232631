"""Telegram updates ⇄ threadbridge's core types: the pure functions where Telegram's rules live.

What a message says to the bot (a command, a mention, a reply to one of its messages), which
thread it belongs to, what the agent reads, and the facts kept on the conversation. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from telegram import Message, MessageEntity, Update

from core.model import Author, Inbound, ThreadRef

SOURCE = "telegram"
WORKSPACE = "-"  # Telegram has no workspace above a chat
TOPIC = "topic-"  # a forum topic's thread is "topic-<message_thread_id>"; a reply chain's, a number
NON_TEXT = (
    "photo", "voice", "sticker", "document", "video", "audio", "animation", "video_note",
    "location", "contact", "poll",
)  # fmt: skip

Place = Literal["private", "topic", "group"]


@dataclass(frozen=True, slots=True)
class BotInfo:
    """Who the bot is, from `getMe`."""

    id: int
    username: str


@dataclass(frozen=True, slots=True)
class Heard:
    """A person's message in a chat the bot is in, read for what it says to the bot."""

    bot_id: int
    update_id: int
    place: Place
    chat_id: int
    message_id: int
    topic_id: int | None  # a real forum topic only (`is_topic_message`)
    text: str  # the text or caption, the bot's @mention taken out
    command: str | None  # "new", "start", "agent" … (lowercase, no slash, no @bot)
    args: str  # what follows the command
    mentioned: bool
    replied_to_bot: int | None  # the id of the bot's message this replies to
    non_text: str | None  # "photo", "sticker" … when the message has no text or caption
    author: dict[str, Any]
    chat: dict[str, Any]

    @property
    def event_id(self) -> str:
        """One id per update of this bot; a redelivered webhook carries the same `update_id`."""
        return f"{SOURCE}:{self.bot_id}:{self.update_id}:{self.chat_id}:{self.message_id}"

    @property
    def for_the_bot(self) -> bool:
        """Whether the message addresses the bot without any route saying `respond = "all"`."""
        return self.place == "private" or self.mentioned or self.replied_to_bot is not None


def hear(update: Update, bot: BotInfo) -> Heard | None:
    """The person's message in `update`, or None: edits, channel posts, bots, service messages."""
    message = update.message
    if message is None or message.from_user is None or message.from_user.is_bot:
        return None
    chat = message.chat
    if not _well_typed(message):
        return None
    text = message.text if message.text is not None else message.caption or ""
    entities = message.entities if message.text is not None else message.caption_entities
    command, args = _command(text, entities, bot)
    mentioned = _mentions(text, entities, bot)
    non_text = None if text else next((k for k in NON_TEXT if getattr(message, k, None)), None)
    if not text and non_text is None:
        return None  # joins, pins, topic edits and other service messages
    if chat.type == "private":
        place: Place = "private"
    elif message.is_topic_message and message.message_thread_id:
        place = "topic"
    else:
        place = "group"
    user = message.from_user
    return Heard(
        bot_id=bot.id,
        update_id=update.update_id,
        place=place,
        chat_id=chat.id,
        message_id=message.message_id,
        topic_id=message.message_thread_id if place == "topic" else None,
        text=without_mention(args if command else text, bot.username).strip(),
        command=command,
        args=args,
        mentioned=mentioned,
        replied_to_bot=_replied_to_bot(message, bot),
        non_text=non_text,
        author={
            "user_id": user.id,
            "username": user.username,
            "first_name": user.first_name,
            "last_name": user.last_name,
            "language_code": user.language_code,
        },
        chat={"chat_id": chat.id, "chat_type": chat.type, "chat_title": chat.title},
    )


def _well_typed(message: Message) -> bool:
    """Whether the ids and text have the types Telegram sends (PTB does not check them)."""
    ids = (message.chat.id, message.message_id, message.from_user and message.from_user.id)
    texts = (message.text, message.caption, message.chat.type)
    return all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and all(
        t is None or isinstance(t, str) for t in texts
    )


def _command(
    text: str, entities: tuple[MessageEntity, ...], bot: BotInfo
) -> tuple[str | None, str]:
    first = next((e for e in entities if e.offset == 0), None)
    if first is None or first.type != MessageEntity.BOT_COMMAND:
        return None, text
    word = text[: first.length]
    name, _, target = word[1:].partition("@")
    if target and target.lower() != bot.username.lower():
        return None, text  # a command for another bot
    return name.lower(), text[first.length :].strip()


def _mentions(text: str, entities: tuple[MessageEntity, ...], bot: BotInfo) -> bool:
    handle = f"@{bot.username}".lower()
    for entity in entities:
        named = _utf16_slice(text, entity.offset, entity.length).lower()
        if entity.type == MessageEntity.MENTION and named == handle:
            return True
        if entity.type == MessageEntity.TEXT_MENTION and entity.user and entity.user.id == bot.id:
            return True
    return False


def _utf16_slice(text: str, offset: int, length: int) -> str:
    encoded = text.encode("utf-16-le")
    return encoded[offset * 2 : (offset + length) * 2].decode("utf-16-le", errors="replace")


def _replied_to_bot(message: Message, bot: BotInfo) -> int | None:
    replied = message.reply_to_message
    if replied is None or replied.from_user is None or replied.from_user.id != bot.id:
        return None
    if replied.forum_topic_created is not None:
        return None  # in a topic every message "replies" to the topic's first message
    return replied.message_id


def without_mention(text: str, username: str) -> str:
    """The text with the bot's @handle taken out, wherever it stands."""
    handle = f"@{username}"
    at = text.lower().find(handle.lower())
    while at >= 0:
        text = text[:at] + text[at + len(handle) :]
        at = text.lower().find(handle.lower())
    return " ".join(part for part in text.split(" ") if part) if "\n" not in text else text


def thread_of(heard: Heard, chain: str | None = None) -> ThreadRef:
    """The thread a message continues or starts (the threads table in PLATFORMS.md).

    Private chat: the chat. Forum topic: the topic. Group: the reply chain, named by the
    message that started it; `chain` is the thread of the bot's message it replies to.
    """
    chat = str(heard.chat_id)
    if heard.place == "private":
        return ThreadRef(SOURCE, WORKSPACE, chat, chat)
    if heard.place == "topic":
        return ThreadRef(SOURCE, WORKSPACE, chat, f"{TOPIC}{heard.topic_id}")
    if chain is not None:
        return ThreadRef.parse(chain)
    root = heard.replied_to_bot if heard.replied_to_bot is not None else heard.message_id
    return ThreadRef(SOURCE, WORKSPACE, chat, str(root))


def author_name(heard: Heard) -> str:
    a = heard.author
    full = " ".join(p for p in (a.get("first_name"), a.get("last_name")) if p)
    return full or str(a.get("username") or a["user_id"])


def conversation_data(heard: Heard) -> dict[str, Any]:
    """The facts kept on a Telegram conversation (and sent to stateful agent services)."""
    data: dict[str, Any] = {**heard.chat, "topic_id": heard.topic_id, **heard.author}
    return {k: v for k, v in data.items() if v is not None}


def to_inbound(heard: Heard, thread: ThreadRef) -> Inbound:
    return Inbound(
        event_id=heard.event_id,
        thread=thread,
        author=Author(str(heard.author["user_id"]), author_name(heard)),
        text=heard.text,
        data=conversation_data(heard),
    )


def message_id_of(event_id: str | None) -> int | None:
    """The Telegram message id inside one of our event ids (see `Heard.event_id`)."""
    if not event_id or not event_id.startswith(f"{SOURCE}:"):
        return None
    tail = event_id.rsplit(":", 1)[-1]
    return int(tail) if tail.lstrip("-").isdigit() else None


def post_key(chat_id: int | str, message_id: int | str) -> str:
    """The store's key of a message the bot posted (see `Store.remember_posts`)."""
    return f"{SOURCE}:{chat_id}:{message_id}"
