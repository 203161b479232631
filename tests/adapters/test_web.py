"""The web chat and the admin API, served by the real app on loopback and spoken to over HTTP."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from bots.app import App
from bots.http import create_app
from core.config import parse_config
from tests.servers import run_asgi

TOKEN = "s3cret-admin-token-value"


@dataclass
class Served:
    """A running app and an HTTP client pointed at it."""

    url: str
    app: App
    client: httpx.Client

    def post(self, thread: str, text: str, **extra: Any) -> httpx.Response:
        return self.client.post(f"/api/chat/{thread}", json={"text": text, **extra})

    def messages(self, thread: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/api/chat/{thread}/messages")
        assert response.status_code == 200, response.text
        body: list[dict[str, Any]] = response.json()
        return body

    def wait_replies(self, thread: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll the thread's messages until it holds `count` agent replies, all turns done."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(thread)
            agent = [m for m in found if m["role"] == "agent"]
            if len(agent) >= count and all(m["status"] == "done" for m in found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} replies in {thread!r} in time: {found}")
            time.sleep(0.02)

    def search(self, **params: Any) -> dict[str, Any]:
        response = self.client.get("/api/conversations", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """Start the real app (web chat, demo agent, SQLite in tmp_path); stop it after the test."""
    monkeypatch.delenv("THREADBRIDGE_ADMIN_TOKEN", raising=False)
    with contextlib.ExitStack() as stack:

        def start(**bridge: Any) -> Served:
            raw: dict[str, Any] = {
                "default_agent": "demo",
                "store": {"url": f"sqlite+aiosqlite:///{tmp_path}/tb.db"},
                "bridge": {"poll_s": 0.05, "lease_s": 5, **bridge},
                "agents": {"demo": {"service": "local"}},
                "web": {"enabled": True},
            }
            app = App(parse_config(raw, "test.toml"))
            url = stack.enter_context(run_asgi(create_app(app)))
            client = stack.enter_context(httpx.Client(base_url=url, timeout=10))
            return Served(url, app, client)

        yield start


@pytest.fixture
def web(serve: Serve) -> Served:
    return serve()


@pytest.fixture(scope="module")
def untouched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One app shared by the tests of refused input: nothing they send may be stored."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("THREADBRIDGE_ADMIN_TOKEN", raising=False)
        db = tmp_path_factory.mktemp("untouched") / "tb.db"
        raw: dict[str, Any] = {
            "store": {"url": f"sqlite+aiosqlite:///{db}"},
            "agents": {"demo": {"service": "local"}},
            "web": {"enabled": True},
        }
        app = App(parse_config(raw, "test.toml"))
        with run_asgi(create_app(app)) as url, httpx.Client(base_url=url, timeout=10) as client:
            yield Served(url, app, client)


def assert_nothing_stored(web: Served, thread: str) -> None:
    assert web.messages(thread) == []
    assert web.search()["total"] == 0


# -- the chat API ---------------------------------------------------------------------------


def test_a_posted_message_gets_the_agents_reply(web: Served) -> None:
    response = web.post("tab1", "hello there", user="Ann")
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    assert isinstance(event_id, str) and event_id
    # At once, before any reply: the message shows (pending or done).
    first = web.messages("tab1")
    assert [(m["role"], m["text"]) for m in first][:1] == [("user", "hello there")]

    found = web.wait_replies("tab1", 1)
    assert [m["role"] for m in found] == ["user", "agent"]
    assert found[0]["text"] == "hello there"
    assert "You said: “hello there”" in found[1]["text"]
    assert "**web** conversation" in found[1]["text"]
    stamps = [datetime.fromisoformat(m["created"]) for m in found]
    assert all(s.tzinfo is not None for s in stamps)
    assert stamps == sorted(stamps)

    web.post("tab1", "and again")
    found = web.wait_replies("tab1", 2)
    assert [m["role"] for m in found] == ["user", "agent", "user", "agent"]
    assert "message 2 of a **web** conversation" in found[3]["text"]

    items = web.search(source="web")["items"]
    assert len(items) == 1
    assert items[0]["data"]["user_name"] == "Ann"
    assert items[0]["thread_key"] == "web:-/-/tab1"


def test_any_unicode_text_round_trips(web: Served) -> None:
    text = "Grüße, 世界 🎉 — tab\tand\nnew line"
    assert web.post("uni", text, user="Zoë").status_code == 202
    found = web.wait_replies("uni", 1)
    assert found[0]["text"] == text
    assert text in found[1]["text"]


def test_two_threads_are_two_conversations(web: Served) -> None:
    assert web.post("left", "from the left").status_code == 202
    assert web.post("right", "from the right").status_code == 202
    left = web.wait_replies("left", 1)
    right = web.wait_replies("right", 1)
    assert "from the left" in left[1]["text"] and "from the right" not in left[1]["text"]
    assert "from the right" in right[1]["text"]
    found = web.search(source="web")
    assert found["total"] == 2
    assert {i["thread_key"] for i in found["items"]} == {"web:-/-/left", "web:-/-/right"}
    assert len({i["id"] for i in found["items"]}) == 2


def test_a_repeated_client_id_is_accepted_once(web: Served) -> None:
    first = web.post("t", "only once", id="msg-1")
    again = web.post("t", "only once", id="msg-1")
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["event_id"] == again.json()["event_id"]
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    # A later message in the same thread is answered after anything queued before it.
    assert web.post("t", "next one", id="msg-2").status_code == 202
    found = web.wait_replies("t", 2)
    assert [m["role"] for m in found] == ["user", "agent", "user", "agent"]
    assert [m["text"] for m in found if m["role"] == "user"] == ["only once", "next one"]
    # Client ids are per thread: the same id in another tab is another message.
    other = web.post("t2", "only once", id="msg-1")
    assert other.status_code == 202 and other.json()["duplicate"] is False
    assert len(web.wait_replies("t2", 1)) == 2


@pytest.mark.parametrize("text", ["", " ", "   \n\t  ", "\u00a0\u2003"])
def test_an_empty_message_is_refused_and_nothing_is_kept(untouched: Served, text: str) -> None:
    response = untouched.post("t", text)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "empty" in detail
    assert_nothing_stored(untouched, "t")


def test_a_message_over_the_limit_is_refused_naming_the_limit(serve: Serve) -> None:
    web = serve(max_message_chars=100)
    response = web.post("t", "x" * 101)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert "limit is 100" in detail and "101 characters" in detail
    assert_nothing_stored(web, "t")
    assert web.post("t", "y" * 100).status_code == 202  # at the limit is fine
    assert len(web.wait_replies("t", 1)) == 2


def test_the_default_limit_is_16000_characters(web: Served) -> None:
    response = web.post("t", "z" * 16_001)
    assert response.status_code == 422
    assert "16,000" in response.json()["detail"]
    assert_nothing_stored(web, "t")


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(b"{not json", {"content-type": "application/json"}, id="invalid-json"),
        pytest.param(b'{"text": "hi",}', {"content-type": "application/json"}, id="trailing-comma"),
        pytest.param(b"", {"content-type": "application/json"}, id="no-body"),
        pytest.param(b"null", {"content-type": "application/json"}, id="null"),
        pytest.param(b"[]", {"content-type": "application/json"}, id="array"),
        pytest.param(b'"hi"', {"content-type": "application/json"}, id="string"),
        pytest.param(b'{"user": "ann"}', {"content-type": "application/json"}, id="no-text"),
        pytest.param(b'{"text": 5}', {"content-type": "application/json"}, id="text-number"),
        pytest.param(b'{"text": null}', {"content-type": "application/json"}, id="text-null"),
        pytest.param(b'{"text": ["a"]}', {"content-type": "application/json"}, id="text-list"),
        pytest.param(b'{"text": "hi", "user": 7}', {"content-type": "application/json"}, id="user"),
        pytest.param(b'{"text": "hi", "user": ""}', {"content-type": "application/json"}, id="u0"),
        pytest.param(b'{"text": "hi", "extra": 1}', {"content-type": "application/json"}, id="x"),
        pytest.param(b'{"text": "hi", "id": "a.b"}', {"content-type": "application/json"}, id="id"),
        pytest.param(b"text=hi", {"content-type": "application/x-www-form-urlencoded"}, id="form"),
        pytest.param(b"\xff\xfe\x00", {"content-type": "application/json"}, id="not-utf8"),
        pytest.param(b'{"text": "\xe9"}', {"content-type": "application/json"}, id="latin1"),
        pytest.param(b'{"text": "\\ud800"}', {"content-type": "application/json"}, id="surrogate"),
    ],
)
def test_a_bad_body_is_422_with_the_reason(
    untouched: Served, body: bytes, headers: dict[str, str]
) -> None:
    response = untouched.client.post("/api/chat/t", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert_nothing_stored(untouched, "t")


@pytest.mark.parametrize("thread", ["a.b", "x" * 65, "sp ace", "é", "a~b"])
def test_a_bad_thread_id_is_422(untouched: Served, thread: str) -> None:
    posted = untouched.client.post(f"/api/chat/{thread}", json={"text": "hi"})
    assert posted.status_code == 422, posted.text
    assert posted.json()["detail"]
    for path in (f"/api/chat/{thread}/messages", f"/api/chat/{thread}/events"):
        got = untouched.client.get(path)
        assert got.status_code == 422, (path, got.text)
    assert untouched.search()["total"] == 0


def test_the_longest_thread_id_is_fine(web: Served) -> None:
    thread = "A-z_9" * 12 + "abcd"  # 64 characters
    assert web.post(thread, "hi").status_code == 202
    assert len(web.wait_replies(thread, 1)) == 2


def test_the_page_has_a_new_conversation_button(web: Served) -> None:
    response = web.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "New conversation" in response.text
    assert "/api/chat/" in response.text


def test_the_event_stream_says_changed_after_a_post(web: Served) -> None:
    timeout = httpx.Timeout(5.0)
    with web.client.stream("GET", "/api/chat/live/events", timeout=timeout) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines) == "retry: 2000"  # the page's queue is registered from here on
        assert web.post("live", "ping").status_code == 202
        seen: list[str] = []
        for line in lines:
            seen.append(line)
            if line == "event: changed":
                break
        assert "event: changed" in seen
    assert len(web.wait_replies("live", 1)) == 2


# -- the admin API ---------------------------------------------------------------------------


def _three_conversations(web: Served) -> list[str]:
    """Threads t0, t1, t2 opened one after the other; their conversation ids, oldest first."""
    for n, word in enumerate(["apple", "banana", "cherry"]):
        assert web.post(f"t{n}", f"I like {word}").status_code == 202
        web.wait_replies(f"t{n}", 1)
    items = web.search(source="web", reversed="false")["items"]
    assert [i["thread_key"] for i in items] == ["web:-/-/t0", "web:-/-/t1", "web:-/-/t2"]
    return [i["id"] for i in items]


def test_search_pages_newest_first_and_reverses(web: Served) -> None:
    ids = _three_conversations(web)
    page = web.search(source="web", limit=2)
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [i["id"] for i in page["items"]] == [ids[2], ids[1]]
    rest = web.search(source="web", limit=2, offset=2)
    assert rest["total"] == 3
    assert [i["id"] for i in rest["items"]] == [ids[0]]
    assert web.search(source="web", offset=5)["items"] == []
    oldest = web.search(source="web", reversed="false")
    assert [i["id"] for i in oldest["items"]] == ids
    item = oldest["items"][0]
    assert (item["source"], item["agent"], item["status"]) == ("web", "demo", "open")
    assert web.search(source="slack")["total"] == 0
    assert web.search(status="open")["total"] == 3
    assert web.search(agent="demo", user="web user")["total"] == 3


def test_search_by_text_and_time(web: Served) -> None:
    ids = _three_conversations(web)
    found = web.search(text="BANANA")
    assert (found["total"], [i["id"] for i in found["items"]]) == (1, [ids[1]])
    assert web.search(text="100%_sure")["total"] == 0  # LIKE wildcards are taken literally
    now = datetime.now(UTC)
    hour = timedelta(hours=1)
    assert web.search(since=(now - hour).isoformat())["total"] == 3
    assert web.search(since=(now + hour).isoformat())["total"] == 0
    assert web.search(until=(now - hour).isoformat())["total"] == 0
    assert web.search(until=(now + hour).isoformat())["total"] == 3
    assert web.search(since=(now - timedelta(days=1)).date().isoformat())["total"] == 3


def test_search_times_with_an_offset_mean_the_same_instant(web: Served) -> None:
    _three_conversations(web)
    now = datetime.now(UTC)
    east, west = timezone(timedelta(hours=5)), timezone(timedelta(hours=-5))
    hour = timedelta(hours=1)
    # An hour ago and an hour ahead, written in other zones: the same instants as above.
    assert web.search(since=(now - hour).astimezone(east).isoformat())["total"] == 3
    assert web.search(until=(now + hour).astimezone(west).isoformat())["total"] == 3
    assert web.search(since=(now + hour).astimezone(west).isoformat())["total"] == 0


@pytest.mark.parametrize(
    ("params", "total"),
    [
        ({"since": "0001-01-01T00:00:00+05:00"}, 1),
        ({"until": "0001-01-01T00:00:00-05:00"}, 0),
        ({"until": "9999-12-31T23:59:59-05:00"}, 1),
        ({"since": "9999-12-31T23:59:59-05:00"}, 0),
        ({"since": "0001-01-01"}, 1),
        ({"since": "0"}, 1),
    ],
)
def test_times_at_the_ends_of_the_calendar_are_fine(
    web: Served, params: dict[str, str], total: int
) -> None:
    assert web.post("t", "hi").status_code == 202
    web.wait_replies("t", 1)
    assert web.search(**params)["total"] == total


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"limit": 500},
        {"limit": 201},
        {"limit": 0},
        {"limit": "ten"},
        {"offset": -1},
        {"since": "not-a-date"},
        {"until": "2024-13-45"},
        {"reversed": "sideways"},
        {"text": ""},
        {"text": "x" * 501},
    ],
)
def test_bad_search_parameters_are_422(untouched: Served, params: dict[str, Any]) -> None:
    response = untouched.client.get("/api/conversations", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_the_limit_may_be_200(web: Served) -> None:
    assert web.search(limit=200)["limit"] == 200


def test_show_returns_the_transcript_and_404s_an_unknown_id(web: Served) -> None:
    assert web.post("t", "show me", user="Bo").status_code == 202
    web.wait_replies("t", 1)
    (item,) = web.search(source="web")["items"]
    response = web.client.get(f"/api/conversations/{item['id']}")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["source"], body["agent"]) == (item["id"], "web", "demo")
    assert [m["role"] for m in body["messages"]] == ["user", "agent"]
    assert body["messages"][0]["content"] == "show me"
    assert body["messages"][0]["author_name"] == "Bo"
    assert "You said: “show me”" in body["messages"][1]["content"]
    assert body["failures"] == []

    missing = web.client.get("/api/conversations/no-such-id")
    assert missing.status_code == 404
    assert "no-such-id" in missing.json()["detail"]


def test_the_admin_token_guards_the_admin_api_and_never_leaks(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THREADBRIDGE_ADMIN_TOKEN", TOKEN)
    web = serve()
    bodies: list[str] = []

    def call(path: str, **headers: str) -> httpx.Response:
        response = web.client.get(path, headers=headers)
        bodies.append(response.text)
        bodies.extend(response.headers.values())
        return response

    # The chat itself is open to anyone.
    posted = web.post("t", "hi")
    assert posted.status_code == 202
    bodies.append(posted.text)
    bodies.append(str(web.wait_replies("t", 1)))

    for path in ("/api/conversations", "/api/conversations/whatever"):
        denied = call(path)
        assert denied.status_code == 401
        assert "Bearer" in denied.json()["detail"]
        assert call(path, authorization="Bearer wrong").status_code == 401
        assert call(path, authorization=f"Basic {TOKEN}").status_code == 401
        assert call(path, authorization=TOKEN).status_code == 401

    allowed = call("/api/conversations", authorization=f"Bearer {TOKEN}")
    assert allowed.status_code == 200
    (item,) = allowed.json()["items"]
    shown = call(f"/api/conversations/{item['id']}", authorization=f"Bearer {TOKEN}")
    assert shown.status_code == 200
    assert call("/api/conversations/nope", authorization=f"Bearer {TOKEN}").status_code == 404
    bad = call("/api/conversations?limit=500", authorization=f"Bearer {TOKEN}")
    assert bad.status_code == 422
    assert call("/healthz").status_code == 200
    assert call("/").status_code == 200
    assert call("/openapi.json").status_code == 200
    assert not [b for b in bodies if TOKEN in b]


def test_without_a_token_the_admin_api_answers_loopback(web: Served) -> None:
    assert web.client.get("/api/conversations").status_code == 200
