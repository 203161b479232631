"""The fake Discord, proven against the real discord.py 2.7 client: REST, gateway, interactions."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import yarl

from tests.fakes.discord import (
    ALICE,
    APPLICATION_ID,
    BOT_ID,
    BOT_TOKEN,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    GUILD_ID,
    PAYLOADS,
    THREAD_ID,
    FakeDiscord,
    fake_discord,
    load_payload,
)

with warnings.catch_warnings():
    # discord.player imports audioop, deprecated since Python 3.11 (gone in 3.13, where
    # discord.py uses audioop-lts); tests turn warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)
    import discord
    from discord import app_commands


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscord]:
    """A started fake with discord.py pointed at it, as the adapter does from its config."""
    with fake_discord() as started:
        _point(monkeypatch, started)
        yield started


def _point(monkeypatch: pytest.MonkeyPatch, fake: FakeDiscord) -> None:
    # Process-global: monkeypatch puts the real Discord back after the test.
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base_url)
    gateway = yarl.URL(fake.gateway_url)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", gateway)


def _intents(message_content: bool = True) -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = message_content
    return intents


class Recorder:
    """What a client received, for the client classes below."""

    def __init__(self) -> None:
        self.messages: list[discord.Message] = []
        self.resumed = 0


class Client(discord.Client):
    def __init__(self, *, message_content: bool = True, **options: Any) -> None:
        super().__init__(intents=_intents(message_content), guild_ready_timeout=0.1, **options)
        self.seen = Recorder()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py waits 5 s before every IDENTIFY but the first; not against the fake."""

    async def on_message(self, message: discord.Message) -> None:
        if message.author != self.user:  # the fake echoes the bot's own messages, as Discord does
            self.seen.messages.append(message)

    async def on_resumed(self) -> None:
        self.seen.resumed += 1


class ShardedClient(discord.AutoShardedClient):
    def __init__(self, **options: Any) -> None:
        super().__init__(intents=_intents(), guild_ready_timeout=0.1, **options)
        self.seen = Recorder()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        pass

    async def on_message(self, message: discord.Message) -> None:
        if message.author != self.user:
            self.seen.messages.append(message)


@asynccontextmanager
async def running(client: discord.Client, timeout: float = 5.0) -> AsyncIterator[Any]:
    """Start `client` against the fake, wait for on_ready, and close it cleanly after."""
    started = asyncio.create_task(client.start(BOT_TOKEN))
    ready = asyncio.create_task(client.wait_until_ready())
    try:
        await asyncio.wait({started, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            started.result()  # raises what stopped the client
        assert ready.done(), f"on_ready did not fire within {timeout}s"
        yield client
    finally:
        ready.cancel()
        await client.close()
        await asyncio.gather(started, return_exceptions=True)


async def until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
    return found


async def received(client: Any, count: int = 1) -> list[discord.Message]:
    messages: list[discord.Message] = await until(
        lambda: client.seen.messages if len(client.seen.messages) >= count else None
    )
    return messages


# -- login, READY, GUILD_CREATE ---------------------------------------------------------------


async def test_client_logs_in_connects_and_sees_the_guild(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        assert client.user.id == BOT_ID and client.user.bot
        assert client.application_id == APPLICATION_ID
        assert client.application_flags.gateway_message_content_limited
        guild = client.get_guild(GUILD_ID)
        assert guild is not None and not guild.unavailable
        assert isinstance(client.get_channel(CHANNEL_ID), discord.TextChannel)
        assert isinstance(client.get_channel(THREAD_ID), discord.Thread)
        # Without the members intent discord.py caches only the bot's own member.
        assert guild.member_count == 4 and [m.id for m in guild.members] == [BOT_ID]
        assert guild.me.guild_permissions.create_public_threads

    assert [(c.method, c.path) for c in fake.calls[:2]] == [
        ("GET", "/users/@me"),
        ("GET", "/oauth2/applications/@me"),
    ]
    first = fake.calls[0]
    assert "authorization" not in first.headers and first.headers["user-agent"].startswith(
        "DiscordBot"
    )
    (identify,) = fake.identifies
    assert identify["intents"] == _intents().value
    assert "token" not in identify and identify["properties"]["browser"] == "discord.py"
    # discord.py always asks for transport compression; the fake answers in kind.
    # zstd-stream when zstandard (or Python 3.14's compression.zstd) is importable.
    query = identify["query"]
    assert query.pop("compress") in ("zlib-stream", "zstd-stream")
    assert query == {"v": "10", "encoding": "json"}
    # Client.close() asks for code 1000, but aiohttp first wakes discord.py's pending receive,
    # which closes with 4000: the close that reaches Discord keeps the session resumable.
    await until(lambda: fake.gateway.client_closes == [4000])
    assert fake.gateway.live_sessions == 1


async def test_refused_privileged_intent_stops_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_discord(privileged_intents=()) as fake:
        _point(monkeypatch, fake)
        with pytest.raises(discord.PrivilegedIntentsRequired):
            async with running(Client()):
                pass
        assert fake.identifies == []


async def test_wrong_token_fails_at_login(fake: FakeDiscord) -> None:
    client = Client()
    with pytest.raises(discord.LoginFailure):
        await client.login("not-the-token")
    await client.close()
    assert fake.calls[0].status == 401 and fake.identifies == []


# -- messages in ------------------------------------------------------------------------------


async def test_guild_message_arrives_as_a_message_in_a_text_channel(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        sent = await fake.dispatch("MESSAGE_CREATE", fake.guild_message("what is up?"))
        assert sent == 1
        (message,) = await received(client)
        assert isinstance(message.channel, discord.TextChannel)
        assert message.channel.id == CHANNEL_ID and message.guild.id == GUILD_ID
        assert isinstance(message.author, discord.Member) and message.author.name == "alice"
        assert client.user.mentioned_in(message)
        assert message.content == f"<@{BOT_ID}> what is up?"

        await fake.dispatch("MESSAGE_CREATE", fake.thread_message("and then?"))
        await fake.dispatch("MESSAGE_CREATE", fake.bot_message("beep"))
        _, in_thread, from_bot = await received(client, 3)
        assert isinstance(in_thread.channel, discord.Thread)
        assert in_thread.channel.parent_id == CHANNEL_ID and not client.user.mentioned_in(in_thread)
        assert from_bot.author.bot


async def test_recorded_payloads_parse_into_discord_py_objects(fake: FakeDiscord) -> None:
    names = sorted(p.stem for p in PAYLOADS.glob("message_create_*.json"))
    kinds = ["attachment", "bot", "dm", "mention", "thread"]
    assert names == [f"message_create_{kind}" for kind in kinds]
    async with running(Client()) as client:
        for name in names:
            await fake.dispatch("MESSAGE_CREATE", load_payload(name)["d"])
        attachment, bot, dm, mention, thread = await received(client, len(names))
        assert attachment.attachments[0].filename == "notes.txt"
        assert bot.author.bot and client.user.mentioned_in(bot)
        assert isinstance(dm.channel, discord.DMChannel) and dm.guild is None
        assert isinstance(mention.channel, discord.TextChannel)
        assert isinstance(thread.channel, discord.Thread)


async def test_dm_arrives_in_a_dm_channel_and_the_reply_lands_there(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("hi bot"))
        (message,) = await received(client)
        assert isinstance(message.channel, discord.DMChannel)
        assert message.guild is None and message.channel.id == DM_CHANNEL_ID
        await message.channel.send("hello Alice")
        dm = await (await client.fetch_user(int(ALICE["id"]))).create_dm()
        assert dm.id == DM_CHANNEL_ID
    assert [m["content"] for m in fake.messages(DM_CHANNEL_ID)] == ["hello Alice"]
    assert fake.calls_to("POST", "/users/@me/channels")[0].json == {
        "recipient_id": int(ALICE["id"])
    }


async def test_without_message_content_only_mentions_carry_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fake_discord(privileged_intents=()) as fake:
        _point(monkeypatch, fake)
        async with running(Client(message_content=False)) as client:
            await fake.dispatch("MESSAGE_CREATE", fake.thread_message("no mention here"))
            await fake.dispatch("MESSAGE_CREATE", fake.guild_message("a mention"))
            await fake.dispatch("MESSAGE_CREATE", fake.dm_message("a DM"))
            plain, mention, dm = await received(client, 3)
    assert plain.content == "" and mention.content.endswith("a mention")
    assert dm.content == "a DM"


async def test_attachment_is_served_by_the_fake(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        data = fake.guild_message("read this", attachments={"notes.txt": b"line one\n"})
        await fake.dispatch("MESSAGE_CREATE", data)
        (message,) = await received(client)
        (attachment,) = message.attachments
        assert attachment.content_type == "text/plain; charset=utf-8"
        assert await attachment.read() == b"line one\n"


# -- messages out -----------------------------------------------------------------------------


async def test_thread_opened_on_a_mention_gets_the_reply(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        await fake.dispatch("MESSAGE_CREATE", fake.guild_message("help me"))
        (message,) = await received(client)
        thread = await message.create_thread(name="help me")
        await thread.send("on it", allowed_mentions=discord.AllowedMentions.none())
        await fake.wait_messages(thread.id)
        (created,) = fake.threads
        assert thread.id == message.id == int(created["id"])  # a thread takes its message's id
        assert (created["type"], created["parent_id"]) == (11, str(CHANNEL_ID))
        cached = await until(lambda: client.get_channel(thread.id))  # THREAD_CREATE arrived
        assert isinstance(cached, discord.Thread) and cached.parent_id == CHANNEL_ID

        with pytest.raises(discord.HTTPException) as again:
            await message.create_thread(name="twice")
        assert again.value.code == 160004
        with pytest.raises(discord.HTTPException) as long_name:
            await fake_message(client, fake).create_thread(name="x" * 101)
        assert (long_name.value.status, long_name.value.code) == (400, 50035)

    (reply,) = fake.messages(thread.id)
    assert reply["content"] == "on it" and reply["channel_id"] == str(thread.id)
    assert reply["allowed_mentions"] == {"parse": []}
    assert fake.calls_to("POST", rf"/channels/{thread.id}/messages")[0].json[
        "allowed_mentions"
    ] == {"parse": []}


def fake_message(client: discord.Client, fake: FakeDiscord) -> discord.PartialMessage:
    """A message the fake knows, addressed without fetching it."""
    data = fake.guild_message("another")
    channel = client.get_channel(CHANNEL_ID)
    assert isinstance(channel, discord.TextChannel)
    return channel.get_partial_message(int(data["id"]))


async def test_send_edit_delete_reply_and_typing(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        channel = client.get_channel(CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        first = await channel.send("first <@1300000000000000002>")
        assert first.author == client.user and first.mentions[0].name == "bob"
        async with channel.typing():
            pass
        second = await first.reply("second")
        assert second.reference is not None and second.reference.message_id == first.id
        await first.edit(content="first, edited")
        await second.delete()
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        assert (too_long.value.status, too_long.value.code) == (400, 50035)
    (standing,) = fake.messages(CHANNEL_ID)
    assert standing["content"] == "first, edited" and standing["edited_timestamp"]
    assert fake.calls_to("POST", rf"/channels/{CHANNEL_ID}/typing")[0].status == 204
    reply = fake.calls_to("POST", rf"/channels/{CHANNEL_ID}/messages")[1]
    assert reply.json["message_reference"]["message_id"] == first.id
    assert reply.response["referenced_message"]["id"] == str(first.id)


async def test_rate_limit_is_waited_out_and_other_faults_raise(fake: FakeDiscord) -> None:
    messages = rf"/channels/{CHANNEL_ID}/messages"
    async with running(Client()) as client:
        channel = client.get_channel(CHANNEL_ID)
        assert isinstance(channel, discord.TextChannel)
        fake.fail("POST", messages, 429, times=1, retry_after=0.2)
        started = time.monotonic()
        await channel.send("after a wait")
        assert time.monotonic() - started >= 0.2
        limited, ok = fake.calls_to("POST", messages)
        assert (limited.status, ok.status) == (429, 200)
        assert limited.response == {
            "message": "You are being rate limited.",
            "retry_after": 0.2,
            "global": False,
        }

        fake.fail("POST", messages, 429, via=False)  # no Via: Cloudflare's ban, not Discord's
        with pytest.raises(discord.HTTPException) as banned:
            await channel.send("banned")
        assert banned.value.status == 429
        fake.fail("POST", messages, 500)  # discord.py retries a 500 after 1 s
        await channel.send("after a 500")
        fake.fail("POST", messages, 403)
        with pytest.raises(discord.Forbidden) as forbidden:
            await channel.send("forbidden")
        assert forbidden.value.code == 50013 and forbidden.value.text == "Missing Permissions"
    assert [m["content"] for m in fake.messages(CHANNEL_ID)] == ["after a wait", "after a 500"]
    assert [c.status for c in fake.calls_to("POST", messages)] == [429, 200, 429, 500, 200, 403]


async def test_rest_wire_details() -> None:
    with fake_discord() as fake:
        auth = {"Authorization": f"Bot {BOT_TOKEN}"}
        async with httpx.AsyncClient(base_url=fake.api_base_url, trust_env=False) as http:
            me = await http.get("/users/@me", headers=auth)
            assert me.headers["content-type"] == "application/json"  # compared as a string
            assert (await http.get("/users/@me")).status_code == 401
            assert (await http.get("/users/@me", headers={"Authorization": BOT_TOKEN})).json() == {
                "message": "401: Unauthorized",
                "code": 0,
            }
            missing = await http.get("/nowhere", headers=auth)
            assert (missing.status_code, missing.json()["code"]) == (404, 0)
            typing = await http.post(f"/channels/{CHANNEL_ID}/typing", headers=auth)
            assert typing.status_code == 204 and "content-type" not in typing.headers
            gateway = (await http.get("/gateway/bot", headers=auth)).json()
            assert gateway["url"] == fake.gateway_url and gateway["shards"] == 1
            assert gateway["session_start_limit"]["max_concurrency"] == 1
            fake.fail("GET", "/gateway", 429, retry_after=1.5, global_=True)
            limited = await http.get("/gateway", headers=auth)
            assert limited.headers["via"] and limited.headers["retry-after"] == "2"
            assert limited.headers["x-ratelimit-global"] == "true"
            assert limited.json()["global"] is True
            callback = await http.post("/interactions/1/nope/callback", json={"type": 4})
            assert callback.json()["code"] == 10062
            built = fake.interaction("agent")
            url = f"/interactions/{built['id']}/{built['token']}/callback"
            answer = {"type": 4, "data": {"content": "hi"}}
            assert (await http.post(url, json=answer)).status_code == 204  # no ?with_response
            assert (await http.post(url, json=answer)).json()["code"] == 40060
            ok = await http.get("/gateway", headers=auth)
            assert set(ok.headers) >= {"x-ratelimit-bucket", "x-ratelimit-remaining"}
    assert fake.calls[0].headers.get("authorization") is None


# -- gateway: RECONNECT and RESUME, sharding --------------------------------------------------


async def test_reconnect_resumes_and_replays_missed_events_once(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        await fake.dispatch("MESSAGE_CREATE", fake.guild_message("before"))
        await received(client)
        assert await fake.request_resume() == 1
        missed = fake.guild_message("while away")
        assert await fake.dispatch("MESSAGE_CREATE", missed) == 1  # kept for the RESUME
        (resume,) = await fake.wait_resumes()
        assert resume.replayed == 1 and resume.session_id == fake.identifies[0]["session_id"]
        await until(lambda: client.seen.resumed == 1)

        assert await fake.disconnect(4000) == 1
        await fake.dispatch("MESSAGE_CREATE", fake.guild_message("after a drop"))
        await fake.wait_resumes(2)
        await received(client, 3)
        await asyncio.sleep(0.1)
        assert [m.content.split("> ", 1)[1] for m in client.seen.messages] == [
            "before",
            "while away",
            "after a drop",
        ]
    assert len(fake.identifies) == 1  # never a new session


async def test_invalid_session_leads_to_a_new_identify(fake: FakeDiscord) -> None:
    async with running(Client()) as client:
        await fake.invalidate_session()
        await fake.wait_identifies(2)
        await fake.dispatch("MESSAGE_CREATE", fake.guild_message("new session"))
        await received(client)


@pytest.mark.parametrize("shard_count", [2, None])
async def test_auto_sharded_client(
    monkeypatch: pytest.MonkeyPatch, shard_count: int | None
) -> None:
    # With shard_count=None discord.py asks GET /gateway/bot for the count and the URL.
    with fake_discord(shards=2) as fake:
        _point(monkeypatch, fake)
        async with running(ShardedClient(shard_count=shard_count)) as client:
            assert sorted(i["shard"] for i in fake.identifies) == [[0, 2], [1, 2]]
            guild = client.get_guild(GUILD_ID)
            assert guild is not None and guild.shard_id == (GUILD_ID >> 22) % 2
            assert await fake.dispatch("MESSAGE_CREATE", fake.guild_message("sharded")) == 1
            assert await fake.dispatch("MESSAGE_CREATE", fake.dm_message("dm")) == 1  # shard 0
            in_guild, dm = await received(client, 2)
            assert isinstance(in_guild.channel, discord.TextChannel)
            assert isinstance(dm.channel, discord.DMChannel)
        assert len(fake.calls_to("GET", "/gateway/bot")) == (1 if shard_count is None else 0)


# -- application commands ---------------------------------------------------------------------


def _tree(client: discord.Client, seen: list[Any]) -> app_commands.CommandTree[Any]:
    tree = app_commands.CommandTree(client)

    @tree.command(name="agent", description="Pick the agent for this channel")
    async def agent(interaction: discord.Interaction, name: str | None = None) -> None:
        seen.append(("agent", name, interaction.channel))
        await interaction.response.send_message(f"agent: {name or 'default'}", ephemeral=True)

    @tree.command(name="new", description="Start a new conversation")
    async def new(interaction: discord.Interaction) -> None:
        seen.append(("new", None, interaction.channel))
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content="fresh start")
        await interaction.followup.send("and a follow-up")

    return tree


async def test_interactions_reach_the_command_tree_and_are_answered(fake: FakeDiscord) -> None:
    client = Client()
    seen: list[Any] = []
    _tree(client, seen)
    async with running(client):
        await fake.dispatch("INTERACTION_CREATE", fake.interaction("agent", {"name": "X"}))
        (answer,) = await fake.wait_interaction_responses()
        assert (answer.type, answer.data["content"], answer.data["flags"]) == (4, "agent: X", 64)
        for name in ("interaction_agent", "interaction_agent_name", "interaction_new"):
            await fake.dispatch("INTERACTION_CREATE", load_payload(name)["d"])  # as recorded
        await fake.dispatch("INTERACTION_CREATE", fake.interaction("new", guild=False))
        await fake.wait_interaction_responses(5)
        await fake.wait_for("POST", r"/webhooks/\d+/[^/]+", 2)
    # Each interaction runs in a task of its own: compare without order.
    assert sorted((s[0], s[1] or "") for s in seen) == [
        ("agent", ""),
        ("agent", "X"),
        ("agent", "X"),
        ("new", ""),
        ("new", ""),
    ]
    channels = {type(s[2]) for s in seen}
    assert channels == {discord.TextChannel, discord.DMChannel}
    callback = fake.calls_to("POST", r"/interactions/\d+/[^/]+/callback")[0]
    assert callback.query == {"with_response": "1"} and callback.status == 200
    assert sorted(r.type for r in fake.interaction_responses) == [4, 4, 4, 5, 5]
    dm = next(s[2] for s in seen if isinstance(s[2], discord.DMChannel))
    assert [m["content"] for m in fake.messages(dm.id)] == ["fresh start", "and a follow-up"]
    edit = fake.calls_to("PATCH", r"/webhooks/\d+/[^/]+/messages/@original")[0]
    assert "authorization" not in edit.headers  # the token in the path is the credential


async def test_late_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_discord(interaction_deadline=0.0) as fake:
        _point(monkeypatch, fake)
        client = Client()
        errors: list[BaseException] = []
        tree = _tree(client, [])

        @tree.error
        async def note(interaction: discord.Interaction, error: BaseException) -> None:
            errors.append(error)

        async with running(client):
            await fake.dispatch("INTERACTION_CREATE", fake.interaction("agent"))
            await until(lambda: errors)
    assert isinstance(errors[0].__cause__, discord.NotFound)
    assert errors[0].__cause__.code == 10062


async def test_tree_sync_overwrites_commands_in_bulk(fake: FakeDiscord) -> None:
    client = Client()
    tree = _tree(client, [])
    async with running(client):
        synced = await tree.sync()
        assert sorted(c.name for c in synced) == ["agent", "new"] and all(c.id for c in synced)
        again = await tree.sync()
        assert {c.id for c in again} == {c.id for c in synced}  # same name, same id
        tree.copy_global_to(guild=discord.Object(GUILD_ID))
        in_guild = await tree.sync(guild=discord.Object(GUILD_ID))
        assert all(c.guild_id == GUILD_ID for c in in_guild)
    (put, _) = fake.calls_to("PUT", rf"/applications/{APPLICATION_ID}/commands")
    assert [c["name"] for c in put.json] == ["agent", "new"]
    assert put.json[0]["options"][0]["name"] == "name"
    assert fake.calls_to("PUT", rf"/applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands")
    assert [c["name"] for c in fake.commands(GUILD_ID)] == ["agent", "new"]
    # An interaction built after the sync carries the registered command's id.
    assert fake.interaction("new")["data"]["id"] == str(
        next(c.id for c in in_guild if c.name == "new")
    )
    assert fake.interaction("new", guild=False)["data"]["id"] == str(synced[1].id)
