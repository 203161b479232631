"""`[slack]`: the Slack app's settings, apart from the adapter so that reading a config does
not import slack-bolt (`threadbridge serve` imports an adapter only when its channel is on)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field


class SlackConfig(BaseModel):
    """`[slack]`: the Slack app's tokens (by environment variable) and its behaviour."""

    model_config = ConfigDict(extra="forbid")

    bot_token_env: str = "SLACK_BOT_TOKEN"
    signing_secret_env: str = "SLACK_SIGNING_SECRET"
    app_token_env: str = "SLACK_APP_TOKEN"
    admins: list[str] = Field(default_factory=list)
    channels: list[str] | None = None
    api_base_url: str = "https://slack.com/api/"
    max_chars: int = Field(default=3000, ge=100, le=40000)
    working_text: str = "_is thinking…_"
    # Slack takes about one message a second per channel, with short bursts; 0 turns pacing off.
    post_rate_per_channel: float = Field(default=1.0, ge=0)
    post_burst: int = Field(default=5, ge=1)

    def secret(self, name: str) -> str:
        return os.environ.get(getattr(self, name), "")

    def mode(self) -> str | None:
        """'socket', 'http', or None when the secrets needed for either are missing."""
        if not self.secret("bot_token_env"):
            return None
        if self.secret("app_token_env"):
            return "socket"
        if self.secret("signing_secret_env"):
            return "http"
        return None

    def why_off(self) -> str:
        if not self.secret("bot_token_env"):
            return f"{self.bot_token_env} is not set"
        return (
            f"set {self.signing_secret_env} (HTTP events at /slack/events) "
            f"or {self.app_token_env} (Socket Mode)"
        )
