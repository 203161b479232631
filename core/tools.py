"""The tool runner seam: the bridge runs the tool calls an agent asks for.

Tools are declared in the config as `[tools.NAME]` and given to agents by name
(`[agents.X] tools = ["NAME"]`). A tool is either an HTTP endpoint (`url`: the arguments are
POSTed as JSON, the response body is the result) or a Python callable
(`python = "package.module:function"`). Every failure — arguments that do not fit the schema,
a timeout, a tool that raises — comes back to the agent as a JSON error result it can read,
never as an exception in the bridge.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from core.model import ToolCall, ToolSpec

if TYPE_CHECKING:  # imported where used: a config without tools never needs them (start-up)
    import httpx
    import jsonschema

    from core.config import Config

log = logging.getLogger(__name__)

MAX_RESULT_CHARS = 16_000  # what one tool result may put into the agent's context
MAX_SCHEMA_ERRORS = 10  # schema errors reported back to the agent, per call


class ToolRunner(Protocol):
    """Runs one tool call and returns its result as text (errors are results too)."""

    async def run(self, agent: str, call: ToolCall) -> str: ...


class NoTools:
    """The runner used when no tools are configured: every call gets an error result."""

    async def run(self, agent: str, call: ToolCall) -> str:
        return json.dumps({"error": f"tool {call.name!r} is not configured for agent {agent!r}"})


def _empty_object() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


class ToolConfig(BaseModel):
    """One `[tools.NAME]` table: what the agent is told, and how the bridge runs the tool."""

    model_config = ConfigDict(extra="forbid")

    description: str
    arguments: dict[str, Any] = Field(
        default_factory=_empty_object, description="JSON Schema of the arguments (an object)"
    )
    url: str | None = Field(default=None, description="HTTP tool: POST the arguments as JSON")
    python: str | None = Field(default=None, description='"package.module:function" to call')
    timeout_s: float = Field(default=10.0, gt=0, description="how long to wait for the answer")
    auth_header: str = Field(default="Authorization", description="header that carries auth_env")
    auth_env: str | None = Field(
        default=None, description="environment variable whose value is sent as auth_header"
    )


def load_target(target: str) -> Callable[..., Any]:
    """Import `package.module:function` (the part after ':' may be dotted) and return it.

    Raises ValueError for a malformed target or one that is not callable, ImportError and
    AttributeError for one that is not there, and whatever the module raises on import.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f'{target!r} is not of the form "package.module:function"')
    found: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{target!r} is a {type(found).__name__}, not a callable")
    function: Callable[..., Any] = found
    return function


def schema_validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for a tool's argument schema; raises jsonschema.SchemaError if it is not
    a valid JSON Schema (of the draft its `$schema` names, 2020-12 when it names none)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def error_result(message: str, details: Any = None) -> str:
    """A result that tells the agent what went wrong, as `{"error": ..., "details": ...}`."""
    body: dict[str, Any] = {"error": message}
    if details is not None:
        body["details"] = details
    return json.dumps(body, ensure_ascii=False)


class ToolFailed(Exception):
    """A tool could not produce a result; the message is fit to show the agent."""

    def __init__(self, message: str, details: Any = None) -> None:
        self.details = details
        super().__init__(message)


class ConfiguredTools:
    """Runs the `[tools.NAME]` of a config, each only for the agents that list it."""

    def __init__(self, config: Config) -> None:
        self._tools: dict[str, ToolConfig] = dict(config.tool_configs)
        self._allowed = {name: list(agent.tools) for name, agent in config.agent_configs.items()}
        self._validators = {n: schema_validator(t.arguments) for n, t in self._tools.items()}
        self._functions: dict[str, Callable[..., Any]] = {}
        self._client: httpx.AsyncClient | None = None

    def specs_for(self, agent: str) -> list[ToolSpec]:
        """What agent `agent` is told about the tools it may call, in its config's order."""
        return [
            ToolSpec(name, self._tools[name].description, self._tools[name].arguments)
            for name in dict.fromkeys(self._allowed.get(agent, []))
            if name in self._tools
        ]

    async def aclose(self) -> None:
        """Close the HTTP client of the HTTP tools."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run(self, agent: str, call: ToolCall) -> str:
        """Run one call for `agent`; every failure is returned as an error result."""
        tool = self._tools.get(call.name)
        allowed = self._allowed.get(agent, [])
        if tool is None or call.name not in allowed:
            return error_result(
                f"tool {call.name!r} is not available to agent {agent!r}",
                {"available": [name for name in allowed if name in self._tools]},
            )
        try:
            arguments = self._arguments(call)
            async with asyncio.timeout(tool.timeout_s):
                result = await self._call(call.name, tool, arguments)
        except ToolFailed as exc:
            return error_result(str(exc), exc.details)
        except TimeoutError:
            log.warning("tool %s (agent %s) timed out after %gs", call.name, agent, tool.timeout_s)
            return error_result(f"tool {call.name!r} did not answer within {tool.timeout_s:g}s")
        except Exception as exc:
            # The message and arguments of an exception may hold secrets (a URL with a token,
            # a connection string), and so may a source line: log the type and the frames'
            # places only.
            where = "\n".join(
                f"  {frame.filename}:{frame.lineno} in {frame.name}"
                for frame in traceback.extract_tb(exc.__traceback__)
            )
            log.error(
                "tool %s (agent %s) raised %s\n%s", call.name, agent, type(exc).__name__, where
            )
            return error_result(f"tool {call.name!r} failed: {type(exc).__name__}")
        return _truncated(result)

    def _arguments(self, call: ToolCall) -> dict[str, Any]:
        text = call.arguments.strip() or "{}"  # some services send "" for a call with none
        try:
            arguments = json.loads(text)
        except ValueError as exc:
            raise ToolFailed("the arguments are not valid JSON", str(exc)) from None
        if not isinstance(arguments, dict):
            raise ToolFailed(
                "the arguments must be a JSON object", f"got {type(arguments).__name__}"
            )
        errors = sorted(
            self._validators[call.name].iter_errors(arguments), key=lambda e: list(e.path)
        )
        if errors:
            raise ToolFailed(
                "the arguments do not match the tool's schema",
                [
                    {"path": "/" + "/".join(str(p) for p in e.path), "message": e.message}
                    for e in errors[:MAX_SCHEMA_ERRORS]
                ],
            )
        return arguments

    async def _call(self, name: str, tool: ToolConfig, arguments: dict[str, Any]) -> str:
        if tool.url is not None:
            return await self._post(name, tool, tool.url, arguments)
        assert tool.python is not None  # the config holds exactly one of url and python
        return await self._python(name, tool.python, arguments)

    async def _post(self, name: str, tool: ToolConfig, url: str, arguments: Any) -> str:
        import httpx

        headers: dict[str, str] = {}
        if tool.auth_env:
            secret = os.environ.get(tool.auth_env)
            if not secret:
                raise ToolFailed(f"tool {name!r} cannot authenticate: {tool.auth_env} is not set")
            headers[tool.auth_header] = secret
        if self._client is None:
            # trust_env=False: tool URLs are the operator's own services; a proxy from the
            # environment must not see the auth headers sent to them.
            self._client = httpx.AsyncClient(
                trust_env=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
        try:
            response = await self._client.post(
                url, json=arguments, headers=headers, timeout=tool.timeout_s
            )
        except httpx.TimeoutException:
            raise TimeoutError from None  # reported as the deadline around every call is
        except httpx.HTTPError as exc:
            # Not the message: it names the URL, which may carry a token.
            raise ToolFailed(f"tool {name!r} could not be reached: {type(exc).__name__}") from None
        if not response.is_success:
            raise ToolFailed(
                f"tool {name!r} answered HTTP {response.status_code}", response.text[:500] or None
            )
        return response.text

    async def _python(self, name: str, target: str, arguments: dict[str, Any]) -> str:
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = load_target(target)
        if inspect.iscoroutinefunction(function):
            value = await function(**arguments)
        else:
            # A sync tool runs in a thread so that it cannot stall every other turn; on a
            # timeout the bridge stops waiting, but the thread runs on to its end.
            value = await asyncio.to_thread(function, **arguments)
            if inspect.isawaitable(value):
                value = await value
        if isinstance(value, str):
            return value
        try:
            return json.dumps(value, ensure_ascii=False, default=pydantic_core.to_jsonable_python)
        except (TypeError, ValueError):
            raise ToolFailed(
                f"tool {name!r} returned a {type(value).__name__}, which is not JSON"
            ) from None


def _truncated(result: str) -> str:
    if len(result) <= MAX_RESULT_CHARS:
        return result
    return (
        result[:MAX_RESULT_CHARS] + f"\n[truncated: the tool returned {len(result):,} characters; "
        f"only the first {MAX_RESULT_CHARS:,} are shown]"
    )
