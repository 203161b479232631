"""Conversations from platforms the admin page tests do not run: stored through the store's own
write path (accept, claim, open, finish the turn), as the bridge stores them."""

from __future__ import annotations

from typing import Any

from core.model import Author, Inbound, ThreadRef
from core.store import NewMessage, Store

SLACK = ThreadRef("slack", "T0ADMIN", "C0GENERAL", "1712345678.000100")
SLACK_DATA: dict[str, Any] = {
    "team_id": "T0ADMIN",
    "channel_id": "C0GENERAL",
    "channel_name": "general",
    "user_id": "U0ANN",
    "user_name": "Ann Admin",
    "permalink": "https://example.slack.com/archives/C0GENERAL/p1712345678000100",
    "ticket": "T-42",
}
SLACK_REMOTE_ID = "engage-conv-7f3a"
SLACK_FAILURE = "agent service unavailable: 503 Service Unavailable after 3 tries"

DISCORD = ThreadRef("discord", "900000000000000001", "900000000000000002", "900000000000000003")
DISCORD_DATA: dict[str, Any] = {
    "guild_id": "900000000000000001",
    "channel_name": "help",
    "user_id": "900000000000000009",
    "user_name": "bob",
    "jump_url": "https://discord.com/channels/900000000000000001/900000000000000003",
}


async def _turn(
    store: Store,
    thread: ThreadRef,
    data: dict[str, Any],
    user: Author,
    messages: list[NewMessage],
    *,
    failed: str | None = None,
    remote_id: str | None = None,
) -> str:
    event_id = f"{thread.source}:seed:{thread.thread}"
    intake = await store.add_inbound(Inbound(event_id, thread, user, messages[0].content, data))
    assert intake.added
    [claim] = await store.claim_inbox([thread.source], 1, 30)
    conversation = await store.open_conversation(thread, "demo", data, user.id)
    await store.finish_turn(claim, conversation, messages, failed=failed, remote_id=remote_id)
    return conversation.id


async def seed(url: str) -> dict[str, str]:
    """A failed Slack turn with a tool call, and an answered Discord one; their ids by source."""
    store = Store(url)
    await store.migrate()
    try:
        ann = Author("U0ANN", "Ann Admin")
        slack = await _turn(
            store,
            SLACK,
            SLACK_DATA,
            ann,
            [
                NewMessage("user", "Where is order 42?", author_id=ann.id, author_name=ann.name),
                NewMessage(
                    "agent",
                    "",
                    tool_calls=[
                        {"id": "call_1", "name": "lookup_order", "arguments": '{"order_id":"42"}'}
                    ],
                ),
                NewMessage(
                    "tool", '{"status": "shipped"}', name="lookup_order", tool_call_id="call_1"
                ),
            ],
            failed=SLACK_FAILURE,
            remote_id=SLACK_REMOTE_ID,
        )
        bob = Author("900000000000000009", "bob")
        discord = await _turn(
            store,
            DISCORD,
            DISCORD_DATA,
            bob,
            [
                NewMessage("user", "hello from discord", author_id=bob.id, author_name=bob.name),
                NewMessage("agent", "Hi bob, the demo agent here."),
            ],
        )
        return {"slack": slack, "discord": discord}
    finally:
        await store.close()
