"""The tool runner seam: the bridge runs the tool calls an agent asks for."""

from __future__ import annotations

import json
from typing import Protocol

from core.model import ToolCall


class ToolRunner(Protocol):
    """Runs one tool call and returns its result as text (errors are results too)."""

    async def run(self, agent: str, call: ToolCall) -> str: ...


class NoTools:
    """The runner used when no tools are configured: every call gets an error result."""

    async def run(self, agent: str, call: ToolCall) -> str:
        return json.dumps({"error": f"tool {call.name!r} is not configured for agent {agent!r}"})
