"""Engage Smarter clients: the stateful conversations API and the stateless runs API.

Both speak the same MessageRead list; only `role == "agent"` messages are shown to the user
(`info` and `status` messages are the service's own bookkeeping).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from core.agents.base import (
    AgentResponse,
    AgentService,
    HttpAgentConfig,
    HttpAgentService,
    env_secret,
)
from core.errors import AgentRejected
from core.model import Conversation, ToolSpec, Turn


class EngageConfig(HttpAgentConfig):
    """`service = "engage-conversations"` or `"engage-runs"`: an Engage Smarter agent."""

    service: Literal["engage-conversations", "engage-runs"]
    base_url: str = "https://api.engagesmarter.ai"
    api_key_env: str | None = "ENGAGE_SMARTER_API_KEY"
    org_id_env: str | None = "ENGAGE_SMARTER_ORG_ID"
    agent: str = Field(min_length=1, description="the Engage agent's name, sent as ?agent=")


class EngageMessage(BaseModel):
    """The part of a MessageRead the bridge uses."""

    model_config = ConfigDict(extra="ignore")

    conversation_id: str
    role: str
    content: str
    name: str | None = None


class _ConversationRead(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str


_MESSAGES = TypeAdapter(list[EngageMessage])


def read_messages(body: Any, what: str) -> list[EngageMessage]:
    """Check a decoded `[MessageRead]` body; AgentRejected names what was wrong."""
    try:
        return _MESSAGES.validate_python(body)
    except ValidationError as exc:
        raise AgentRejected(f"engage: unreadable reply to {what}: {_first_error(exc)}") from None


def read_conversation_id(body: Any, what: str) -> str:
    """The id of a decoded ConversationRead(Full) body; AgentRejected when it has none."""
    try:
        return _ConversationRead.model_validate(body).id
    except ValidationError as exc:
        raise AgentRejected(f"engage: unreadable reply to {what}: {_first_error(exc)}") from None


def agent_response(messages: list[EngageMessage], remote_id: str | None = None) -> AgentResponse:
    """The agent's messages as turns to store and texts to show."""
    turns = [
        Turn(role="agent", content=m.content, name=m.name) for m in messages if m.role == "agent"
    ]
    return AgentResponse(turns=turns, remote_id=remote_id)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']} ({exc.error_count()} problem(s))"


def _headers(config: EngageConfig) -> dict[str, str]:
    values = {
        "X-Api-Key": env_secret(config.api_key_env),
        "X-Org-Id": env_secret(config.org_id_env),
    }
    return {key: value for key, value in values.items() if value}


def _user_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": t.content, "name": t.name} for t in turns if t.role == "user"
    ]


class EngageConversations(HttpAgentService):
    """Engage's conversations API: the service keeps the history; we send only new messages."""

    stateful = True

    def __init__(self, name: str, config: EngageConfig) -> None:
        super().__init__(name, config, _headers(config))
        self.engage = config

    async def open(self, conversation: Conversation) -> str | None:
        return await self._create(conversation)

    async def _create(self, conversation: Conversation) -> str:
        body = {"data": conversation.data, "source": conversation.source}
        reply = await self.request("POST", "/v1/conversations", json=body)
        return read_conversation_id(reply, "POST /v1/conversations")

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send the new user turns; opens the remote conversation first if it has none yet."""
        remote_id = conversation.remote_id
        opened = None
        if remote_id is None:
            remote_id = opened = await self._create(conversation)
        path = f"/v1/conversations/{quote(remote_id, safe='')}/chat"
        body = await self.request(
            "POST",
            path,
            json={"messages": _user_messages(new)},
            params={"agent": self.engage.agent},
        )
        return agent_response(read_messages(body, f"POST {path}"), remote_id=opened)

    async def update_metadata(
        self, remote_id: str, *, data: dict[str, Any] | None, source: str | None
    ) -> None:
        """Replace the remote conversation's data and/or source (None leaves it unchanged)."""
        path = f"/v1/conversations/{quote(remote_id, safe='')}"
        body = await self.request("PATCH", path, json={"data": data, "source": source})
        read_conversation_id(body, f"PATCH {path}")


class EngageRuns(HttpAgentService):
    """Engage's runs API: each call sends the history and makes a new remote conversation."""

    stateful = False

    def __init__(self, name: str, config: EngageConfig) -> None:
        super().__init__(name, config, _headers(config))
        self.engage = config

    async def open(self, conversation: Conversation) -> str | None:
        return None

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send the history (the bridge bounds it by `memory`) and the new user and agent turns."""
        turns = [*history, *new]
        messages = [
            {"role": t.role, "content": t.content, "name": t.name}
            for t in turns
            if t.role in ("user", "agent")
        ]
        path = "/v1/runs/chat"
        body = await self.request(
            "POST",
            path,
            json={"messages": messages, "data": conversation.data},
            params={"agent": self.engage.agent},
        )
        replies = read_messages(body, f"POST {path}")
        remote_id = replies[0].conversation_id if replies else None
        return agent_response(replies, remote_id=remote_id)


def build(name: str, config: EngageConfig, tools: Sequence[ToolSpec] = ()) -> AgentService:
    """The client for `config.service` (Engage agents keep their tools at Engage)."""
    if config.service == "engage-conversations":
        return EngageConversations(name, config)
    return EngageRuns(name, config)
