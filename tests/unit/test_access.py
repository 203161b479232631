"""Per-route access rules and per-user limits (core/access.py): the rules alone, the config
errors, and the bridge on SQLite and PostgreSQL refusing, telling once and counting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from core.access import OVER_BUDGET, OVER_RATE, REFUSED_NOTICE, is_direct, policy_for
from core.config import parse_config
from core.errors import ConfigError
from core.model import Author, Inbound, ThreadRef
from core.routing import Route, Router
from core.sql import inbox
from core.store import Store
from tests.bridgekit import (
    RecordingChannel,
    eventually,
    inbound,
    make_config,
    start_bridge,
    stop_bridge,
)

AGENTS = {"demo": {"service": "local"}}


def routes_of(*routes: dict[str, Any]) -> list[Route]:
    """The config file's routes, as the router reads them (it needs no store for that)."""
    config = parse_config({"agents": AGENTS, "routes": list(routes)}, "t.toml")
    return Router(config, None).file_routes()  # type: ignore[arg-type]


def slack(channel: str, workspace: str = "T1") -> ThreadRef:
    return ThreadRef("slack", workspace, channel, "1700000000.000100")


# -- the rules -------------------------------------------------------------------------------


def test_deny_adds_up_and_the_most_specific_allow_decides() -> None:
    routes = routes_of(
        {"source": "slack", "agent": "demo", "deny_users": ["U_BAD"], "allow_users": ["U1"]},
        {"source": "slack", "workspace": "T1", "agent": "demo", "deny_users": ["U_WORSE"]},
        {
            "source": "slack",
            "workspace": "T1",
            "channel": "C_OPEN",
            "agent": "demo",
            "allow_users": ["U1", "U2", "U_BAD"],
        },
    )
    general = policy_for(routes, slack("C_OTHER"))
    assert general.refuses("U1") is None
    assert general.refuses("U2") == "denied: not in the route's allow_users"
    assert general.refuses("U_WORSE") == "denied: in the route's deny_users"
    opened = policy_for(routes, slack("C_OPEN"))
    assert opened.refuses("U2") is None  # the channel route's allow_users is the one that holds
    assert opened.refuses("U_BAD") == "denied: in the route's deny_users"  # deny wins over allow
    assert opened.refuses("U_WORSE") is not None  # the workspace's deny list still applies
    elsewhere = policy_for(routes, slack("C1", workspace="T2"))
    assert elsewhere.refuses("U_WORSE") == "denied: not in the route's allow_users"
    assert policy_for(routes, ThreadRef("web", "-", "-", "x")).refuses("anyone") is None


def test_allow_channels_leaves_out_other_channels_but_not_dms_or_routed_channels() -> None:
    routes = routes_of(
        {"source": "slack", "workspace": "T1", "agent": "demo", "allow_channels": ["C1"]},
        {"source": "slack", "workspace": "T1", "channel": "C9", "agent": "demo"},
        {"source": "telegram", "agent": "demo", "allow_channels": [-100123]},
    )
    for thread, open_ in (
        (slack("C1"), True),
        (slack("C2"), False),
        (slack("C9"), True),  # its own channel route names it
        (slack("D0DM"), True),  # a direct message is not a channel
        (slack("C2", workspace="T2"), True),  # another workspace: no rule
        (ThreadRef("telegram", "-", "-100123", "5"), True),
        (ThreadRef("telegram", "-", "-100999", "5"), False),
        (ThreadRef("telegram", "-", "1001", "1001"), True),  # a private chat
    ):
        assert policy_for(routes, thread).channel_open(thread) is open_, thread


def test_direct_messages_by_platform() -> None:
    assert is_direct(slack("D123"))
    assert not is_direct(slack("C123"))
    assert is_direct(ThreadRef("discord", "@me", "5", "5"))
    assert not is_direct(ThreadRef("discord", "42", "5", "6"))
    assert not is_direct(ThreadRef("telegram", "-", "-1001", "1"))
    assert is_direct(ThreadRef("web", "-", "-", "t"))


def test_the_refused_notice_comes_from_the_most_specific_route_that_sets_it() -> None:
    routes = routes_of(
        {"source": "slack", "agent": "demo", "deny_users": ["U9"], "refused_notice": ""},
        {"source": "slack", "workspace": "T1", "agent": "demo", "refused_notice": "No."},
    )
    assert policy_for(routes, slack("C1")).refused_notice == "No."
    assert policy_for(routes, slack("C1", workspace="T2")).refused_notice == ""
    assert policy_for([], slack("C1")).refused_notice == REFUSED_NOTICE


# -- config errors ---------------------------------------------------------------------------


def test_telegram_ids_may_be_integers() -> None:
    config = parse_config(
        {"agents": AGENTS, "routes": [{"source": "telegram", "agent": "demo", "deny_users": [7]}]},
        "t.toml",
    )
    assert config.routes[0].deny_users == ["7"]


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        (
            {
                "routes": [
                    {
                        "source": "slack",
                        "workspace": "T1",
                        "channel": "C1",
                        "agent": "demo",
                        "allow_channels": ["C2"],
                    }
                ]
            },
            "routes[0].allow_channels",
            "set it on the route without channel",
        ),
        (
            {"routes": [{"source": "slack", "agent": "demo", "allow_users": ["U1", "U 2"]}]},
            "routes[0].allow_users[1]",
            "should match pattern",
        ),
        ({"limits": {"per_user_per_minute": 0}}, "limits.per_user_per_minute", "greater than"),
        ({"limits": {"per_user_per_day": 5, "perday": 5}}, "limits.perday", "check its spelling"),
        (
            {"limits": {"rate_notice": "wait {minutes}"}},
            "limits.rate_notice",
            "use only the placeholders {limit}, {wait} and {at}",
        ),
    ],
)
def test_config_errors_name_the_file_the_key_and_the_fix(
    raw: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"agents": AGENTS, **raw}, "bad.toml")
    assert caught.value.file == "bad.toml"
    assert caught.value.key == key
    assert words in str(caught.value)


# -- the bridge, on both stores --------------------------------------------------------------


async def inbox_rows(store: Store) -> list[Any]:
    query = sa.select(inbox.c.event_id, inbox.c.status, inbox.c.error).order_by(inbox.c.id)
    return await store.read(lambda conn: list(conn.execute(query).all()))


async def settled(store: Store, count: int) -> list[Any]:
    async def done() -> list[Any] | None:
        rows = await inbox_rows(store)
        finished = [r for r in rows if r.status not in ("pending", "working")]
        return rows if len(finished) >= count else None

    rows: list[Any] = await eventually(done)
    return rows


async def test_a_denied_user_is_told_once_per_thread_and_never_reaches_the_agent(
    store_url: str,
) -> None:
    channel = RecordingChannel()
    routes = [{"source": "web", "agent": "demo", "deny_users": ["mallory"]}]
    bridge = await start_bridge(make_config(store_url, routes=routes), channel)
    for n in range(3):
        await bridge.submit(inbound("a", f"let me in {n}", user="mallory"))
    await bridge.submit(inbound("b", "and here?", user="mallory"))
    await bridge.submit(inbound("a", "hello", user="ann"))
    rows = await settled(bridge.store, 5)
    await channel.wait_for(3)
    await asyncio.sleep(0.2)  # nothing more is posted
    assert channel.texts("a") == [REFUSED_NOTICE, channel.texts("a")[1]]
    assert "hello" in channel.texts("a")[1]
    assert channel.texts("b") == [REFUSED_NOTICE]
    assert [r.status for r in rows] == ["refused"] * 4 + ["done"]
    assert rows[0].error == "denied: in the route's deny_users"
    # Admins see what was refused in the conversation; the agent never did.
    conversation = await bridge.store.conversation_for_thread("web:-/-/a")
    assert conversation is not None
    stored = [(m.role, m.kind) for m in await bridge.store.history(conversation.id)]
    assert stored == [("user", "refused"), ("system", "notice")] + [("user", "refused")] * 2 + [
        ("user", "message"),
        ("agent", "message"),
    ]
    assert "message 1 of" in channel.texts("a")[1]  # refused messages are not in the history
    await stop_bridge(bridge)


async def test_the_rate_limit_refuses_tells_once_and_ignores_redeliveries(store_url: str) -> None:
    channel = RecordingChannel()
    config = make_config(store_url, limits={"per_user_per_minute": 2})
    bridge = await start_bridge(config, channel)
    first = await bridge.submit(inbound("a", "one", user="ann", event="e1"))
    again = await bridge.submit(inbound("a", "one", user="ann", event="e1"))
    assert (first.duplicate, again.duplicate) == (False, True)
    for n in range(2, 5):
        await bridge.submit(inbound("a", f"number {n}", user="ann", event=f"e{n}"))
    await bridge.submit(inbound("a", "from bob", user="bob", event="b1"))
    rows = await settled(bridge.store, 5)
    await channel.wait_for(4)
    await asyncio.sleep(0.2)
    assert [(r.event_id, r.status) for r in rows] == [
        ("e1", "done"),
        ("e2", "done"),
        ("e3", "refused"),
        ("e4", "refused"),
        ("b1", "done"),
    ]
    assert rows[2].error == OVER_RATE
    texts = channel.texts("a")
    assert len(texts) == 4  # two answers, one limit notice (once), bob's answer
    [notice] = [t for t in texts if "messages in a minute" in t]
    assert "more than 2 messages in a minute" in notice
    assert "Please wait" in notice and "second" in notice
    await stop_bridge(bridge)


async def test_the_daily_budget_counts_every_thread_and_spares_admins(store_url: str) -> None:
    channel = RecordingChannel("slack")
    config = make_config(
        store_url,
        limits={"per_user_per_day": 2, "budget_notice": "Enough, {at}"},
        slack={"admins": ["U_ADMIN"]},
    )
    bridge = await start_bridge(config, channel)

    def message(thread: str, user: str) -> Inbound:
        ref = ThreadRef("slack", "T1", "C1", thread)
        return Inbound(f"{thread}-{user}", ref, Author(user, user), f"in {thread}")

    for n, thread in enumerate(("1.1", "2.2", "3.3")):
        await bridge.submit(message(thread, "U1"))
        await channel.wait_for(n + 1)
    for thread in ("1.1", "2.2", "3.3"):
        await bridge.submit(message(thread, "U_ADMIN"))
    rows = await settled(bridge.store, 6)
    assert [r.status for r in rows] == ["done", "done", "refused", "done", "done", "done"]
    assert rows[2].error == OVER_BUDGET
    assert channel.texts("3.3")[0] == "Enough, 00:00 UTC"
    await stop_bridge(bridge)


async def test_a_channel_outside_allow_channels_is_ignored_silently(store_url: str) -> None:
    channel = RecordingChannel("slack")
    routes = [{"source": "slack", "workspace": "T1", "agent": "demo", "allow_channels": ["C1"]}]
    bridge = await start_bridge(make_config(store_url, routes=routes), channel)

    def message(chan: str, n: int) -> Inbound:
        return Inbound(f"ev{chan}{n}", slack(chan), Author("U1", "Ann"), f"hi {n}")

    for n in range(3):
        submitted = await bridge.submit(message("C2", n))
        assert submitted.ignored
    await bridge.notify(slack("C2"), "not posted either")
    assert await bridge.store.counts() == {}
    assert not (await bridge.submit(message("C1", 0))).ignored
    await channel.wait_for(1)
    assert "hi 0" in channel.texts()[0]
    await stop_bridge(bridge)


async def test_limits_hold_across_two_instances_on_one_store(store_url: str) -> None:
    """Two bridges on one database, a person writing in eight threads at once: exactly the
    limit gets through, whichever instance takes which turn."""
    config = make_config(store_url, limits={"per_user_per_minute": 3})
    channels = [RecordingChannel(), RecordingChannel()]
    bridges = [await start_bridge(config, c) for c in channels]
    for n in range(8):
        await bridges[n % 2].submit(inbound(f"t{n}", f"burst {n}", user="ann"))
    rows = await settled(bridges[0].store, 8)
    assert [r.status for r in rows] == ["done"] * 3 + ["refused"] * 5
    await eventually(lambda: sum(len(c.posts) for c in channels) >= 8)
    for bridge in bridges:
        await stop_bridge(bridge)
