"""The vendor SDK (julep 0.2.14), unchanged, against our sessions emulator.

The SDK runs in a venv of its own (`sdkenv`): it pins `openai<2`, and its `environs` breaks on
marshmallow 4, so `marshmallow<4` is installed beside it. One script per base URL exercises every
sessions call on the AGENT_SERVICES page and prints what it saw; the tests check the parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core.agents.emulators.sessions import create_app
from tests.contract.sdkenv import run_sdk, sdk_python
from tests.servers import run_asgi

KEY = "sdk-key"
REQUIREMENTS = ("julep==0.2.14", "marshmallow<4")

SCRIPT = """
    import json, os, uuid
    from julep import Client
    from julep.api import Tool, FunctionDef, InputChatMlMessage
    from julep.api.core.api_error import ApiError

    base = os.environ["BASE_URL"]
    client = Client(api_key=os.environ["KEY"], base_url=base)
    agent, user = str(uuid.uuid4()), str(uuid.uuid4())
    out = {}

    def failure(call):
        try:
            call()
        except ApiError as exc:
            return {"status": exc.status_code, "body": exc.body}
        return None

    made = client.sessions.create(
        agent_id=agent, user_id=user, situation="You coach.", metadata={"source": "slack"}
    )
    other = client.sessions.create(agent_id=agent, user_id=user, metadata={"source": "web"})
    got = client.sessions.get(made.id)
    out["get"] = json.loads(got.json())
    out["create"] = {"id": made.id, "created_at": str(made.created_at)}

    out["list_all"] = [s.id for s in client.sessions.list()]
    out["list_slack"] = [s.id for s in client.sessions.list(metadata_filter={"source": "slack"})]
    out["list_page"] = [s.id for s in client.sessions.list(limit=1, offset=1)]
    out["ids"] = [made.id, other.id]

    patched = client.sessions.update(session_id=made.id, situation="You coach runners.")
    out["patch"] = {"situation": patched.situation, "updated_at": str(patched.updated_at)}
    client.sessions.update(session_id=made.id, metadata={"team": "T1"})
    out["after_patch"] = json.loads(client.sessions.get(made.id).json())
    client.sessions.update(
        session_id=other.id, situation="Replaced.", metadata={"only": 1}, overwrite=True
    )
    out["after_put"] = json.loads(client.sessions.get(other.id).json())
    out["put_without_situation"] = failure(
        lambda: client.sessions.update(session_id=other.id, overwrite=True)
    )

    reply = client.sessions.chat(
        session_id=made.id,
        messages=[InputChatMlMessage(role="user", content="hello", name="Ann")],
        temperature=0.5,
    )
    out["chat"] = json.loads(reply.json())
    tool = Tool(
        type="function",
        id=str(uuid.uuid4()),
        function=FunctionDef(
            name="lookup_order",
            description="Look up an order",
            parameters={"type": "object", "properties": {"order_id": {"type": "string"}}},
        ),
    )
    asked = client.sessions.chat(
        session_id=made.id,
        messages=[{"role": "user", "content": '!tool lookup_order {"order_id": "42"}'}],
        tools=[tool],
    )
    out["tool_call"] = json.loads(asked.json())
    answered = client.sessions.chat(
        session_id=made.id,
        messages=[{"role": "function", "name": "lookup_order", "content": "shipped"}],
        tools=[tool],
    )
    out["tool_answer"] = json.loads(answered.json())

    out["history"] = [
        [m.role.value, m.content, m.name] for m in client.sessions.history(session_id=made.id)
    ]
    out["history_page"] = [
        m.content for m in client.sessions.history(session_id=made.id, limit=2, offset=1)
    ]
    out["suggestions"] = client.sessions.suggestions(session_id=made.id)
    client.sessions.delete_history(made.id)
    out["history_after_delete"] = client.sessions.history(session_id=made.id)
    client.sessions.delete(other.id)
    out["after_delete"] = [s.id for s in client.sessions.list()]

    unknown = str(uuid.uuid4())
    out["errors"] = {
        "get_unknown": failure(lambda: client.sessions.get(unknown)),
        "chat_unknown": failure(
            lambda: client.sessions.chat(
                session_id=unknown, messages=[{"role": "user", "content": "x"}]
            )
        ),
        "bad_key": failure(
            lambda: Client(api_key="wrong", base_url=base).sessions.get(made.id)
        ),
        "bad_role": failure(
            lambda: client._api_client.chat(
                made.id, messages=[{"role": "robot", "content": "x"}]
            )
        ),
    }
    print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def sdk() -> Any:
    return sdk_python("julep", *REQUIREMENTS)


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture(scope="module", params=["", "/api"], ids=["root", "api"])
def run(request: pytest.FixtureRequest, sdk: Any, emulator: str) -> dict[str, Any]:
    """What the script saw, and the requests the emulator received, for one base URL."""
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    seen: dict[str, Any] = run_sdk(sdk, SCRIPT, BASE_URL=emulator + request.param, KEY=KEY)
    seen["wire"] = httpx.get(f"{emulator}/_emulator/requests").json()
    seen["prefix"] = request.param
    return seen


def wire(run: dict[str, Any], method: str, suffix: str) -> list[dict[str, Any]]:
    return [r for r in run["wire"] if r["method"] == method and r["path"] == run["prefix"] + suffix]


def test_create_and_get(run: dict[str, Any]) -> None:
    got = run["get"]
    assert got["id"] == run["create"]["id"]
    assert got["situation"] == "You coach."
    assert got["summary"] is None
    assert isinstance(got["user_id"], str)
    first, second = wire(run, "POST", "/sessions")
    # The SDK sends what it was not given as explicit nulls.
    assert first["json"]["metadata"] == {"source": "slack"}
    assert second["json"]["situation"] is None


def test_list_filters_and_pages(run: dict[str, Any]) -> None:
    made, other = run["ids"]
    assert run["list_all"] == [other, made]  # newest first
    assert run["list_slack"] == [made]
    assert run["list_page"] == [made]
    queries = [r["query"] for r in wire(run, "GET", "/sessions")]
    assert queries[0] == {"metadata_filter": "{}"}
    assert queries[2] == {"limit": "1", "offset": "1", "metadata_filter": "{}"}


def test_patch_merges_and_put_replaces(run: dict[str, Any]) -> None:
    assert run["patch"]["situation"] == "You coach runners."
    after = run["after_patch"]
    assert after["situation"] == "You coach runners."  # the metadata-only patch kept it
    assert after["metadata"] is not None
    patches = [r["json"] for r in wire(run, "PATCH", f"/sessions/{run['ids'][0]}")]
    assert patches == [
        {"situation": "You coach runners.", "metadata": None},
        {"situation": None, "metadata": {"team": "T1"}},
    ]
    assert run["after_put"]["situation"] == "Replaced."
    puts = [r["json"] for r in wire(run, "PUT", f"/sessions/{run['ids'][1]}")]
    assert puts[0] == {"situation": "Replaced.", "metadata": {"only": 1}}
    assert run["put_without_situation"]["status"] == 422


def test_chat_answers_and_records(run: dict[str, Any]) -> None:
    chat = run["chat"]
    assert chat["finish_reason"] == "stop"
    [[message]] = chat["response"]
    assert (message["role"], message["content"]) == ("assistant", "received: hello")
    assert chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + 2
    body = wire(run, "POST", f"/sessions/{run['ids'][0]}/chat")[0]["json"]
    assert body["messages"][0]["role"] == "user"
    assert body["messages"][0]["content"] == "hello"
    assert body["temperature"] == 0.5
    assert body["top_p"] is None  # every sampling option goes out, null when unset


def test_tool_call_and_result(run: dict[str, Any]) -> None:
    asked = run["tool_call"]
    assert asked["finish_reason"] == "tool_calls"
    [[call]] = asked["response"]
    assert call["role"] == "function_call"
    assert call["content"] == '{"arguments": "{\\"order_id\\": \\"42\\"}", "name": "lookup_order"}'
    [[answer]] = run["tool_answer"]["response"]
    assert answer["content"] == "tool lookup_order said: shipped"


def test_history_oldest_first(run: dict[str, Any]) -> None:
    assert [(role, content) for role, content, _ in run["history"]] == [
        ("user", "hello"),
        ("assistant", "received: hello"),
        ("user", '!tool lookup_order {"order_id": "42"}'),
        ("function_call", run["tool_call"]["response"][0][0]["content"]),
        ("function", "shipped"),
        ("assistant", "tool lookup_order said: shipped"),
    ]
    assert run["history"][0][2] == "Ann"
    assert run["history_page"] == ["received: hello", '!tool lookup_order {"order_id": "42"}']


def test_suggestions_and_deletes(run: dict[str, Any]) -> None:
    assert run["suggestions"] == []
    assert run["history_after_delete"] == []
    assert run["after_delete"] == [run["ids"][0]]


def test_errors_reach_the_sdk_as_api_errors(run: dict[str, Any]) -> None:
    errors = run["errors"]
    assert errors["get_unknown"] == {"status": 404, "body": {"detail": "Session not found"}}
    assert errors["chat_unknown"]["status"] == 404
    assert errors["bad_key"] == {"status": 401, "body": {"detail": "Invalid API key"}}
    assert errors["bad_role"]["status"] == 422
