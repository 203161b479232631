"""The composition root: config → store → services → router → bridge → adapters."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError

from adapters.discord.config import DiscordConfig
from adapters.slack.config import SlackConfig
from adapters.telegram.config import TelegramConfig
from adapters.web import WebAdapter, WebConfig
from core.agents import build_service
from core.agents.base import AgentService
from core.bridge import Bridge, ChannelAdapter
from core.config import PLATFORMS, Config
from core.errors import ConfigError
from core.routing import Router
from core.store import Store
from core.tools import ConfiguredTools

if TYPE_CHECKING:  # each platform's SDK is imported only when its channel is on
    from adapters.discord.app import DiscordAdapter
    from adapters.slack.app import SlackAdapter
    from adapters.telegram.app import TelegramAdapter

log = logging.getLogger("threadbridge")
READY_TIMEOUT_S = 2.0  # how long /readyz waits for the store and for each channel's check

M = TypeVar("M", bound=BaseModel)


def section(config: Config, name: str, model: type[M], readme: str) -> M | None:
    """The validated platform section `[name]`, or None when the file has none."""
    raw = config.platform(name)
    if raw is None:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = name + "." + ".".join(str(p) for p in first["loc"])
        raise ConfigError(config.path, key, first["msg"], f"see the README's {readme}") from None


def web_config(config: Config) -> WebConfig | None:
    """The validated `[web]` section, or None when the web chat is off."""
    web = section(config, "web", WebConfig, "[web] keys")
    return web if web is not None and web.enabled else None


def slack_config(config: Config) -> SlackConfig | None:
    return section(config, "slack", SlackConfig, "Slack section")


def discord_config(config: Config) -> DiscordConfig | None:
    return section(config, "discord", DiscordConfig, "Discord section")


def telegram_config(config: Config) -> TelegramConfig | None:
    return section(config, "telegram", TelegramConfig, "Telegram section")


def check_channels(config: Config) -> dict[str, str]:
    """Each platform section's fate: 'on', or why it does not start."""
    fate: dict[str, str] = {}
    for name in PLATFORMS:
        if config.platform(name) is None:
            continue
        if name == "web":
            fate[name] = "on" if web_config(config) else "off: [web] enabled = false"
        elif name == "slack":
            slack = slack_config(config)
            assert slack is not None
            mode = slack.mode()
            fate[name] = {
                "socket": "on (Socket Mode)",
                "http": "on (HTTP events at /slack/events)",
            }.get(mode or "", f"off: {slack.why_off()}")
        elif name == "telegram":
            telegram = telegram_config(config)
            assert telegram is not None
            why = telegram.why_off(config.server.public_url)
            fate[name] = f"off: {why}" if why else f"on ({telegram.mode})"
        elif name == "discord":
            discord = discord_config(config)
            assert discord is not None
            why = discord.why_off()
            fate[name] = f"off: {why}" if why else "on (gateway)"
    return fate


def check_admin_exposure(config: Config, host: str) -> None:
    """Refuse to listen beyond this machine while no admin token guards the admin API."""
    from bots.admin.session import is_loopback

    if config.admin_token() or is_loopback(host):
        return
    env = config.admin.token_env
    raise ConfigError(
        config.path,
        "admin.token_env",
        f"no admin token is set (${env} is empty), and the server would listen on {host}, "
        "beyond this machine: the admin API and pages need a token there",
        f"set {env} (the variable [admin] token_env names) to a long random secret, "
        "or listen on 127.0.0.1 ([server] host, or --host 127.0.0.1)",
    )


class App:
    """Everything `threadbridge serve` runs, started and stopped in order."""

    def __init__(self, config: Config, adapters: list[ChannelAdapter] | None = None) -> None:
        self.config = config
        self.web: WebAdapter | None = None
        self.slack: SlackAdapter | None = None
        self.telegram: TelegramAdapter | None = None
        self.discord: DiscordAdapter | None = None
        if adapters is None:
            adapters = []
            web = web_config(config)
            if web is not None:
                self.web = WebAdapter(web)
                adapters.append(self.web)
            slack = slack_config(config)
            if slack is not None and slack.mode() is not None:
                from adapters.slack.app import SlackAdapter

                self.slack = SlackAdapter(slack)
                adapters.append(self.slack)
            telegram = telegram_config(config)
            if telegram is not None and telegram.why_off(config.server.public_url) is None:
                from adapters.telegram.app import TelegramAdapter

                self.telegram = TelegramAdapter(telegram, config.server.public_url)
                adapters.append(self.telegram)
            discord = discord_config(config)
            if discord is not None and discord.why_off() is None:
                from adapters.discord.app import DiscordAdapter

                self.discord = DiscordAdapter(discord)
                adapters.append(self.discord)
        self.adapters = adapters
        self.store = Store(config.store.url, echo=config.store.echo)
        self.router = Router(config, self.store)
        self.services: dict[str, AgentService] = {}
        self.tools = ConfiguredTools(config)  # no I/O until a tool runs
        self.bridge: Bridge | None = None
        self.start_error: str | None = None  # why start() failed, for the CLI to say
        self.stopping = False
        self._unready: list[str] = []  # what the last readiness check found not ready

    async def start(self) -> Bridge:
        await self.store.migrate()
        self.services = {
            name: build_service(name, agent, self.tools.specs_for(name))
            for name, agent in self.config.agent_configs.items()
        }
        self.bridge = Bridge(self.config, self.store, self.router, self.services, tools=self.tools)
        for adapter in self.adapters:
            self.bridge.add_adapter(adapter)
        await self.bridge.start()
        for adapter in self.adapters:
            await adapter.start(self.bridge)
        for name, fate in check_channels(self.config).items():
            (log.info if fate == "on" else log.warning)("channel %s: %s", name, fate)
        log.info(
            "agents: %s; default agent: %s",
            ", ".join(self.services) or "(none)",
            self.config.default_agent,
        )
        return self.bridge

    def draining(self) -> None:
        """A stop was asked for: end long-lived requests so the server can close."""
        self.stopping = True  # /readyz says so, and load balancers stop sending work here
        if self.web is not None:
            self.web.close_streams()

    async def stop(self, deadline_s: float = 10.0) -> None:
        """Stop taking messages, finish or hand back in-flight turns, release everything."""
        for adapter in self.adapters:
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping %s failed", adapter.source)
        if self.bridge is not None:
            await self.bridge.stop(deadline_s)
        for service in self.services.values():
            await service.aclose()
        await self.tools.aclose()
        await self.store.close()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "channels": [a.source for a in self.adapters]}

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, str]:
        """Each check ("bridge", "store", then each channel) and "ok" or why it is not ready:
        the store must answer a trivial query within `timeout_s`, every channel be connected."""
        names = ["store", *(a.source for a in self.adapters)]
        found = await asyncio.gather(
            self._store_ready(timeout_s), *(_channel_ready(a, timeout_s) for a in self.adapters)
        )
        checks = {"bridge": "ok"}
        if self.bridge is None or self.stopping:
            checks["bridge"] = "shutting down" if self.stopping else "not started"
        checks.update({name: why or "ok" for name, why in zip(names, found, strict=True)})
        unready = [name for name, why in checks.items() if why != "ok"]
        if unready != self._unready:
            if unready:
                log.warning("not ready: %s", "; ".join(f"{n}: {checks[n]}" for n in unready))
            else:
                log.info("ready again")
            self._unready = unready
        return checks

    async def _store_ready(self, timeout_s: float) -> str | None:
        try:
            await asyncio.wait_for(self.store.read(_ping), timeout_s)
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except Exception as exc:  # the class only: a driver's message may hold the address
            return f"unavailable ({type(exc).__name__})"
        return None


def _ping(conn: Any) -> Any:
    return conn.execute(sa.text("SELECT 1")).scalar()


async def _channel_ready(adapter: ChannelAdapter, timeout_s: float) -> str | None:
    """A channel's own answer to `why_not_ready()` (one without it, the web chat, is ready)."""
    probe = getattr(adapter, "why_not_ready", None)
    if probe is None:
        return None
    try:
        why: str | None = await asyncio.wait_for(probe(), timeout_s)
    except Exception as exc:
        return f"the check failed ({type(exc).__name__})"
    return why
