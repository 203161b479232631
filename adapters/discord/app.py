"""The Discord channel: discord.py's gateway client, slash commands, and posting replies.

A mention in a channel is stored first and its thread opened after; posting to a thread that
does not exist yet opens it, so a crash between the two loses nothing. Replies are sent with
mentions turned off, so an agent can never ping @everyone or anyone else.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from adapters.discord.config import DiscordConfig
from adapters.discord.convert import (
    DM_WORKSPACE,
    SOURCE,
    hear,
    thread_name,
    to_inbound,
)
from core.bridge import Bridge
from core.errors import MessageRejected, PlatformRejected, PlatformRetryable, StartupError
from core.model import Reply, ThreadRef
from core.text import split_text

log = logging.getLogger(__name__)

THREAD_EXISTS = 160004  # "A thread has already been created for this message"
UNKNOWN_CHANNEL = 10003
NO_CONTENT_HINT = (
    "discord: the Message Content intent is off, so messages that do not mention the bot "
    "arrive empty: mentions work, follow-ups in threads must mention the bot too. Turn it on "
    "at https://discord.com/developers/applications → Bot → Privileged Gateway Intents."
)


class DiscordAdapter:
    """Discord threads and DMs ⇄ the bridge."""

    source = SOURCE
    working_every_s: float | None = 8.0  # typing lasts about 10 s

    def __init__(self, config: DiscordConfig) -> None:
        self.config = config
        self.bridge: Bridge | None = None
        self.client: discord.Client | None = None
        self._ready = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._content = config.message_content
        self._hinted = False
        self._drafts: dict[str, int] = {}  # thread key -> the message a streamed answer grows in

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, bridge: Bridge) -> None:
        self.bridge = bridge
        # discord.py keeps both addresses process-wide; one Discord bot runs per process.
        discord.http.Route.BASE = self.config.api_base_url.rstrip("/")
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.config.gateway_url)
        self.client = await self._login()
        self._runner = asyncio.create_task(self._run(), name="discord-gateway")
        try:
            await asyncio.wait_for(self._ready.wait(), self.config.ready_timeout_s)
        except TimeoutError:
            log.warning(
                "discord: not connected after %.0f s; still trying", self.config.ready_timeout_s
            )

    async def _login(self) -> discord.Client:
        client = self._make_client()
        try:
            await client.login(self.config.secret())
        except discord.LoginFailure:
            await client.close()
            raise StartupError(
                f"discord: Discord refused the bot token in {self.config.bot_token_env}",
                "copy the token from the developer portal (Bot → Reset Token)",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            await client.close()
            raise StartupError(
                f"discord: cannot reach {self.config.api_base_url} ({exc!r})",
                "check the network, a proxy, or [discord] api_base_url",
            ) from None
        return client

    def _make_client(self) -> discord.Client:
        intents = discord.Intents.default()
        intents.message_content = self._content
        options: dict[str, Any] = {
            "intents": intents,
            "allowed_mentions": discord.AllowedMentions.none(),
            "guild_ready_timeout": self.config.guild_ready_timeout_s,
        }
        client: discord.Client
        if self.config.shards is not None:
            count = None if self.config.shards == "auto" else self.config.shards
            if self.config.shard_ids is not None:
                options["shard_ids"] = self.config.shard_ids
            client = discord.AutoShardedClient(shard_count=count, **options)
        else:
            client = discord.Client(**options)
        tree = app_commands.CommandTree(client)
        self._commands(tree)

        async def setup_hook() -> None:
            await self._sync(tree)

        async def on_ready() -> None:
            assert client.user is not None
            log.info("discord: connected as %s (%s)", client.user, client.user.id)
            self._ready.set()

        client.setup_hook = setup_hook  # type: ignore[method-assign]
        client.event(on_ready)
        client.event(self.on_message)
        return client

    async def _run(self) -> None:
        """Keep the gateway connected; without the Message Content intent, go on without it."""
        while True:
            assert self.client is not None
            try:
                await self.client.connect(reconnect=True)
                return
            except discord.PrivilegedIntentsRequired:
                if not self._content:
                    log.error("discord: the gateway refused the intents; giving up")
                    return
                log.warning(NO_CONTENT_HINT)
                self._hinted = True
                self._content = False
                await self.client.close()
                self.client = await self._login()

    async def why_not_ready(self) -> str | None:
        """Why Discord cannot bring messages now, or None: the gateway ready, and its
        connection (each shard's) open; discord.py reconnects by itself."""
        client = self.client
        if client is None or not self._ready.is_set():
            return "the gateway is not ready"
        if isinstance(client, discord.AutoShardedClient):
            down = sorted(i for i, shard in client.shards.items() if shard.is_closed())
            return f"gateway shard(s) {down} disconnected" if down else None
        if client.ws is None or not client.ws.open:
            return "the gateway is disconnected"
        return None

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    async def _sync(self, tree: app_commands.CommandTree[Any]) -> None:
        try:
            await tree.sync()
            for guild_id in self.config.command_guilds:
                guild = discord.Object(int(guild_id))
                tree.copy_global_to(guild=guild)
                await tree.sync(guild=guild)
        except discord.HTTPException as exc:
            log.warning("discord: syncing the slash commands failed: %s", exc)

    # -- intake --------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        assert self.bridge is not None
        assert self.client is not None
        assert self.client.user is not None
        heard = hear(message, self.client.user.id)
        if heard is None:
            return
        if not heard.mentioned:
            if heard.kind == "thread" and not await self.bridge.store.thread_known(
                heard.thread.key
            ):
                return
            if not heard.text and not self._content and not self._hinted:
                self._hinted = True
                log.warning(NO_CONTENT_HINT)
        try:
            await self.bridge.submit(to_inbound(heard))
        except MessageRejected as exc:
            await self.bridge.notify(heard.thread, exc.reason)
        if heard.open_thread_in is not None:
            await self._open_thread(heard.open_thread_in, heard.message_id, heard.text)

    async def _open_thread(self, channel_id: int, message_id: int, text: str) -> None:
        """Open the public thread on a message (it takes the message's id); once is enough."""
        assert self.client is not None
        try:
            await self.client.http.start_thread_with_message(
                channel_id, message_id, name=thread_name(text), auto_archive_duration=1440
            )
        except discord.HTTPException as exc:
            if exc.code != THREAD_EXISTS:
                log.warning("discord: opening a thread on %s failed: %s", message_id, exc)

    # -- commands ------------------------------------------------------------------------

    def _commands(self, tree: app_commands.CommandTree[Any]) -> None:
        @tree.command(name="agent", description="Which agent answers here; admins can change it")
        @app_commands.describe(name="route this channel to this agent (admins only)")
        async def agent(interaction: discord.Interaction, name: str | None = None) -> None:
            await interaction.response.send_message(await self._agent_command(interaction, name))

        @tree.command(name="new", description="Start a new conversation here")
        async def new(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(await self._new_command(interaction))

    def _scope(self, interaction: discord.Interaction) -> tuple[ThreadRef, ThreadRef | None]:
        """The channel (routing scope) and the thread the command was given in, if one."""
        channel = interaction.channel
        channel_id = interaction.channel_id or 0
        if interaction.guild_id is None:
            dm = ThreadRef(SOURCE, DM_WORKSPACE, str(channel_id), str(channel_id))
            return ThreadRef(SOURCE, DM_WORKSPACE, str(channel_id), "-"), dm
        guild = str(interaction.guild_id)
        if isinstance(channel, discord.Thread):
            parent = str(channel.parent_id)
            return ThreadRef(SOURCE, guild, parent, "-"), ThreadRef(
                SOURCE, guild, parent, str(channel.id)
            )
        return ThreadRef(SOURCE, guild, str(channel_id), "-"), None

    async def _agent_command(self, interaction: discord.Interaction, wanted: str | None) -> str:
        assert self.bridge is not None
        scope, _ = self._scope(interaction)
        decision = await self.bridge.router.agent_for(scope)
        if not wanted:
            return f"Agent **{decision.agent}** answers in this channel ({decision.why})."
        user = interaction.user
        # Discord works out the member's permissions here and sends them with the interaction.
        allowed = str(user.id) in self.config.admins or interaction.permissions.manage_guild
        if not allowed or scope.workspace == DM_WORKSPACE:
            return "Only members with Manage Server (or a threadbridge admin) can choose the agent."
        if wanted not in self.bridge.config.agent_configs:
            known = ", ".join(sorted(self.bridge.config.agent_configs))
            return f"There is no agent **{wanted}**. Agents: {known}."
        await self.bridge.store.set_route(
            SOURCE, scope.workspace, scope.channel, wanted, set_by=f"discord:{user.id}"
        )
        await self.bridge.router.reload()
        return f"Done: new conversations in this channel go to agent **{wanted}**."

    async def _new_command(self, interaction: discord.Interaction) -> str:
        assert self.bridge is not None
        _, thread = self._scope(interaction)
        if thread is None:
            return "Mention me in a message to start a new conversation: each one gets a thread."
        await self.bridge.new_conversation(thread)
        return "Started afresh: the next message here opens a new conversation."

    # -- posting -------------------------------------------------------------------------

    async def show_working(self, thread: ThreadRef) -> None:
        assert self.client is not None
        await self.client.http.send_typing(int(thread.thread))

    async def post(self, reply: Reply) -> list[str]:
        """Post the parts in order in the thread (opening it if the mention's thread is not
        there yet); mentions in the text are shown but never notify anyone."""
        assert self.client is not None
        thread = reply.thread
        parts = split_text(reply.text, self.config.max_chars) or ["…"]
        target = self.client.get_partial_messageable(int(thread.thread))
        posted: list[str] = []
        draft = self._drafts.pop(thread.key, None) if not reply.posted else None
        try:
            if draft is not None:  # the streamed answer's message becomes its first part
                await target.get_partial_message(draft).edit(content=parts[0])
                posted.append(str(draft))
            for part in parts[len(reply.posted) + len(posted) :]:
                message = await self._send(thread, target, part)
                posted.append(str(message.id))
        except (discord.Forbidden, discord.NotFound) as exc:
            raise PlatformRejected(f"discord: {exc.text or exc}") from exc
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            raise PlatformRetryable(f"discord: {exc}", posted=posted) from exc
        return posted

    async def draft(self, thread: ThreadRef, text: str) -> None:
        """A streaming agent's answer so far: sent once, then edited as it grows."""
        assert self.client is not None
        shown = split_text(text, self.config.max_chars)[0]
        target = self.client.get_partial_messageable(int(thread.thread))
        draft = self._drafts.get(thread.key)
        if draft is None:
            message = await self._send(thread, target, shown)
            self._drafts[thread.key] = message.id
        else:
            await target.get_partial_message(draft).edit(content=shown)

    async def _send(
        self, thread: ThreadRef, target: discord.PartialMessageable, text: str
    ) -> discord.Message:
        none = discord.AllowedMentions.none()
        try:
            return await target.send(text, allowed_mentions=none)
        except discord.NotFound as exc:
            if exc.code != UNKNOWN_CHANNEL or thread.workspace == DM_WORKSPACE:
                raise
        # The mention's thread was never opened (a crash in between): open it and go on.
        await self._open_thread(int(thread.channel), int(thread.thread), "Conversation")
        return await target.send(text, allowed_mentions=none)


def invite_url(application_id: str) -> str:
    """The URL that adds the bot to a server with the scopes and permissions it needs."""
    permissions = discord.Permissions(
        send_messages=True,
        create_public_threads=True,
        send_messages_in_threads=True,
        read_message_history=True,
        view_channel=True,
    )
    return discord.utils.oauth_url(
        int(application_id),
        permissions=permissions,
        scopes=("bot", "applications.commands"),
    )
