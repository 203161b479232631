"""Agent services by their `service` key: each module's config model and its builder."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from core.agents.base import AgentConfigBase, AgentService
from core.model import ToolSpec

# service key -> "module:ConfigClass", "module:builder"
SERVICES: dict[str, tuple[str, str]] = {
    "local": ("core.agents.local:LocalAgentConfig", "core.agents.local:build"),
    "engage-conversations": ("core.agents.engage:EngageConfig", "core.agents.engage:build"),
    "engage-runs": ("core.agents.engage:EngageConfig", "core.agents.engage:build"),
    "sessions": ("core.agents.sessions:SessionsConfig", "core.agents.sessions:build"),
    "execute": ("core.agents.execute:ExecuteConfig", "core.agents.execute:build"),
    "rowboat": ("core.agents.rowboat:RowboatConfig", "core.agents.rowboat:build"),
    "openai": ("core.agents.openai:OpenAIConfig", "core.agents.openai:build"),
}


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_model(service: str) -> type[AgentConfigBase]:
    """The config model of a service key; KeyError for an unknown one."""
    model: type[AgentConfigBase] = _load(SERVICES[service][0])
    return model


def build_service(
    name: str, config: AgentConfigBase, tools: Sequence[ToolSpec] = ()
) -> AgentService:
    """Make the client of agent `name` from its validated config; `tools` are the tools the
    agent may call (services that take tools send them; others ignore them)."""
    builder: Callable[[str, Any, Sequence[ToolSpec]], AgentService] = _load(
        SERVICES[config.service][1]
    )
    return builder(name, config, tools)
