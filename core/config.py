"""The TOML configuration: typed, validated, with errors that name the file, key and fix."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import agents
from core.agents.base import AgentConfigBase
from core.errors import ConfigError

SOURCES = ("slack", "discord", "telegram", "web", "cli")
PLATFORMS = ("slack", "discord", "telegram", "web")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = Path("config/threadbridge.toml")
ENV_VAR = "THREADBRIDGE_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None


class StoreConfig(_Section):
    url: str = "sqlite+aiosqlite:///data/threadbridge.db"
    echo: bool = False


class AdminConfig(_Section):
    token_env: str = "THREADBRIDGE_ADMIN_TOKEN"


class BridgeConfig(_Section):
    max_turns: int = Field(default=1000, ge=1, description="turns in flight at once")
    max_message_chars: int = Field(default=16000, ge=1)
    lease_s: float = Field(
        default=60.0, gt=0, description="a claim not renewed for this long is free"
    )
    poll_s: float = Field(
        default=0.5, gt=0, description="how often to look for work from other processes"
    )
    max_tool_steps: int = Field(default=8, ge=1, description="tool rounds before the turn stops")
    max_attempts: int = Field(default=5, ge=1, description="tries of a turn that keeps crashing")
    post_retries: int = Field(
        default=8, ge=0, description="attempts to post a reply before giving up"
    )
    failure_notice: str = (
        "Sorry — the agent could not answer just now. Your message is kept and an admin can see "
        "the failed turn; please try again in a moment."
    )


class RouteConfig(_Section):
    source: Literal["slack", "discord", "telegram", "web", "cli"]
    workspace: str | None = None
    channel: str | None = None
    agent: str
    situation: str | None = None
    respond: Literal["mentions", "all"] | None = None


class Config(_Section):
    """The whole file. Platform sections stay raw here; each adapter validates its own."""

    default_agent: str = "demo"
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    admin: AdminConfig = AdminConfig()
    bridge: BridgeConfig = BridgeConfig()
    agents: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    slack: dict[str, Any] | None = None
    discord: dict[str, Any] | None = None
    telegram: dict[str, Any] | None = None
    web: dict[str, Any] | None = None

    # Filled by load_config: the validated agent models and where the file was.
    path: str = Field(default="<defaults>", exclude=True)
    agent_configs: dict[str, AgentConfigBase] = Field(default_factory=dict, exclude=True)

    def platform(self, name: str) -> dict[str, Any] | None:
        section: dict[str, Any] | None = getattr(self, name)
        return section

    def admin_token(self) -> str:
        return os.environ.get(self.admin.token_env, "")


def resolve_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Which file to read: `--config`, then $THREADBRIDGE_CONFIG, then the embedded default."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if DEFAULT_PATH.exists():
        return DEFAULT_PATH
    return PROJECT_ROOT / DEFAULT_PATH


def load_config(
    explicit: str | os.PathLike[str] | None = None, *, check_secrets: bool = True
) -> Config:
    """Read, validate and cross-check the config file; raise ConfigError on any problem."""
    path = resolve_path(explicit)
    name = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            name, "(file)", "no such file", f"pass --config PATH or set {ENV_VAR}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, "(file)", f"cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            name, "(syntax)", f"not valid TOML: {exc}", "fix the TOML there"
        ) from None
    return parse_config(raw, name, check_secrets=check_secrets)


def parse_config(raw: dict[str, Any], name: str, *, check_secrets: bool = True) -> Config:
    """Validate an already-parsed TOML document that came from file `name`."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise _translate(name, exc) from None
    config.path = name
    for agent_name, table in config.agents.items():
        config.agent_configs[agent_name] = _agent_config(name, agent_name, table)
    _cross_check(config)
    if check_secrets:
        _check_agent_secrets(config)
    return config


def _agent_config(file: str, agent_name: str, table: dict[str, Any]) -> AgentConfigBase:
    key = f"agents.{agent_name}"
    service = table.get("service")
    known = ", ".join(sorted(agents.SERVICES))
    if service is None:
        raise ConfigError(
            file, f"{key}.service", "missing", f'add service = "local" (one of: {known})'
        )
    if not isinstance(service, str) or service not in agents.SERVICES:
        raise ConfigError(
            file, f"{key}.service", f"unknown service {service!r}", f"use one of: {known}"
        )
    try:
        return agents.config_model(service).model_validate(table)
    except ValidationError as exc:
        raise _translate(file, exc, prefix=key) from None


def _cross_check(config: Config) -> None:
    file = config.path
    names = sorted(config.agent_configs)
    known = ", ".join(names) or "(none defined)"
    if config.default_agent not in config.agent_configs:
        raise ConfigError(
            file,
            "default_agent",
            f"names agent {config.default_agent!r}, which is not defined",
            f"define [agents.{config.default_agent}] or set default_agent to one of: {known}",
        )
    for index, route in enumerate(config.routes):
        if route.agent not in config.agent_configs:
            raise ConfigError(
                file,
                f"routes[{index}].agent",
                f"unknown agent {route.agent!r}",
                f"define [agents.{route.agent}] or use one of: {known}",
            )
        if route.channel and not route.workspace and route.source in ("slack", "discord"):
            raise ConfigError(
                file,
                f"routes[{index}].workspace",
                "a channel route needs its workspace",
                "add workspace = the team id (Slack) or guild id (Discord)",
            )
    scopes = [(r.source, r.workspace, r.channel) for r in config.routes]
    for index, scope in enumerate(scopes):
        if scope in scopes[:index]:
            raise ConfigError(
                file,
                f"routes[{index}]",
                "the same scope is routed twice",
                "keep one [[routes]] entry per source/workspace/channel",
            )


def _check_agent_secrets(config: Config) -> None:
    for agent_name, agent in config.agent_configs.items():
        for field, value in agent.model_dump().items():
            if field.endswith("_env") and value and not os.environ.get(value):
                raise ConfigError(
                    config.path,
                    f"agents.{agent_name}.{field}",
                    f"environment variable {value} is not set",
                    f"export {value}=… before starting (secrets never go in the file)",
                )


def _translate(file: str, exc: ValidationError, prefix: str = "") -> ConfigError:
    lines = []
    for error in exc.errors():
        loc = ".".join(
            f"[{part}]" if isinstance(part, int) else str(part) for part in error["loc"]
        ).replace(".[", "[")
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "(top level)")
        lines.append((key, error["msg"], _fix_for(error)))
    key, problem, fix = lines[0]
    more = "".join(f"\n{file}: {k}: {p}" + (f"\n  fix: {f}" if f else "") for k, p, f in lines[1:])
    err = ConfigError(file, key, problem, fix)
    if more:
        err.args = (err.args[0] + more,)
    return err


def _fix_for(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "add this key"
    if kind == "extra_forbidden":
        return "remove it or check its spelling; the README lists every key"
    if kind == "literal_error":
        return "use one of the values named above"
    return ""
