"""The vendor SDK (engagesmarter-py 0.1.4), unchanged, against our Engage emulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

# The SDK's __all__ lists objects rather than names, so mypy sees no re-exports: import from
# the defining modules.
from engagesmarter.client import Client
from engagesmarter.errors import NotFoundApiError, UnauthorizedApiError
from engagesmarter.schemas.conversations import ConversationCreate, ConversationUpdate
from engagesmarter.schemas.messages import AgentMessage, UserMessage

from core.agents.emulators.engage import create_app
from tests.servers import run_asgi

KEY, ORG = "sdk-key", "org-1"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY, "other-key"})) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    httpx.post(f"{base_url}/_emulator/reset").raise_for_status()
    with Client(api_url=base_url, api_key=KEY, org_id=ORG) as sdk:
        yield sdk


def requests_seen(base_url: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = httpx.get(f"{base_url}/_emulator/requests").json()
    return seen


def test_create_chat_and_history(client: Client, base_url: str) -> None:
    created = client.conversations.create(
        conversation=ConversationCreate(data={"thread": "T1"}, source="slack")
    )
    assert (created.data, created.source, created.org_id) == ({"thread": "T1"}, "slack", ORG)
    assert created.tags == []
    assert created.is_saved is False
    assert created.user_id

    replies = client.conversations.chat_with_agent(
        conversation_id=created.id, messages=[UserMessage(content="hello")], agent="helper"
    )
    assert isinstance(replies, list)
    assert [(m.role, m.content) for m in replies] == [("agent", "[helper] received: hello")]
    assert replies[0].conversation_id == created.id

    client.conversations.chat_with_agent(
        conversation_id=created.id,
        messages=[UserMessage(content="again", name="Ann")],
        agent="helper",
    )
    history = client.conversations.get_conversation_message_history(conversation_id=created.id)
    assert [(m.role, m.content) for m in history] == [
        ("user", "hello"),
        ("agent", "[helper] received: hello"),
        ("user", "again"),
        ("agent", "[helper] received: again"),
    ]
    assert history[2].name == "Ann"
    assert history[2].user_id == created.user_id
    assert history[0].run_id == history[1].run_id != history[2].run_id

    # The SDK sends JSON with no Content-Type; the emulator logged what it parsed.
    chat = requests_seen(base_url)[1]
    assert chat["query"] == {"agent": "helper"}
    assert chat["json"] == {"messages": [{"role": "user", "content": "hello", "name": None}]}


def test_chat_streams_status_then_agent(client: Client) -> None:
    conv = client.conversations.create()
    stream = client.conversations.chat_with_agent(
        conversation_id=conv.id, messages=[UserMessage(content="hi")], agent="a", stream=True
    )
    assert [(m.role, m.content) for m in stream] == [
        ("status", "a is thinking"),
        ("agent", "[a] received: hi"),
    ]


def test_search_own_conversations_orders_and_pages(client: Client, base_url: str) -> None:
    ids = [client.conversations.create().id for _ in range(5)]

    newest_first = client.conversations.search_own_conversations()
    assert [c.id for c in newest_first] == ids[::-1]
    oldest_first = client.conversations.search_own_conversations(reversed=False)
    assert [c.id for c in oldest_first] == ids
    page = client.conversations.search_own_conversations(limit=2, offset=1)
    assert [c.id for c in page] == [ids[3], ids[2]]
    assert client.conversations.search_own_conversations(offset=5) == []

    # Bools go on the wire as lowercase words.
    query = requests_seen(base_url)[-3]["query"]
    assert query == {"reversed": "false", "limit": "20", "offset": "0"}

    # Another key is another user: it sees none of these.
    with Client(api_url=base_url, api_key="other-key", org_id=ORG) as other:
        assert other.conversations.search_own_conversations() == []


def test_metadata_get_and_update(client: Client) -> None:
    conv = client.conversations.create(
        conversation=ConversationCreate(data={"a": 1}, source="slack")
    )
    got = client.conversations.get_conversation_metadata(conversation_id=conv.id)
    assert got == conv

    only_source = client.conversations.update_conversation_metadata(
        conversation_id=conv.id, conversation=ConversationUpdate(source="discord")
    )
    assert (only_source.data, only_source.source) == ({"a": 1}, "discord")  # null data: unchanged
    only_data = client.conversations.update_conversation_metadata(
        conversation_id=conv.id, conversation=ConversationUpdate(data={"b": 2})
    )
    assert (only_data.data, only_data.source) == ({"b": 2}, "discord")
    again = client.conversations.get_conversation_metadata(conversation_id=conv.id)
    assert (again.data, again.source) == ({"b": 2}, "discord")


def test_runs_chat_creates_a_conversation(client: Client) -> None:
    messages: list[Any] = [
        UserMessage(content="first"),
        AgentMessage(content="[r] received: first"),
        UserMessage(content="second"),
    ]
    replies = client.runs.chat_with_agent(messages=messages, agent="r", data={"k": "v"})
    assert isinstance(replies, list)
    assert [(m.role, m.content) for m in replies] == [("agent", "[r] received: second")]

    conv_id = replies[0].conversation_id
    conv = client.conversations.get_conversation_metadata(conversation_id=conv_id)
    assert conv.data == {"k": "v"}
    history = client.conversations.get_conversation_message_history(conversation_id=conv_id)
    assert [m.role for m in history] == ["user", "agent", "user", "agent"]

    # The run's conversation carries on through the conversations API.
    more = client.conversations.chat_with_agent(
        conversation_id=conv_id, messages=[UserMessage(content="third")], agent="r"
    )
    assert isinstance(more, list)
    assert more[0].content == "[r] received: third"


def test_wrong_key_is_the_sdk_auth_error(base_url: str) -> None:
    with (
        Client(api_url=base_url, api_key="wrong", org_id=ORG) as bad,
        pytest.raises(UnauthorizedApiError) as raised,
    ):
        bad.conversations.create()
    assert raised.value.ctx == {"response": "Invalid API key"}


def test_unknown_conversation_is_the_sdk_not_found_error(client: Client) -> None:
    with pytest.raises(NotFoundApiError) as raised:
        client.conversations.get_conversation_metadata(conversation_id="nope")
    assert raised.value.ctx == {"response": "Conversation not found"}
    with pytest.raises(NotFoundApiError):
        client.conversations.chat_with_agent(
            conversation_id="nope", messages=[UserMessage(content="x")], agent="a"
        )


def test_another_org_cannot_see_a_conversation(client: Client, base_url: str) -> None:
    conv = client.conversations.create()
    with (
        Client(api_url=base_url, api_key=KEY, org_id="org-2") as elsewhere,
        pytest.raises(NotFoundApiError),
    ):
        elsewhere.conversations.get_conversation_message_history(conversation_id=conv.id)
