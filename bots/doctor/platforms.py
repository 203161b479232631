"""Doctor checks of the platforms: each token live, and the scopes, webhook and intents the
adapters need. Each platform is reached at the same `api_base_url` its adapter uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from bots.doctor.common import Check, Job, Problem, done, guarded, request
from core.config import Config
from core.errors import ConfigError

if TYPE_CHECKING:  # the adapters (and their SDKs) load only for the sections a config has
    from adapters.discord.config import DiscordConfig
    from adapters.slack.config import SlackConfig
    from adapters.telegram.config import TelegramConfig

# The bot scopes config/examples/slack-manifest.yaml asks for (tests/e2e/test_doctor.py keeps
# them equal); kept here, not read from the file, so that an installed threadbridge has them.
SLACK_BOT_SCOPES = (
    "app_mentions:read",
    "assistant:write",
    "channels:history",
    "channels:read",
    "chat:write",
    "commands",
    "groups:history",
    "groups:read",
    "im:history",
    "im:read",
    "im:write",
    "mpim:history",
    "users:read",
)
# Application flags GATEWAY_MESSAGE_CONTENT (bit 18) and GATEWAY_MESSAGE_CONTENT_LIMITED (19).
MESSAGE_CONTENT_FLAGS = 1 << 18 | 1 << 19
PLATFORMS = ("slack", "telegram", "discord")


def read_section(config: Config, name: str) -> Any:
    """The validated `[name]` platform section, None when absent; ConfigError when invalid."""
    if config.platform(name) is None:
        return None
    from bots import app

    readers = {
        "slack": app.slack_config,
        "telegram": app.telegram_config,
        "discord": app.discord_config,
    }
    return readers[name](config)


def platform_jobs(config: Config, http: httpx.AsyncClient) -> list[Job]:
    """The checks of each platform section in the config."""
    jobs: list[Job] = []
    for name in PLATFORMS:
        try:
            section = read_section(config, name)
        except ConfigError as exc:
            problem = f"{exc.key}: {exc.problem}"
            jobs.append(done(Check(f"{name} config", "FAIL", problem, exc.fix)))
            continue
        if section is None:
            continue
        if name == "slack":
            jobs.extend(slack_jobs(section, http))
        elif name == "telegram":
            jobs.extend(telegram_jobs(section, config.server.public_url, http))
        else:
            jobs.extend(discord_jobs(section, http))
    return jobs


def _token_missing(name: str, env: str, example: str) -> Check:
    return Check(
        f"{name} bot token",
        "FAIL",
        f"{env} is not set, so {name} does not start",
        f"export {env}={example} (or remove the [{name}] section)",
    )


def slack_jobs(slack: SlackConfig, http: httpx.AsyncClient) -> list[Job]:
    if not slack.secret("bot_token_env"):
        return [done(_token_missing("slack", slack.bot_token_env, "xoxb-…"))]
    jobs: list[Job] = [
        guarded(("slack bot token", "slack scopes"), slack_token(slack, http), _SLACK_NET)
    ]
    mode = slack.mode()
    if mode == "socket":
        jobs.append(guarded(("slack app token",), slack_app_token(slack, http), _SLACK_NET))
    elif mode is None:
        fix = (
            f"export {slack.signing_secret_env}=… (HTTP events) or "
            f"{slack.app_token_env}=xapp-… (Socket Mode)"
        )
        jobs.append(done(Check("slack mode", "FAIL", slack.why_off(), fix)))
    return jobs


_SLACK_NET = "check the network, a proxy, or [slack] api_base_url"


async def _slack_call(slack: SlackConfig, http: httpx.AsyncClient, method: str, token: str) -> Any:
    url = slack.api_base_url.rstrip("/") + "/" + method
    response, body = await request(http, "POST", url, headers={"Authorization": f"Bearer {token}"})
    if not isinstance(body, dict):
        raise Problem(f"{method}: HTTP {response.status_code} without a Slack answer", _SLACK_NET)
    return response, body


async def slack_token(slack: SlackConfig, http: httpx.AsyncClient) -> list[Check]:
    """auth.test with the bot token; its x-oauth-scopes header against the manifest's."""
    response, body = await _slack_call(slack, http, "auth.test", slack.secret("bot_token_env"))
    if body.get("error") == "ratelimited":
        raise Problem("Slack is rate limiting this app just now", "try again in a minute")
    if not body.get("ok"):
        raise Problem(
            f"Slack refused the token in {slack.bot_token_env} ({body.get('error')})",
            "set it to the app's Bot User OAuth Token (xoxb-…), from OAuth & Permissions",
        )
    mode = {"socket": "Socket Mode", "http": "HTTP events"}.get(slack.mode() or "", "no mode")
    who = f"bot user {body.get('user_id')} in {body.get('team')} ({body.get('team_id')}); {mode}"
    header = response.headers.get("x-oauth-scopes")
    if header is None:
        scopes = Check("slack scopes", "skip", "Slack sent no x-oauth-scopes header")
    else:
        granted = {scope.strip() for scope in header.split(",")}
        missing = [scope for scope in SLACK_BOT_SCOPES if scope not in granted]
        scopes = (
            Check(
                "slack scopes",
                "FAIL",
                f"missing {', '.join(missing)}",
                "add them under OAuth & Permissions → Bot Token Scopes (or create the app from "
                "config/examples/slack-manifest.yaml), then reinstall the app to the workspace",
            )
            if missing
            else Check("slack scopes", "ok", f"all {len(SLACK_BOT_SCOPES)} the manifest lists")
        )
    return [Check("slack bot token", "ok", who), scopes]


async def slack_app_token(slack: SlackConfig, http: httpx.AsyncClient) -> list[Check]:
    """apps.connections.open with the app-level token: a Socket Mode URL, never connected."""
    token = slack.secret("app_token_env")
    _, body = await _slack_call(slack, http, "apps.connections.open", token)
    if not body.get("ok"):
        raise Problem(
            f"Slack refused the token in {slack.app_token_env} ({body.get('error')})",
            "set it to an app-level token (xapp-…) with connections:write, from Basic "
            "Information → App-Level Tokens, and turn Socket Mode on",
        )
    return [Check("slack app token", "ok", "Socket Mode connections open")]


def telegram_jobs(
    telegram: TelegramConfig, server_url: str | None, http: httpx.AsyncClient
) -> list[Job]:
    env = telegram.bot_token_env
    if not telegram.secret("bot_token_env"):
        return [done(_token_missing("telegram", env, "123456:ABC…"))]
    labels = ("telegram bot token", "telegram webhook")
    jobs: list[Job] = [guarded(labels, telegram_checks(telegram, server_url, http), _TELEGRAM_NET)]
    why = telegram.why_off(server_url)
    if why:
        fix = "see the README's Telegram section (webhook mode)"
        jobs.append(done(Check("telegram mode", "FAIL", why, fix)))
    return jobs


_TELEGRAM_NET = "check the network, a proxy, or [telegram] api_base_url"


async def _telegram_call(telegram: TelegramConfig, http: httpx.AsyncClient, method: str) -> Any:
    url = f"{telegram.api_base_url}{telegram.secret('bot_token_env')}/{method}"
    response, body = await request(http, "GET", url)
    if response.status_code in (401, 404):  # Telegram answers 404 to a malformed token
        raise Problem(
            f"Telegram refused the token in {telegram.bot_token_env}",
            "set it to the token BotFather gave you (123456:ABC…)",
        )
    if not isinstance(body, dict) or not body.get("ok"):
        what = body.get("description") if isinstance(body, dict) else None
        raise Problem(f"{method}: HTTP {response.status_code} {what or ''}".rstrip(), "")
    return body["result"]


async def telegram_checks(
    telegram: TelegramConfig, server_url: str | None, http: httpx.AsyncClient
) -> list[Check]:
    """getMe, then getWebhookInfo against the configured mode."""
    me = await _telegram_call(telegram, http, "getMe")
    token = Check("telegram bot token", "ok", f"@{me.get('username')} (id {me.get('id')})")
    try:
        info = await _telegram_call(telegram, http, "getWebhookInfo")
    except Problem as exc:
        return [token, Check("telegram webhook", "FAIL", exc.detail, exc.fix or _TELEGRAM_NET)]
    return [token, webhook_check(telegram, server_url, info)]


def webhook_check(telegram: TelegramConfig, server_url: str | None, info: Any) -> Check:
    """The webhook Telegram has against the mode: polling wants none, webhook wants ours."""
    from adapters.telegram.config import WEBHOOK_PATH

    name, url = "telegram webhook", str(info.get("url") or "")
    error = info.get("last_error_message")
    seen = f"; last delivery error: {error}" if error else ""
    other_owner = "if another deployment uses this bot, give each its own bot (BotFather)"
    if telegram.mode == "polling":
        if not url:
            return Check(name, "ok", "none set (long polling)")
        return Check(
            name,
            "FAIL",
            f"a webhook is set ({url}) but mode = 'polling': updates go there, not here",
            f"{other_owner}; else `threadbridge serve` deletes it at start",
        )
    public = (telegram.public_url or server_url or "").rstrip("/")
    if not public:
        return Check(name, "skip", "mode = 'webhook' without a public_url")
    expected = public + WEBHOOK_PATH
    if url == expected:
        return Check(name, "ok", f"{url}{seen}")
    if not url:
        return Check(
            name,
            "FAIL",
            "no webhook is set: Telegram delivers no updates",
            f"start `threadbridge serve`: it registers {expected}",
        )
    return Check(
        name,
        "FAIL",
        f"the webhook is {url}, not {expected}{seen}",
        f"set public_url to this deployment's address and restart serve; {other_owner}",
    )


def discord_jobs(discord: DiscordConfig, http: httpx.AsyncClient) -> list[Job]:
    if not discord.secret():
        return [done(_token_missing("discord", discord.bot_token_env, "…"))]
    labels = ("discord bot token", "discord intents")
    return [guarded(labels, discord_checks(discord, http), _DISCORD_NET)]


_DISCORD_NET = "check the network, a proxy, or [discord] api_base_url"


async def _discord_call(discord: DiscordConfig, http: httpx.AsyncClient, path: str) -> Any:
    url = discord.api_base_url.rstrip("/") + path
    headers = {
        "Authorization": f"Bot {discord.secret()}",
        "User-Agent": "DiscordBot (https://github.com/threadbridge, 0.1) threadbridge-doctor",
    }
    response, body = await request(http, "GET", url, headers=headers)
    if response.status_code == 401:
        raise Problem(
            f"Discord refused the token in {discord.bot_token_env}",
            "copy the token from the developer portal (Bot → Reset Token)",
        )
    if response.status_code != 200 or not isinstance(body, dict):
        what = body.get("message") if isinstance(body, dict) else None
        raise Problem(f"GET {path}: HTTP {response.status_code} {what or ''}".rstrip(), "")
    return body


async def discord_checks(discord: DiscordConfig, http: httpx.AsyncClient) -> list[Check]:
    """GET /users/@me, then the application's flags for the Message Content intent."""
    me = await _discord_call(discord, http, "/users/@me")
    token = Check("discord bot token", "ok", f"{me.get('username')} (id {me.get('id')})")
    try:
        app = await _discord_call(discord, http, "/oauth2/applications/@me")
    except Problem as exc:
        return [token, Check("discord intents", "FAIL", exc.detail, exc.fix or _DISCORD_NET)]
    return [token, intents_check(discord, app)]


def intents_check(discord: DiscordConfig, app: Any) -> Check:
    """Is the Message Content intent on for the app, as the adapter asks by default?"""
    name = "discord intents"
    if not discord.message_content:
        return Check(name, "skip", "message_content = false: mentions only")
    if int(app.get("flags") or 0) & MESSAGE_CONTENT_FLAGS:
        return Check(name, "ok", f"Message Content on for app {app.get('id')}")
    return Check(
        name,
        "FAIL",
        f"the Message Content intent is off for app {app.get('id')}: messages that do not "
        "mention the bot arrive empty",
        "turn it on at https://discord.com/developers/applications → Bot → Privileged Gateway "
        "Intents, or set [discord] message_content = false (mentions only)",
    )
