"""Slack events ⇄ threadbridge's core types: the pure functions where Slack's rules live.

Which events are for the agent, which thread a message belongs to, what text the agent gets,
and the arguments of the calls that post a reply. No I/O here; `app.py` does that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from core.model import Author, Inbound, ThreadRef
from core.search import storable

SOURCE = "slack"
# Message subtypes a person's words arrive with; every other subtype (edits, deletions,
# joins, bot messages, …) is acknowledged and ignored.
PERSON_SUBTYPES = {None, "file_share", "thread_broadcast"}
MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")

Kind = Literal["mention", "dm", "thread_reply"]


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is in the workspace, from `auth.test`."""

    user_id: str
    bot_id: str


@dataclass(frozen=True, slots=True)
class Heard:
    """A Slack message that may be for the agent, and why."""

    kind: Kind
    thread: ThreadRef
    event_id: str
    author_id: str
    text: str
    files: tuple[dict[str, str], ...] = ()


def team_of(body: dict[str, Any], event: dict[str, Any]) -> str:
    return str(body.get("team_id") or event.get("team") or event.get("user_team") or "-")


def event_key(team: str, channel: str, ts: str) -> str:
    """One id per Slack message, whichever event brought it (app_mention or message.*)."""
    return f"slack:{team}:{channel}:{ts}"


def hear(body: dict[str, Any], event: dict[str, Any], me: BotIdentity) -> Heard | None:
    """The message in an `app_mention` or `message` event, or None when it is not a person's
    message the agent could answer (the bot itself, other bots, edits, joins…)."""
    kind_of_event = event.get("type")
    if kind_of_event not in ("app_mention", "message") or not _well_typed(body, event):
        return None
    if (
        event.get("subtype") not in PERSON_SUBTYPES
        or event.get("bot_id")
        or event.get("bot_profile")
    ):
        return None
    user = event.get("user")
    if not user or user == me.user_id:
        return None
    channel, ts = event.get("channel"), event.get("ts")
    if not channel or not ts:
        return None
    team = team_of(body, event)
    root = str(event.get("thread_ts") or ts)
    mentioned = kind_of_event == "app_mention" or f"<@{me.user_id}" in str(event.get("text", ""))
    if event.get("channel_type") == "im":
        kind: Kind = "dm"
    elif mentioned:
        kind = "mention"
    elif event.get("thread_ts"):
        kind = "thread_reply"  # ours only if the thread already has a conversation
    else:
        return None
    files = tuple(
        {
            "name": str(f.get("name") or f.get("title") or "file"),
            "url": str(f.get("url_private", "")),
        }
        for f in event.get("files") or []
    )
    return Heard(
        kind=kind,
        thread=ThreadRef(SOURCE, team, str(channel), root),
        event_id=event_key(team, str(channel), str(ts)),
        author_id=str(user),
        text=without_mention(str(event.get("text") or ""), me.user_id),
        files=files,
    )


def _well_typed(body: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether the fields `hear` reads have the types Slack sends (a signed body may not)."""
    needed = (event.get(k) for k in ("user", "channel", "ts"))
    optional = [
        event.get(k) for k in ("thread_ts", "text", "subtype", "channel_type", "team", "user_team")
    ]
    files = event.get("files")
    ids = [event.get(k) for k in ("user", "channel", "ts", "thread_ts", "team", "user_team")]
    ids.append(body.get("team_id"))
    return (
        all(isinstance(v, str) for v in needed)
        and all(v is None or isinstance(v, str) for v in [*optional, body.get("team_id")])
        # ids become keys: one a database cannot keep (a lone surrogate, NUL) is no Slack id
        and all(v is None or storable(v) for v in ids)
        and (files is None or (isinstance(files, list) and all(isinstance(f, dict) for f in files)))
    )


def without_mention(text: str, bot_user_id: str) -> str:
    """The text with the bot's own mention taken out (other mentions stay)."""
    stripped = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", "", text)
    return re.sub(r"[ \t]{2,}", " ", stripped).strip()


def agent_text(heard: Heard) -> str:
    """What the agent reads: the words, and a line per shared file (agents read text only)."""
    lines = [heard.text] if heard.text else []
    lines += [f"[file shared: {f['name']} {f['url']}]".rstrip() for f in heard.files]
    return "\n".join(lines)


def to_inbound(heard: Heard, author_name: str, data: dict[str, Any]) -> Inbound:
    return Inbound(
        event_id=heard.event_id,
        thread=heard.thread,
        author=Author(heard.author_id, author_name),
        text=agent_text(heard),
        data=data,
    )


def conversation_data(
    heard: Heard, *, channel_name: str = "", user_name: str = "", permalink: str = ""
) -> dict[str, Any]:
    """The facts kept on a Slack conversation (and sent to stateful agent services)."""
    data: dict[str, Any] = {
        "team_id": heard.thread.workspace,
        "channel_id": heard.thread.channel,
        "thread_ts": heard.thread.thread,
        "user_id": heard.author_id,
    }
    for key, value in (
        ("channel_name", channel_name),
        ("user_name", user_name),
        ("permalink", permalink),
    ):
        if value:
            data[key] = value
    return data


def post_args(
    thread: ThreadRef, text: str, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`chat.postMessage` arguments for one part of a reply, in the thread, with `metadata`
    (adapters/slack/marks.py) when given."""
    args: dict[str, Any] = {
        "channel": thread.channel,
        "thread_ts": thread.thread,
        "text": text,
        "mrkdwn": True,
        "unfurl_links": False,
        "unfurl_media": False,
    }
    if metadata is not None:
        args["metadata"] = metadata
    return args
