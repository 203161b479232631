"""`[discord]`: the bot's settings, apart from the adapter so that reading a config does not
import discord.py (`threadbridge serve` imports an adapter only when its channel is on)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DiscordConfig(BaseModel):
    """`[discord]`: the bot's token (by environment variable) and its behaviour."""

    model_config = ConfigDict(extra="forbid")

    bot_token_env: str = "DISCORD_BOT_TOKEN"
    admins: list[str] = Field(default_factory=list)  # user ids allowed to /agent NAME
    application_id: str | None = None  # for the invite URL the README prints
    api_base_url: str = "https://discord.com/api/v10"
    gateway_url: str = "wss://gateway.discord.gg"
    shards: int | Literal["auto"] | None = None
    shard_ids: list[int] | None = None
    message_content: bool = True  # ask for the privileged Message Content intent
    command_guilds: list[str] = Field(default_factory=list)  # also sync commands here at once
    max_chars: int = Field(default=2000, ge=100, le=2000)
    guild_ready_timeout_s: float = Field(default=2.0, ge=0)
    ready_timeout_s: float = Field(default=30.0, ge=0)

    def secret(self) -> str:
        return os.environ.get(self.bot_token_env, "")

    def why_off(self) -> str | None:
        if not self.secret():
            return f"{self.bot_token_env} is not set"
        if self.shard_ids is not None and not isinstance(self.shards, int):
            return "shard_ids needs shards = N (the total number of shards)"
        return None
