"""`conversations export`: every conversation a search finds, written a page at a time.

JSON Lines: one conversation a line, with its messages. CSV: one row a message, the
conversation's fields repeated on each (a conversation with no message gets one row with the
message columns empty). Nothing is held beyond one page.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from typing import Any, TextIO

from bots.admin.api import conversation_json, message_json
from core.search import SearchFilters
from core.store import Store

FORMATS = ("jsonl", "csv")
PAGE = 200
CONVERSATION_COLUMNS = (
    "conversation_id",
    "source",
    "workspace",
    "channel",
    "thread_key",
    "agent",
    "status",
    "remote_id",
    "link",
    "conversation_created",
    "data",
)
MESSAGE_COLUMNS = (
    "message_id",
    "role",
    "kind",
    "author_id",
    "author_name",
    "name",
    "created",
    "content",
    "tool_calls",
    "tool_call_id",
)


async def export(
    store: Store,
    filters: SearchFilters,
    fmt: str,
    out: TextIO,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write what `filters` finds (its limit and offset aside) to `out`; return how many
    conversations. `progress` is called with each page's count."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow((*CONVERSATION_COLUMNS, *MESSAGE_COLUMNS))
    count = 0
    async for page in store.conversation_pages(filters, PAGE):
        transcripts = await store.messages_of([c.id for c in page])
        for conversation in page:
            body = conversation_json(conversation)
            rows = [message_json(m) for m in transcripts[conversation.id]]
            if writer is None:
                out.write(json.dumps({**body, "messages": rows}, ensure_ascii=False) + "\n")
            else:
                _csv_rows(writer, body, rows)
        count += len(page)
        if progress is not None:
            progress(len(page))
    out.flush()
    return count


def _csv_rows(writer: Any, body: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    head = [
        body["id"],
        body["source"],
        body["workspace"] or "",
        body["channel"] or "",
        body["thread_key"],
        body["agent"],
        body["status"],
        body["remote_id"] or "",
        body["link"] or "",
        body["created"] or "",
        json.dumps(body["data"], ensure_ascii=False),
    ]
    if not rows:
        writer.writerow([*head, *([""] * len(MESSAGE_COLUMNS))])
    for m in rows:
        writer.writerow(
            [
                *head,
                m["id"],
                m["role"],
                m["kind"],
                m["author_id"] or "",
                m["author_name"] or "",
                m["name"] or "",
                m["created"] or "",
                m["content"],
                json.dumps(m["tool_calls"], ensure_ascii=False) if m["tool_calls"] else "",
                m["tool_call_id"] or "",
            ]
        )
