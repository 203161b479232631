"""Run-time routes on SQLite and PostgreSQL: the audit log, origins, `explain`, moving open
threads, and the admin's changes passed on to the services (sessions' situation, Engage's
metadata) through their emulators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from bots.admin.actions import Admin, AdminError, NotFound, ServiceFailed, data_updates
from core.agents.emulators import engage as engage_emulator
from core.agents.emulators import sessions as sessions_emulator
from core.config import Config, parse_config
from core.model import Conversation, ThreadRef
from core.routing import RouteError, Router, check_route, parse_thread
from core.store import Store
from tests.servers import run_asgi

KEY = "admin-test-key"
AGENT_ID = "9bb48ef4-b6f7-4dd8-a5ea-ab775e2e8d1b"
FAST = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.001, "max_backoff_s": 0.01}


def config(
    store_url: str, sessions_url: str = "http://127.0.0.1:9", engage_url: str = ""
) -> Config:
    raw: dict[str, Any] = {
        "default_agent": "demo",
        "store": {"url": store_url},
        "agents": {
            "demo": {"service": "local"},
            "team": {"service": "local"},
            "chan": {"service": "local"},
            "coach": {
                "service": "sessions",
                "base_url": sessions_url,
                "api_key_env": "ADMIN_TEST_KEY",
                "agent_id": AGENT_ID,
                "situation": "You are a coach.",
                **FAST,
            },
            "pensions": {
                "service": "engage-conversations",
                "base_url": engage_url or "http://127.0.0.1:9",
                "api_key_env": "ADMIN_TEST_KEY",
                "org_id_env": "ADMIN_TEST_ORG",
                "agent": "pensions-questions-latest",
                **FAST,
            },
        },
        "routes": [
            {"source": "slack", "workspace": "T1", "agent": "team"},
            {"source": "slack", "workspace": "T1", "channel": "C9", "agent": "chan"},
        ],
    }
    return parse_config(raw, "test.toml")


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_TEST_KEY", KEY)
    monkeypatch.setenv("ADMIN_TEST_ORG", "org-1")


@pytest.fixture(scope="module")
def sessions_url() -> Iterator[str]:
    with run_asgi(sessions_emulator.create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture(scope="module")
def engage_url() -> Iterator[str]:
    with run_asgi(engage_emulator.create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
async def admin(
    store_url: str, sessions_url: str, engage_url: str, keys: None
) -> AsyncIterator[Admin]:
    httpx.post(f"{engage_url}/_emulator/reset").raise_for_status()
    cfg = config(store_url, sessions_url, engage_url)
    store = Store(store_url)
    await store.migrate()
    made = Admin(cfg, store, Router(cfg, store))
    yield made
    await made.aclose()
    await store.close()


async def opened(admin: Admin, thread: ThreadRef, agent: str, **data: Any) -> Conversation:
    """A conversation as the bridge opens one; stateful services get theirs made too."""
    c = await admin.store.open_conversation(thread, agent, data, "U1")
    service = admin.service(agent)
    assert service is not None
    c.remote_id = await service.open(c)
    if c.remote_id is not None:
        await admin.store.save_remote(c)
    return c


async def test_changes_are_logged_with_who_and_old_to_new(admin: Admin) -> None:
    store = admin.store
    first = await admin.set_route("slack", "T1", None, "demo", situation="Be brief.", by="ann")
    assert (first.change.old_agent, first.change.new_agent) == (None, "demo")
    second = await admin.set_route("slack", "T1", "", "chan", by="bob")
    assert (second.change.old_agent, second.change.old_situation) == ("demo", "Be brief.")
    assert (second.change.new_agent, second.change.new_situation) == ("chan", None)
    await admin.set_route("discord", "G1", "C1", "team", by="slack:U1")
    removed = await admin.unset_route("slack", "T1", None, by="cy")
    assert (removed.change.action, removed.change.old_agent, removed.change.new_agent) == (
        "unset",
        "chan",
        None,
    )
    assert await store.delete_route("slack", "T1", "") is False  # nothing left: no entry

    log = await store.route_changes()
    assert [(c.action, c.who, c.source, c.workspace, c.channel) for c in log] == [
        ("unset", "cy", "slack", "T1", None),
        ("set", "slack:U1", "discord", "G1", "C1"),
        ("set", "bob", "slack", "T1", None),
        ("set", "ann", "slack", "T1", None),
    ]
    assert [c.id for c in log] == sorted((c.id for c in log), reverse=True)
    assert log[0].at >= log[-1].at and log[-1].at.tzinfo is not None
    assert [c.who for c in await store.route_changes(limit=2, offset=1)] == ["slack:U1", "bob"]
    assert await store.count_route_changes() == 4

    # the in-chat commands' call still works, and is logged too
    await store.set_route("telegram", "-", "-100", "team", set_by="telegram:7")
    assert (await store.route_changes(limit=1))[0].who == "telegram:7"


async def test_routes_show_origin_and_admin_routes_override_the_file(admin: Admin) -> None:
    router = admin.router
    await admin.set_route("slack", "T1", None, "demo", by="ann")
    listed = await router.routes()
    assert [(r.tier, r.agent, r.origin) for r in listed] == [
        ("channel", "chan", "config"),
        ("workspace", "demo", "admin"),
        ("workspace", "team", "config"),
    ]
    admin_route = listed[1]
    assert admin_route.set_by == "ann" and admin_route.set_at is not None
    assert {r.agent for r in await router.overridden()} == {"team"}
    assert (await router.agent_for(ThreadRef("slack", "T1", "C1", "1"))).agent == "demo"

    # another process's change shows up within cache_s
    other = Router(admin.config, admin.store)
    await other.routes()
    await admin.store.set_route("slack", "T1", "", "chan", set_by="elsewhere")
    other.cache_s = 0.0
    assert (await other.agent_for(ThreadRef("slack", "T1", "C1", "1"))).agent == "chan"


async def test_explain_names_each_tier_and_the_winner(admin: Admin) -> None:
    thread = parse_thread("slack:T1/C9/1700.1")
    steps = await admin.router.explain(thread)
    assert [(s.tier, s.agent, s.chosen) for s in steps] == [
        ("channel", "chan", True),
        ("workspace", "team", False),
        ("source", None, False),
        ("default", "demo", False),
    ]
    assert steps[1].note == "the channel route is more specific"
    await admin.set_route("slack", "T1", "C9", "demo", by="ann")
    steps = await admin.router.explain(thread)
    assert [(s.tier, s.agent, s.route and s.route.origin, s.chosen) for s in steps[:2]] == [
        ("channel", "demo", "admin", True),
        ("channel", "chan", "config", False),
    ]
    assert "same scope" in steps[1].note
    nothing = await admin.router.explain(parse_thread("discord:G"))
    assert [s.chosen for s in nothing] == [False, False, False, True]
    assert nothing[-1].agent == "demo"
    for bad in ("slack", "nosuch:T1/C1/1", "slack:", "slack:T1//1"):
        with pytest.raises(ValueError):
            parse_thread(bad)


async def test_bad_routes_are_refused_with_a_reason(admin: Admin) -> None:
    cases = [
        (("pager", None, None, "demo"), "unknown source 'pager'"),
        (("slack", "T1", None, "ghost"), "unknown agent 'ghost'"),
        (("slack", None, "C1", "demo"), "needs its workspace"),
        (("discord", None, "C1", "demo"), "guild id"),
        (("slack", "T/1", None, "demo"), "without '/'"),
        (("slack", " ", None, "demo"), "workspace"),
        (("slack", "T1", "C\x00", "demo"), "channel"),
    ]
    for args, reason in cases:
        with pytest.raises(RouteError, match=reason):
            check_route(admin.config, *args)
        with pytest.raises(AdminError, match=reason):
            await admin.set_route(*args, by="x")
    check_route(admin.config, "telegram", None, "-100", "demo")  # no workspace needed there
    with pytest.raises(NotFound, match="in the config file"):
        await admin.unset_route("slack", "T1", None, by="x")
    with pytest.raises(NotFound, match="no run-time route"):
        await admin.unset_route("web", None, None, by="x")
    assert await admin.store.count_route_changes() == 0


async def test_move_open_ends_the_scopes_other_threads_and_links_the_next(admin: Admin) -> None:
    store = admin.store
    await store.set_route("slack", "T1", "C2", "chan", set_by="ann")  # a narrower admin route
    c1 = await opened(admin, ThreadRef("slack", "T1", "C1", "1"), "team")
    c2 = await opened(admin, ThreadRef("slack", "T1", "C2", "2"), "chan")
    c9 = await opened(admin, ThreadRef("slack", "T1", "C9", "9"), "chan")  # the file's C9 route
    same = await opened(admin, ThreadRef("slack", "T1", "C3", "3"), "demo")
    elsewhere = await opened(admin, ThreadRef("slack", "T2", "C1", "4"), "team")
    assert [c.id for c in await store.open_conversations("slack", "T1")] == [
        c1.id,
        c2.id,
        c9.id,
        same.id,
    ]
    assert [c.id for c in await store.open_conversations("slack", "T1", "C1", "team")] == [c1.id]

    outcome = await admin.set_route("slack", "T1", None, "demo", move_open=True, by="ann")
    assert outcome.change.moved == 1
    assert (await store.route_changes(limit=1))[0].moved == 1
    moved = await store.get_conversation(c1.id)
    assert moved is not None and moved.status == "closed"
    assert moved.data["moved_to_agent"] == "demo" and moved.data["moved_by"] == "ann"
    assert await store.conversation_for_thread(c1.thread_key) is None
    for kept in (c2, c9, same, elsewhere):
        linked = await store.conversation_for_thread(kept.thread_key)
        assert linked is not None and linked.id == kept.id

    after = await store.open_conversation(ThreadRef.parse(c1.thread_key), "demo", {"x": 1}, "U1")
    assert after.data == {"x": 1, "previous_conversation_id": c1.id}
    stored = await store.get_conversation(after.id)
    assert stored is not None and stored.data["previous_conversation_id"] == c1.id
    await store.end_thread(c1.thread_key)  # a later /new starts with no link
    again = await store.open_conversation(ThreadRef.parse(c1.thread_key), "demo", {}, "U1")
    assert "previous_conversation_id" not in again.data
    history = await store.thread_conversations(c1.thread_key)
    assert [c.id for c in history] == [c1.id, after.id, again.id]


async def test_a_new_situation_reaches_the_open_sessions_it_governs(
    admin: Admin, sessions_url: str
) -> None:
    here = await opened(admin, ThreadRef("slack", "T5", "C1", "1"), "coach")
    narrower = await opened(admin, ThreadRef("slack", "T5", "C2", "2"), "coach")
    other_agent = await opened(admin, ThreadRef("slack", "T5", "C3", "3"), "demo")
    await admin.set_route("slack", "T5", "C2", "coach", situation="Channel two.", by="ann")

    outcome = await admin.set_route("slack", "T5", None, "coach", situation="Team five.", by="ann")
    assert (outcome.situations_updated, outcome.situation_failures) == (1, [])

    def situation(c: Conversation) -> str:
        reply = httpx.get(
            f"{sessions_url}/sessions/{c.remote_id}", headers={"Authorization": f"Bearer {KEY}"}
        )
        reply.raise_for_status()
        return str(reply.json()["situation"])

    assert situation(here) == "Team five."
    assert situation(narrower) == "Channel two."
    assert other_agent.remote_id is None

    same = await admin.set_route("slack", "T5", None, "coach", situation="Team five.", by="ann")
    assert same.situations_updated == 0  # nothing changed: no calls
    removed = await admin.unset_route("slack", "T5", None, by="ann")
    assert removed.situations_updated == 1
    assert situation(here) == "You are a coach."  # back to the agent's own


async def test_metadata_updates_reach_engage_first(admin: Admin, engage_url: str) -> None:
    c = await opened(admin, ThreadRef("web", "-", "-", "m1"), "pensions", team="A", old="x")
    updated, mirrored = await admin.update_conversation(
        c.id, data=data_updates(["team=B", "old=", "case=42"]), source="imported"
    )
    assert mirrored is True
    assert updated.data == {"team": "B", "case": "42"} and updated.source == "imported"
    headers = {"X-Api-Key": KEY, "X-Org-Id": "org-1"}
    remote = httpx.get(f"{engage_url}/v1/conversations/{c.remote_id}", headers=headers).json()
    assert (remote["data"], remote["source"]) == ({"team": "B", "case": "42"}, "imported")

    fault = {"status": 503, "times": 5, "path_contains": "/v1/conversations/"}
    httpx.post(f"{engage_url}/_emulator/faults", json=fault).raise_for_status()
    with pytest.raises(ServiceFailed, match="nothing was changed"):
        await admin.update_conversation(c.id, data={"team": "C"})
    kept = await admin.store.get_conversation(c.id)
    assert kept is not None and kept.data["team"] == "B"

    local = await opened(admin, ThreadRef("web", "-", "-", "m2"), "demo")
    changed, mirrored = await admin.update_conversation(local.id, data={"k": "v"})
    assert (changed.data, mirrored) == ({"k": "v"}, False)
    for bad, reason in (
        ({}, "nothing to change"),
        ({"source": "has space"}, "source"),
        ({"data": {"": 1}}, "key"),
        ({"data": {"k": {"deep": ["a\x00"]}}}, "NUL"),
        ({"data": {"\ud800": "lone surrogate"}}, "invalid Unicode"),
        ({"data": {"k": float("nan")}}, "not a JSON number"),
    ):
        with pytest.raises(AdminError, match=reason):
            await admin.update_conversation(local.id, **bad)
    with pytest.raises(NotFound):
        await admin.update_conversation("nope", source="x")
    with pytest.raises(NotFound):
        await admin.update_conversation("a\x00", source="x")
    with pytest.raises(AdminError, match="NUL"):
        await admin.set_route("web", None, None, "demo", situation="a\x00", by="x")
    with pytest.raises(AdminError, match="who made the change"):
        await admin.set_route("web", None, None, "demo", by="")
    with pytest.raises(AdminError, match="KEY=VALUE"):
        data_updates(["novalue"])
