"""Every shipped config file validates, with its secrets set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "config").rglob("*.toml"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in re.findall(r'_env\s*=\s*"([A-Z0-9_]+)"', path.read_text(encoding="utf-8")):
        monkeypatch.setenv(name, "set-for-the-test")
    config = load_config(path)
    assert config.default_agent in config.agent_configs


def test_the_slack_manifest_asks_for_what_the_adapter_uses() -> None:
    manifest = yaml.safe_load((ROOT / "config/examples/slack-manifest.yaml").read_text())
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {
        "app_mentions:read", "chat:write", "channels:history", "groups:history", "im:history",
        "im:read", "im:write", "assistant:write", "commands", "users:read", "mpim:history",
    } <= scopes  # fmt: skip
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert events == {
        "app_mention", "message.channels", "message.groups", "message.im",
        "assistant_thread_started",
    }  # fmt: skip
    [command] = manifest["features"]["slash_commands"]
    assert command["command"] == "/agent"
    assert command["url"].endswith("/slack/events")
