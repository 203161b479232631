"""The TOML configuration: typed, validated, with errors that name the file, key and fix."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from core import agents
from core.agents.base import AgentConfigBase
from core.errors import ConfigError
from core.tools import ToolConfig, load_target, schema_validator

SOURCES = ("slack", "discord", "telegram", "web", "cli")
PLATFORMS = ("slack", "discord", "telegram", "web")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = Path("config/threadbridge.toml")
ENV_VAR = "THREADBRIDGE_CONFIG"
# What every agent service accepts as a function name (OpenAI's rule is the strictest).
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _id_text(value: Any) -> Any:
    """Telegram and Discord ids may be written as TOML integers; every id is kept as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None
    # Slack events are under 100 KB, Telegram updates smaller, and a web chat message is at
    # most `max_message_chars` (16,000 characters, under 200 KB as escaped JSON).
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="a larger request body is refused with 413"
    )


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
    draft_every_s: float = Field(
        default=1.0, ge=0.2, description="a streamed answer's message is edited at most this often"
    )
    working_after_s: float = Field(
        default=0.5,
        ge=0,
        description="a turn shows the agent is working (placeholder, typing) after this long",
    )
    max_attempts: int = Field(default=5, ge=1, description="tries of a turn that keeps crashing")
    post_retries: int = Field(
        default=8, ge=0, description="attempts to post a reply before giving up"
    )
    failure_notice: str = (
        "Sorry — the agent could not answer just now. Your message is kept and an admin can see "
        "the failed turn; please try again in a moment."
    )
    # The circuit breaker each agent gets (core/breaker.py): bridge policy above every service.
    breaker_failures: int = Field(
        default=5, ge=1, description="failed turns in a row that open an agent's circuit"
    )
    breaker_cooldown_s: float = Field(
        default=30.0, gt=0, description="how long a circuit stays open before one probe turn"
    )
    on_recovery: Literal["answer", "ask_resend"] = Field(
        default="answer",
        description="what happens to messages kept while the agent was down once it is back",
    )
    keep_max_age_s: float = Field(
        default=86400.0, gt=0, description="a message kept longer fails with failure_notice"
    )
    kept_notice: str | None = Field(
        default=None, description="the notice that a message is kept (default: per on_recovery)"
    )
    resend_notice: str = (
        "The agent is back, but it could not answer your earlier message while it was down. "
        "Please send it again."
    )


# Platform ids (users, channels): text without spaces; TOML integers are taken as text.
Ids = list[Annotated[str, BeforeValidator(_id_text), Field(pattern=r"^\S{1,200}$")]]


class RouteConfig(_Section):
    source: Literal["slack", "discord", "telegram", "web", "cli"]
    workspace: str | None = None
    channel: str | None = None
    agent: str
    situation: str | None = None
    respond: Literal["mentions", "all"] | None = None
    # Who is answered in the route's scope (core/access.py has the rules; README explains).
    allow_users: Ids | None = None
    deny_users: Ids | None = None
    allow_channels: Ids | None = None
    refused_notice: str | None = Field(
        default=None, description="told once per thread to a refused person; empty: silent"
    )


RATE_NOTICE = (
    "Sorry, that is more than {limit} messages in a minute, so I did not pass this one on. "
    "Please wait {wait} and send it again."
)
BUDGET_NOTICE = (
    "Sorry, you have used today's {limit} messages, so I did not pass this one on. "
    "You can write again at {at} (midnight UTC), in {wait}."
)


class LimitsConfig(_Section):
    """Per-person limits on messages sent to the agents (off unless set; admins are exempt)."""

    per_user_per_minute: int | None = Field(
        default=None, ge=1, description="messages a person may send in any 60 seconds"
    )
    per_user_per_day: int | None = Field(
        default=None, ge=1, description="messages a person may send per UTC day"
    )
    rate_notice: str = RATE_NOTICE
    budget_notice: str = BUDGET_NOTICE


class Config(_Section):
    """The whole file. Platform sections stay raw here; each adapter validates its own."""

    default_agent: str = "demo"
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    admin: AdminConfig = AdminConfig()
    bridge: BridgeConfig = BridgeConfig()
    limits: LimitsConfig = LimitsConfig()
    agents: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    slack: dict[str, Any] | None = None
    discord: dict[str, Any] | None = None
    telegram: dict[str, Any] | None = None
    web: dict[str, Any] | None = None

    # Filled by load_config: the validated agent and tool models and where the file was.
    path: str = Field(default="<defaults>", exclude=True)
    agent_configs: dict[str, AgentConfigBase] = Field(default_factory=dict, exclude=True)
    tool_configs: dict[str, ToolConfig] = Field(default_factory=dict, exclude=True)

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
    for tool_name, table in config.tools.items():
        config.tool_configs[tool_name] = _tool_config(name, tool_name, table)
    _cross_check(config)
    if check_secrets:
        _check_agent_secrets(config)
        _check_tool_secrets(config)
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


def _tool_config(file: str, tool_name: str, table: dict[str, Any]) -> ToolConfig:
    key = f"tools.{tool_name}"
    if not TOOL_NAME.fullmatch(tool_name):
        raise ConfigError(
            file,
            key,
            "agent services take tool names of 1-64 letters, digits, '_' and '-' only",
            "rename the table, and the agents' tools lists that name it",
        )
    try:
        tool = ToolConfig.model_validate(table)
    except ValidationError as exc:
        raise _translate(file, exc, prefix=key) from None
    if (tool.url is None) == (tool.python is None):
        raise ConfigError(
            file,
            key,
            "a tool needs exactly one of url and python",
            'set url = "https://…" (an HTTP tool) or python = "package.module:function"',
        )
    if tool.url is not None:
        _check_tool_url(file, f"{key}.url", tool.url)
    if tool.python is not None:
        _check_tool_target(file, f"{key}.python", tool.python)
    _check_tool_schema(file, f"{key}.arguments", tool.arguments)
    return tool


def _check_tool_url(file: str, key: str, url: str) -> None:
    import httpx  # here: a config without tools never needs it (start-up)

    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL:
        scheme = ""
    if scheme not in ("http", "https"):
        raise ConfigError(file, key, f"not an http(s) URL: {url!r}", 'use "http://host/path"')


def _check_tool_target(file: str, key: str, target: str) -> None:
    fix = 'use "package.module:function", importable from where threadbridge runs'
    try:
        load_target(target)
    except ValueError as exc:
        raise ConfigError(file, key, str(exc), fix) from None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(file, key, f"cannot import {target!r}: {exc}", fix) from None
    except Exception as exc:  # the module itself failed while loading
        raise ConfigError(
            file, key, f"importing {target!r} raised {type(exc).__name__}", fix
        ) from None


def _check_tool_schema(file: str, key: str, schema: dict[str, Any]) -> None:
    import jsonschema  # here: a config without tools never needs it (start-up)

    try:
        schema_validator(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise ConfigError(
            file,
            key,
            f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else ""),
            "see https://json-schema.org/understanding-json-schema/",
        ) from None
    if schema.get("type") != "object":
        raise ConfigError(
            file,
            key,
            "the arguments must be an object (agents send them as named values)",
            'set type = "object" and list the arguments under properties',
        )


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
        if route.allow_channels is not None and route.channel:
            raise ConfigError(
                file,
                f"routes[{index}].allow_channels",
                "this route serves one channel already; allow_channels narrows a source or "
                "workspace route to some of its channels",
                "remove allow_channels here, or set it on the route without channel",
            )
        if route.channel and not route.workspace and route.source in ("slack", "discord"):
            raise ConfigError(
                file,
                f"routes[{index}].workspace",
                "a channel route needs its workspace",
                "add workspace = the team id (Slack) or guild id (Discord)",
            )
    _check_notices(config)
    tools = ", ".join(sorted(config.tool_configs)) or "(none defined)"
    for agent_name, agent in config.agent_configs.items():
        for tool_name in agent.tools:
            if tool_name not in config.tool_configs:
                raise ConfigError(
                    file,
                    f"agents.{agent_name}.tools",
                    f"unknown tool {tool_name!r}",
                    f"define [tools.{tool_name}] or use one of: {tools}",
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


def _check_notices(config: Config) -> None:
    """The limit notices are templates: only {limit}, {wait} and {at} may appear in them."""
    for key in ("rate_notice", "budget_notice"):
        text = getattr(config.limits, key)
        try:
            text.format(limit=1, wait="1 minute", at="00:00 UTC")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                config.path,
                f"limits.{key}",
                f"not a valid notice template ({type(exc).__name__}: {exc})",
                "use only the placeholders {limit}, {wait} and {at}; write {{ and }} for braces",
            ) from None


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


def _check_tool_secrets(config: Config) -> None:
    for tool_name, tool in config.tool_configs.items():
        if tool.auth_env and not os.environ.get(tool.auth_env):
            raise ConfigError(
                config.path,
                f"tools.{tool_name}.auth_env",
                f"environment variable {tool.auth_env} is not set",
                f"export {tool.auth_env}=… before starting (secrets never go in the file)",
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
