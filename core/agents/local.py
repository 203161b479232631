"""The built-in demo agent: answers in process, deterministically, with no network or key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from core.agents.base import AgentConfigBase, AgentResponse
from core.model import Conversation, ToolSpec, Turn


class LocalAgentConfig(AgentConfigBase):
    """`service = "local"`: the demo agent."""

    service: Literal["local"]
    greeting: str = "I'm the demo agent that ships with threadbridge."


class LocalAgent:
    """Says what it received and what it knows of the conversation."""

    stateful = False

    def __init__(self, name: str, config: LocalAgentConfig) -> None:
        self.name = name
        self.config = config

    async def open(self, conversation: Conversation) -> str | None:
        return None

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        said = next((t.content for t in reversed(new) if t.role == "user"), "")
        count = sum(1 for t in [*history, *new] if t.role == "user")
        text = (
            f"You said: “{said}”\n\n"
            f"{self.config.greeting} This is message {count} of a **{conversation.source}** "
            f"conversation (`{conversation.id}`), answered by agent `{self.name}`.\n"
            "Point a channel at a real agent in `config/threadbridge.toml`."
        )
        turn = Turn(role="agent", content=text, name=self.name)
        return AgentResponse(turns=[turn])

    async def aclose(self) -> None:
        return None


def build(name: str, config: LocalAgentConfig, tools: Sequence[ToolSpec] = ()) -> LocalAgent:
    return LocalAgent(name, config)
