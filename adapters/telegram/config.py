"""`[telegram]`: the bot's settings, apart from the adapter so that reading a config does not
import python-telegram-bot (`threadbridge serve` imports an adapter only when it is on)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.telegram.format import LIMIT

WEBHOOK_PATH = "/telegram/webhook"
SECRET_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,256}")  # what Telegram takes as a secret_token


class TelegramConfig(BaseModel):
    """`[telegram]`: the bot's token (by environment variable), its mode and behaviour."""

    model_config = ConfigDict(extra="forbid")

    bot_token_env: str = "TELEGRAM_BOT_TOKEN"
    mode: Literal["polling", "webhook"] = "polling"
    webhook_secret_env: str = "TELEGRAM_WEBHOOK_SECRET"
    public_url: str | None = None  # defaults to [server] public_url
    admins: list[int] = Field(default_factory=list)
    api_base_url: str = "https://api.telegram.org/bot"
    max_chars: int = Field(default=LIMIT, ge=64, le=LIMIT)
    poll_timeout_s: int = Field(default=30, ge=0, le=50)
    standby_retry_s: float = Field(
        default=5.0, gt=0, le=300, description="how often a standby instance tries to poll"
    )
    # Telegram: about 1 message a second per chat, 20 a minute per group, 30 a second in all.
    post_rate_per_chat: float = Field(default=1.0, ge=0)
    post_burst: int = Field(default=3, ge=1)

    def secret(self, name: str) -> str:
        return os.environ.get(getattr(self, name), "")

    def why_off(self, server_public_url: str | None) -> str | None:
        """Why the bot cannot start with these settings, or None when it can."""
        if not self.secret("bot_token_env"):
            return f"{self.bot_token_env} is not set"
        if self.mode == "webhook":
            if not (self.public_url or server_public_url):
                return "mode = 'webhook' needs public_url (in [telegram] or [server])"
            if not self.secret("webhook_secret_env"):
                return f"mode = 'webhook' needs {self.webhook_secret_env} set"
            if not SECRET_SHAPE.fullmatch(self.secret("webhook_secret_env")):
                return f"{self.webhook_secret_env} may hold only A-Z a-z 0-9 _ - (1-256 of them)"
        return None
