"""Platform-neutral types that every adapter and agent service speaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["user", "agent", "tool", "system"]


@dataclass(frozen=True, slots=True)
class ThreadRef:
    """One platform thread; its `key` names the conversation it maps to."""

    source: str
    workspace: str
    channel: str
    thread: str

    @property
    def key(self) -> str:
        return f"{self.source}:{self.workspace}/{self.channel}/{self.thread}"

    @classmethod
    def parse(cls, key: str) -> ThreadRef:
        """Read a key written by `key`; raise ValueError on anything else."""
        source, sep, rest = key.partition(":")
        parts = rest.split("/", 2)
        if not sep or not source or len(parts) != 3 or not all(parts):
            raise ValueError(
                f"not a thread key: {key!r} (expected source:workspace/channel/thread)"
            )
        return cls(source, parts[0], parts[1], parts[2])


@dataclass(frozen=True, slots=True)
class Author:
    """Who wrote a message on the platform."""

    id: str
    name: str = ""
    is_admin: bool = False


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message a person wrote, as an adapter hands it to the bridge."""

    event_id: str
    thread: ThreadRef
    author: Author
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "thread": self.thread.key,
            "author": {
                "id": self.author.id,
                "name": self.author.name,
                "is_admin": self.author.is_admin,
            },
            "text": self.text,
            "data": self.data,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Inbound:
        author = raw.get("author") or {}
        return cls(
            event_id=raw["event_id"],
            thread=ThreadRef.parse(raw["thread"]),
            author=Author(
                id=str(author.get("id", "")),
                name=str(author.get("name", "")),
                is_admin=bool(author.get("is_admin", False)),
            ),
            text=raw["text"],
            data=dict(raw.get("data") or {}),
        )


ReplyKind = Literal["answer", "notice"]


@dataclass(frozen=True, slots=True)
class Reply:
    """Text for an adapter to post in a thread (Markdown; the adapter renders it)."""

    thread: ThreadRef
    text: str
    kind: ReplyKind = "answer"
    reply_to: str | None = None  # the inbound event this answers, when there is one
    # Ids of the parts an earlier attempt already posted: a reply split in several messages
    # resumes after them instead of posting them again.
    posted: tuple[str, ...] = ()
    key: str = ""  # the same for every attempt to post this reply (its outbox id)
    # An earlier attempt may have posted some of it unrecorded (a crash, a lapsed lease): an
    # adapter that can ask the platform what is already in the thread does so before posting.
    retry: bool = False


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool an agent may call: what the service is told about it (`[tools.NAME]`)."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments (an object)


@dataclass(slots=True)
class ToolCall:
    """A call the agent asked us to run."""

    id: str
    name: str
    arguments: str  # JSON text, as the services send it


@dataclass(slots=True)
class Turn:
    """One message in a conversation."""

    role: Role
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    author_id: str | None = None
    created: datetime | None = None
    hidden: bool = False  # stored, never shown to the user (e.g. a service's internal message)


@dataclass(slots=True)
class Conversation:
    """A conversation record as the bridge and the agent services see it."""

    id: str
    thread_key: str
    source: str
    agent: str
    data: dict[str, Any] = field(default_factory=dict)
    remote_id: str | None = None
    state: dict[str, Any] | None = None
    status: str = "open"
    situation: str | None = None
    created: datetime | None = None
    updated: datetime | None = None
    # The rows still to write (conversation, thread link) of one opened `with_turn`: the first
    # store write that refers to it writes them first, in its transaction (core/store.py).
    unsaved: tuple[dict[str, Any], dict[str, Any]] | None = field(
        default=None, repr=False, compare=False
    )
