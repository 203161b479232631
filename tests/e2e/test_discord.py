"""Discord through the real `threadbridge serve`, against the fake REST API and gateway on
loopback, reached only through `[discord] api_base_url` and `gateway_url`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.serve import ServeProcess, search
from tests.fakes.discord import (
    BOB,
    BOT_TOKEN,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    GUILD_ID,
    FakeDiscord,
    fake_discord,
)

pytestmark = pytest.mark.e2e

MANAGE_GUILD = 1 << 5
SEND_MESSAGES = 1 << 11


def config_text(tmp_path: Path, fake: FakeDiscord, extra: str = "") -> str:
    return f"""
default_agent = "demo"

[store]
url = "sqlite:///{tmp_path}/tb.db"

[bridge]
poll_s = 0.1
working_after_s = 0  # these tests check the working signal; a quick answer skips it

[agents.demo]
service = "local"

[agents.other]
service = "local"

[discord]
api_base_url = "{fake.api_base_url}"
gateway_url = "{fake.gateway_url}"
guild_ready_timeout_s = 0.1
{extra}
"""


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with fake_discord() as running:
        yield running


def start(tmp_path: Path, fake: FakeDiscord, extra: str = "") -> ServeProcess:
    env = {"DISCORD_BOT_TOKEN": BOT_TOKEN}
    process = ServeProcess(tmp_path, config_text(tmp_path, fake, extra), env=env)
    process.start()
    return process


@pytest.fixture
def serve(tmp_path: Path, fake: FakeDiscord) -> Iterator[ServeProcess]:
    process = start(tmp_path, fake)
    try:
        yield process
    finally:
        process.stop()


def send(fake: FakeDiscord, event: str, data: dict[str, Any]) -> None:
    asyncio.run(fake.dispatch(event, data))


def wait_messages(
    fake: FakeDiscord, channel: int | str, count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = fake.messages(channel)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"channel {channel}: {found}")
        time.sleep(0.05)


def test_a_mention_opens_a_thread_that_continues_without_mentions(
    serve: ServeProcess, fake: FakeDiscord
) -> None:
    assert "on (gateway)" in serve.log() or "connected as" in serve.log()
    message = fake.guild_message("what is a pension, in short?")
    send(fake, "MESSAGE_CREATE", message)
    [answer] = wait_messages(fake, message["id"], 1)  # the thread takes the message's id
    assert "what is a pension, in short?" in answer["content"]
    [thread] = fake.threads
    assert thread["id"] == message["id"]
    assert thread["parent_id"] == str(CHANNEL_ID)
    assert thread["name"].startswith("what is a pension")
    assert answer["allowed_mentions"] == {"parse": []}

    send(fake, "MESSAGE_CREATE", fake.thread_message("and at what age?", thread_id=message["id"]))
    second = wait_messages(fake, message["id"], 2)[1]
    assert "message 2 of" in second["content"]
    assert fake.calls_to("POST", r".*/channels/\d+/typing")

    [found] = search(serve, "--source", "discord")
    data = found["data"]
    assert data["guild_id"] == str(GUILD_ID)
    assert data["guild_name"]
    assert data["channel_id"] == str(CHANNEL_ID)
    assert data["channel_name"]
    assert data["thread_id"] == message["id"]
    assert data["user_id"] == "1300000000000000001"
    assert data["username"]
    assert data["display_name"]
    assert data["jump_url"].startswith("https://discord.com/channels/")


def test_other_messages_bots_and_duplicates_get_nothing_or_one_answer(
    serve: ServeProcess, fake: FakeDiscord
) -> None:
    send(fake, "MESSAGE_CREATE", fake.guild_message("no mention here", mentions_bot=False))
    send(fake, "MESSAGE_CREATE", fake.bot_message("from another bot"))
    send(fake, "MESSAGE_CREATE", fake.thread_message("in a thread we are not in"))
    message = fake.guild_message("once please")
    for _ in range(3):  # the gateway may replay a message (RESUME)
        send(fake, "MESSAGE_CREATE", message)
    wait_messages(fake, message["id"], 1)
    time.sleep(1.0)
    assert len(fake.messages(message["id"])) == 1
    assert len(search(serve, "--source", "discord")) == 1


def test_a_resume_replay_is_answered_once(serve: ServeProcess, fake: FakeDiscord) -> None:
    first = fake.guild_message("before the resume")
    send(fake, "MESSAGE_CREATE", first)
    wait_messages(fake, first["id"], 1)

    async def resume() -> None:
        await fake.request_resume()
        await fake.wait_resumes(1, timeout=15)

    asyncio.run(resume())
    after = fake.guild_message("after the resume")
    send(fake, "MESSAGE_CREATE", after)
    wait_messages(fake, after["id"], 1)
    time.sleep(1.0)
    assert len(fake.messages(first["id"])) == 1


def test_a_mention_in_someone_elses_thread_links_it(serve: ServeProcess, fake: FakeDiscord) -> None:
    from tests.fakes.discord import THREAD_ID

    send(fake, "MESSAGE_CREATE", fake.thread_message("chat before the bot"))
    send(fake, "MESSAGE_CREATE", fake.thread_message("help us", mentions_bot=True))
    wait_messages(fake, THREAD_ID, 1)
    send(fake, "MESSAGE_CREATE", fake.thread_message("thanks, and more?"))
    assert "message 2 of" in wait_messages(fake, THREAD_ID, 2)[1]["content"]
    assert fake.threads == []  # no new thread: the existing one is used


def test_dms_are_one_conversation_until_new(serve: ServeProcess, fake: FakeDiscord) -> None:
    dm = fake.dm_message("hello in a DM")
    send(fake, "MESSAGE_CREATE", dm)
    channel = dm["channel_id"]
    assert "hello in a DM" in wait_messages(fake, channel, 1)[0]["content"]
    send(fake, "MESSAGE_CREATE", fake.dm_message("again"))
    assert "message 2 of" in wait_messages(fake, channel, 2)[1]["content"]
    send(fake, "INTERACTION_CREATE", fake.interaction("new", guild=False))
    asyncio.run(fake.wait_interaction_responses(1, timeout=10))
    assert "afresh" in json.dumps(fake.interaction_responses[-1].data)
    send(fake, "MESSAGE_CREATE", fake.dm_message("after new"))
    assert "message 1 of" in wait_messages(fake, channel, 4)[3]["content"]
    assert str(DM_CHANNEL_ID)  # the fake's fixed DM channel exists


def test_slash_commands_are_synced_and_route_the_channel(
    serve: ServeProcess, fake: FakeDiscord
) -> None:
    names = {c["name"] for c in fake.commands()}
    assert {"agent", "new"} <= names

    def ask(options: dict[str, Any] | None = None, **kw: Any) -> str:
        before = len(fake.interaction_responses)
        send(fake, "INTERACTION_CREATE", fake.interaction("agent", options, **kw))
        asyncio.run(fake.wait_interaction_responses(before + 1, timeout=10))
        return json.dumps(fake.interaction_responses[-1].data)

    assert "demo" in ask()
    assert "Manage Server" in ask({"name": "other"}, permissions=SEND_MESSAGES)
    assert "other" in ask({"name": "other"}, user=BOB, permissions=MANAGE_GUILD)
    assert "no agent" in ask({"name": "nosuch"}, user=BOB, permissions=MANAGE_GUILD)
    assert "other" in ask()
    message = fake.guild_message("who answers now?")
    send(fake, "MESSAGE_CREATE", message)
    wait_messages(fake, message["id"], 1)
    [found] = search(serve, "--source", "discord")
    assert found["agent"] == "other"


def test_long_answers_are_split_and_mentions_never_ping(
    serve: ServeProcess, fake: FakeDiscord
) -> None:
    body = "\n\n".join(
        f"Part {i}: @everyone "
        + "words " * 40
        + f"\n```python\nprint({i})\n"
        + "x = 1\n" * 20
        + "```"
        for i in range(14)
    )
    body += "\n\nThe end."
    assert 5_000 < len(body) < 16_000
    message = fake.guild_message(body)
    send(fake, "MESSAGE_CREATE", message)
    parts = wait_messages(fake, message["id"], 3, timeout=30)
    time.sleep(1.0)
    parts = fake.messages(message["id"])
    assert all(len(p["content"]) <= 2000 for p in parts)
    assert all(p["content"].count("```") % 2 == 0 for p in parts)
    assert all(p["allowed_mentions"] == {"parse": []} for p in parts)
    joined = "".join(p["content"] for p in parts)
    positions = [joined.find(f"Part {i}:") for i in range(14)]
    assert all(p >= 0 for p in positions)
    assert positions == sorted(positions)


def test_attachments_go_to_the_agent_as_text(serve: ServeProcess, fake: FakeDiscord) -> None:
    message = fake.guild_message("see the file", attachments={"report.pdf": b"%PDF-1.4"})
    send(fake, "MESSAGE_CREATE", message)
    [answer] = wait_messages(fake, message["id"], 1)
    assert "report.pdf" in answer["content"]


def test_a_429_is_waited_out(serve: ServeProcess, fake: FakeDiscord) -> None:
    fake.fail("POST", r".*/channels/\d+/messages", status=429, times=2, retry_after=0.3)
    message = fake.guild_message("through the rate limit")
    send(fake, "MESSAGE_CREATE", message)
    assert "through the rate limit" in wait_messages(fake, message["id"], 1)[0]["content"]


def test_without_the_message_content_intent_mentions_still_work(
    tmp_path: Path,
) -> None:
    with fake_discord(privileged_intents=()) as fake:
        process = start(tmp_path, fake)
        try:
            assert "Message Content intent" in process.log()
            message = fake.guild_message("mentioned, so I can read this")
            send(fake, "MESSAGE_CREATE", message)
            answer = wait_messages(fake, message["id"], 1)[0]["content"]
            assert "mentioned, so I can read this" in answer
            assert process.log().count("Message Content intent is off") == 1
        finally:
            process.stop()


def test_a_refused_token_stops_the_start_with_the_fix(tmp_path: Path, fake: FakeDiscord) -> None:
    env = {"DISCORD_BOT_TOKEN": "wrong.token"}
    process = ServeProcess(tmp_path, config_text(tmp_path, fake), env=env)
    try:
        with pytest.raises(RuntimeError, match="serve exited 1"):
            process.start()
        log = process.log()
        assert "refused the bot token in DISCORD_BOT_TOKEN" in log
        assert "Traceback" not in log
        assert "wrong.token" not in log
    finally:
        process.stop()
