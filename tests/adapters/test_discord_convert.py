"""Recorded Discord messages through the converters, as discord.py parses them from the gateway
(a real client connected to the fake Discord receives each recorded MESSAGE_CREATE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import discord
import pytest
import yarl

from adapters.discord.convert import agent_text, hear, message_id_of, thread_name, to_inbound
from tests.fakes.discord import BOT_ID, BOT_TOKEN, GUILD_ID, fake_discord, load_payload


class Catcher(discord.Client):
    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(intents=intents, guild_ready_timeout=0.1)
        self.caught: asyncio.Queue[discord.Message] = asyncio.Queue()

    async def on_message(self, message: discord.Message) -> None:
        await self.caught.put(message)


@pytest.fixture
async def parsed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, discord.Message]]:
    """Each recorded MESSAGE_CREATE, as the discord.Message the adapter would get."""
    names = ["mention", "thread", "dm", "attachment", "bot"]
    with fake_discord() as fake:
        monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base_url)
        gateway = yarl.URL(fake.gateway_url)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", gateway)
        client = Catcher()
        runner = asyncio.create_task(client.start(BOT_TOKEN))
        try:
            await asyncio.wait_for(client.wait_until_ready(), 10)
            found: dict[str, discord.Message] = {}
            for name in names:
                data: dict[str, Any] = load_payload(f"message_create_{name}")["d"]
                await fake.dispatch("MESSAGE_CREATE", data)
                found[name] = await asyncio.wait_for(client.caught.get(), 5)
            yield found
        finally:
            await client.close()
            await asyncio.gather(runner, return_exceptions=True)


async def test_a_mention_in_a_channel_starts_a_thread_named_by_the_message(
    parsed: dict[str, discord.Message],
) -> None:
    message = parsed["mention"]
    heard = hear(message, BOT_ID)
    assert heard is not None
    assert heard.kind == "mention"
    assert heard.thread.key == f"discord:{GUILD_ID}/{message.channel.id}/{message.id}"
    assert heard.open_thread_in == message.channel.id
    assert not heard.text.startswith("<@")
    assert heard.data["guild_name"]
    assert heard.data["channel_name"]
    assert heard.data["thread_id"] == str(message.id)
    inbound = to_inbound(heard)
    assert inbound.event_id == f"discord:{message.id}"
    assert message_id_of(inbound.event_id) == message.id


async def test_thread_dm_attachment_and_bot_messages(parsed: dict[str, discord.Message]) -> None:
    in_thread = hear(parsed["thread"], BOT_ID)
    assert in_thread is not None
    assert in_thread.kind == "thread"
    assert not in_thread.mentioned
    assert in_thread.thread.thread == str(parsed["thread"].channel.id)
    assert in_thread.thread.channel != in_thread.thread.thread  # the parent channel
    dm = hear(parsed["dm"], BOT_ID)
    assert dm is not None
    assert dm.kind == "dm"
    assert dm.thread.workspace == "@me"
    attachment = parsed["attachment"]
    assert "[attachment: notes.txt " in agent_text(attachment, BOT_ID)
    assert hear(parsed["bot"], BOT_ID) is None


def test_thread_names_are_the_first_words() -> None:
    assert thread_name("  what   is a pension? ") == "what is a pension?"
    assert thread_name("") == "Conversation"
    long = thread_name("word " * 100)
    assert len(long) <= 91
    assert long.endswith("…")
