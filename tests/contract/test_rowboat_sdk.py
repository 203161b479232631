"""The vendor SDKs, unchanged, against our RowBoat emulator: rowboat 3.1.0 speaks the
messages+state API and rowboat 5.0.1 the conversationId+turn API, each from its own venv."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.agents.emulators.rowboat import create_app
from tests.contract.sdkenv import run_sdk, sdk_python
from tests.servers import run_asgi

KEY, PROJECT = "sdk-key", "proj-1"


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY}, projects={PROJECT})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    return emulator


@pytest.fixture(scope="module")
def state_sdk() -> Path:
    return sdk_python("rowboat3", "rowboat==3.1.0")


@pytest.fixture(scope="module")
def turn_sdk() -> Path:
    return sdk_python("rowboat5", "rowboat==5.0.1")


def seen(base_url: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = httpx.get(f"{base_url}/_emulator/requests").json()
    return log


def run(python: Path, base_url: str, body: str) -> Any:
    """Run `body` after the SDK's client is made (as `client`, keys KEY/PROJECT)."""
    script = (
        "import json, os\n"
        "from rowboat import *\n"
        "from rowboat.client import Client\n"
        "client = Client(os.environ['BASE_URL'], os.environ['PROJECT'], os.environ['KEY'])\n"
        "def failure(call):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as exc:\n"
        "        return str(exc)\n"
        "    return None\n"
    )
    return run_sdk(python, script + body, BASE_URL=base_url, PROJECT=PROJECT, KEY=KEY)


# rowboat 3.1.0: messages + state


def test_stateful_chat_carries_state_through_a_transfer(state_sdk: Path, base_url: str) -> None:
    got = run(
        state_sdk,
        base_url,
        """
chat = StatefulChat(client)
answers = [chat.run(text) for text in ["hello", "please transfer me", "again"]]
print(json.dumps({"answers": answers, "last": chat.state["last_agent_name"],
                  "kinds": [[type(m).__name__, getattr(m, "agenticResponseType", None)]
                            for m in chat.messages]}))
""",
    )
    assert got["answers"] == [
        "[Hub] received: hello",
        "[Specialist] received: please transfer me",
        "[Specialist] received: again",
    ]
    assert got["last"] == "Specialist"
    assert got["kinds"] == [
        ["UserMessage", None],
        ["AssistantMessage", "external"],
        ["UserMessage", None],
        ["AssistantMessage", "internal"],  # Hub hands over to Specialist
        ["AssistantMessageWithToolCalls", "internal"],  # transfer_to_specialist
        ["ToolMessage", None],  # the service's own answer to the transfer
        ["AssistantMessage", "external"],
        ["UserMessage", None],
        ["AssistantMessage", "external"],
    ]

    first, second, third = seen(base_url)
    assert first["path"] == f"/api/v1/{PROJECT}/chat"
    assert first["json"] == {
        "messages": [{"role": "user", "content": "hello"}],
        "state": None,
        "workflowId": None,
        "testProfileId": None,
    }
    # The SDK echoes assistant messages with only the agentic* spelling.
    assert second["json"]["messages"][1] == {
        "role": "assistant",
        "content": "[Hub] received: hello",
        "agenticSender": "Hub",
        "agenticResponseType": "external",
    }
    assert second["json"]["state"]["last_agent_name"] == "Hub"
    transfer = third["json"]["messages"][4]
    assert transfer["tool_calls"][0]["function"]["name"] == "transfer_to_specialist"
    assert third["json"]["state"]["last_agent_name"] == "Specialist"


def test_chat_with_a_start_agent_and_a_system_message(state_sdk: Path, base_url: str) -> None:
    got = run(
        state_sdk,
        base_url,
        """
reply = client.chat(
    messages=[SystemMessage(role="system", content="UserID: 7"),
              UserMessage(role="user", content="balance?")],
    state={"last_agent_name": "Specialist"},
)
print(json.dumps(reply.model_dump()))
""",
    )
    (message,) = got["messages"]
    assert message["content"] == "[Specialist] received: balance?"
    assert (message["agenticSender"], message["agenticResponseType"]) == ("Specialist", "external")
    assert got["state"]["last_agent_name"] == "Specialist"


def test_tool_call_round_trip(state_sdk: Path, base_url: str) -> None:
    got = run(
        state_sdk,
        base_url,
        """
history = [UserMessage(role="user", content='!tool lookup_order {"order_id": "A1"}')]
# A turn that ends in a tool call is internal, so chat() refuses it; _call_api() returns it.
refused = failure(lambda: client.chat(messages=history))
asked = client._call_api(messages=history)
call = asked.messages[-1].tool_calls[0]
history += [*asked.messages, ToolMessage(role="tool", content='{"status": "shipped"}',
                                          tool_call_id=call.id, tool_name=call.function.name)]
answer = client.chat(messages=history, state=asked.state)
print(json.dumps({"refused": refused, "call": call.model_dump(),
                  "answer": answer.messages[-1].content}))
""",
    )
    assert got["refused"] == "Last message was not an external message"
    assert got["call"]["function"] == {"name": "lookup_order", "arguments": '{"order_id": "A1"}'}
    assert got["answer"] == 'tool lookup_order said: {"status": "shipped"}'
    tool_message = seen(base_url)[-1]["json"]["messages"][-1]
    assert tool_message == {
        "role": "tool",
        "content": '{"status": "shipped"}',
        "tool_call_id": got["call"]["id"],
        "tool_name": "lookup_order",
    }


def test_state_api_errors(state_sdk: Path, base_url: str) -> None:
    got = run(
        state_sdk,
        base_url,
        """
hi = [UserMessage(role="user", content="hi")]
bad_key = Client(os.environ["BASE_URL"], os.environ["PROJECT"], "wrong")
no_project = Client(os.environ["BASE_URL"], "nope", os.environ["KEY"])
print(json.dumps([failure(lambda: bad_key.chat(messages=hi)),
                  failure(lambda: no_project.chat(messages=hi))]))
""",
    )
    assert got == [
        'Error: 403 - {"error":"Invalid API key"}',
        'Error: 404 - {"error":"Project not found"}',
    ]


# rowboat 5.0.1: conversationId + turn


def test_run_turn_conversation_with_a_transfer(turn_sdk: Path, base_url: str) -> None:
    got = run(
        turn_sdk,
        base_url,
        """
first = client.run_turn(messages=[UserMessage(role="user", content="hello")])
cid = first.conversationId
second = client.run_turn(messages=[UserMessage(role="user", content="transfer please")],
                         conversationId=cid)
third = client.run_turn(messages=[UserMessage(role="user", content="again")], conversationId=cid)
print(json.dumps({"ids": [first.conversationId, second.conversationId, third.conversationId],
                  "turns": [t.turn.id for t in (first, second, third)],
                  "outputs": [[m.model_dump() for m in t.turn.output]
                              for t in (first, second, third)]}))
""",
    )
    assert len(set(got["ids"])) == 1
    assert len(set(got["turns"])) == 3
    first, second, third = got["outputs"]
    assert first == [
        {
            "role": "assistant",
            "content": "[Hub] received: hello",
            "agenticName": "Hub",
            "responseType": "external",
        }
    ]
    said, transfer, result, answer = second
    assert (said["responseType"], said["agenticName"]) == ("internal", "Hub")
    assert transfer["toolCalls"][0]["function"]["name"] == "transfer_to_specialist"
    assert (result["toolCallId"], result["content"]) == (
        transfer["toolCalls"][0]["id"],
        '{"assistant": "Specialist"}',
    )
    assert (answer["content"], answer["responseType"]) == (
        "[Specialist] received: transfer please",
        "external",
    )
    assert third[0]["content"] == "[Specialist] received: again"

    requests = seen(base_url)
    assert requests[0]["json"] == {
        "conversationId": None,
        "messages": [{"role": "user", "content": "hello"}],
        "mockTools": None,
    }
    assert requests[1]["json"]["conversationId"] == got["ids"][0]
    assert requests[1]["json"]["messages"] == [{"role": "user", "content": "transfer please"}]


def test_run_turn_tool_round_trip_and_mock_tools(turn_sdk: Path, base_url: str) -> None:
    got = run(
        turn_sdk,
        base_url,
        """
asked = client.run_turn(messages=[UserMessage(role="user", content='!tool lookup_order {"id": 1}')])
call = asked.turn.output[-1].toolCalls[0]
answered = client.run_turn(
    messages=[ToolMessage(role="tool", content="shipped", toolCallId=call.id,
                          toolName=call.function.name)],
    conversationId=asked.conversationId)
mocked = client.run_turn(messages=[UserMessage(role="user", content="!tool weather")],
                         mockTools={"weather": "sunny"})
print(json.dumps({"asked": type(asked.turn.output[-1]).__name__, "call": call.model_dump(),
                  "answer": answered.turn.output[-1].content,
                  "mocked": [m.model_dump() for m in mocked.turn.output]}))
""",
    )
    assert got["asked"] == "AssistantMessageWithToolCalls"
    assert got["call"]["function"] == {"name": "lookup_order", "arguments": '{"id": 1}'}
    assert got["answer"] == "tool lookup_order said: shipped"
    call, result, answer = got["mocked"]
    assert call["toolCalls"][0]["function"]["name"] == "weather"
    assert (result["role"], result["content"], result["toolName"]) == ("tool", "sunny", "weather")
    assert answer["content"] == "tool weather said: sunny"
    assert seen(base_url)[1]["json"]["messages"] == [
        {
            "role": "tool",
            "content": "shipped",
            "toolCallId": got["call"]["id"],
            "toolName": "lookup_order",
        }
    ]


def test_turn_api_errors(turn_sdk: Path, base_url: str) -> None:
    got = run(
        turn_sdk,
        base_url,
        """
hi = [UserMessage(role="user", content="hi")]
bad_key = Client(os.environ["BASE_URL"], os.environ["PROJECT"], "wrong")
print(json.dumps([failure(lambda: bad_key.run_turn(messages=hi)),
                  failure(lambda: client.run_turn(messages=hi, conversationId="nope"))]))
""",
    )
    assert got == [
        'Error: 403 - {"error":"Invalid API key"}',
        'Error: 404 - {"error":"Conversation not found"}',
    ]
