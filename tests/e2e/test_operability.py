"""Operating the real `threadbridge serve`: /readyz, /metrics, JSON logs with one trace id per
message, and a PostgreSQL outage that platforms ride out by redelivering."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.agents.emulators.openai import create_app as openai_emulator
from core.logs import trace_of
from tests.e2e.serve import ServeProcess
from tests.fakes.discord import BOT_TOKEN as DISCORD_TOKEN
from tests.fakes.discord import FakeDiscord, fake_discord
from tests.fakes.slack import (
    APP_TOKEN,
    BOT_TOKEN,
    BOT_USER_ID,
    FakeSlack,
    app_mention,
    event_callback,
    fake_slack,
    sign,
)
from tests.fakes.telegram import BOT_TOKEN as TELEGRAM_TOKEN
from tests.fakes.telegram import PRIVATE_CHAT, FakeTelegram, fake_telegram
from tests.pg import PostgresServer, pg_bin
from tests.servers import run_asgi

pytestmark = pytest.mark.e2e

SIGNING_SECRET = "signing-secret-for-ops-tests"
ADMIN_TOKEN = "admin-token-for-ops-tests-0123456789"
AGENT_KEY = "sk-ops-tests-agent-key-0123456789"
WEBHOOK_SECRET = "webhook-secret-for-ops-tests"
MENTION = f"<@{BOT_USER_ID}>"
SLACK_ENV = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET}


def config_text(store: str, *, sections: str = "", agent: str = "", lease_s: float = 3) -> str:
    return f"""
default_agent = "demo"

[store]
url = "{store}"

[bridge]
poll_s = 0.1
lease_s = {lease_s}

[agents.demo]
service = "local"
{agent}
[web]
enabled = true
{sections}
"""


def slack_section(slack: FakeSlack) -> str:
    return f'[slack]\napi_base_url = "{slack.base_url}"\n'


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with fake_slack() as fake:
        yield fake


def deliver(
    serve: ServeProcess, event: dict[str, Any], event_id: str, retry: int | None = None
) -> httpx.Response:
    """POST an event to /slack/events as Slack does: signed, maybe marked as a retry."""
    body = json.dumps(event_callback(event, event_id=event_id)).encode()
    headers = {"Content-Type": "application/json", **sign(body, SIGNING_SECRET)}
    if retry is not None:
        headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_error"})
    return httpx.post(f"{serve.url}/slack/events", content=body, headers=headers, timeout=10)


def answers(slack: FakeSlack, root: dict[str, Any]) -> list[str]:
    """The bot's answers in a mention's thread (its "thinking" placeholder not counted)."""
    return [t for t in slack.texts("C0001", root["ts"]) if "is thinking" not in t]


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:g}s: {what}")
        time.sleep(0.05)


def readyz(serve: ServeProcess) -> httpx.Response:
    return httpx.get(f"{serve.url}/readyz", timeout=10)


def scrape(serve: ServeProcess, token: str | None = ADMIN_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{serve.url}/metrics", headers=headers, timeout=10)


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


# -- readiness and metrics -----------------------------------------------------------------------


def test_readyz_and_metrics_of_a_serving_process(tmp_path: Path, slack: FakeSlack) -> None:
    env = {**SLACK_ENV, "THREADBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN}
    text = config_text(f"sqlite:///{tmp_path}/tb.db", sections=slack_section(slack))
    serve = ServeProcess(tmp_path, text, env=env)
    serve.start()
    try:
        ready = readyz(serve)
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "status": "ready",
            "checks": {"bridge": "ok", "store": "ok", "web": "ok", "slack": "ok"},
            "not_ready": [],
        }
        assert scrape(serve, token=None).status_code == 401
        assert scrape(serve, token="wrong").status_code == 401

        root = app_mention(f"{MENTION} count me")
        assert deliver(serve, root, "EvOps1").status_code == 200
        assert deliver(serve, root, "EvOps1", retry=1).status_code == 200
        assert serve.post("w1", "and me").status_code == 202
        wait_until(lambda: answers(slack, root), "the Slack answer")
        serve.wait_messages("w1", 2)

        def counted() -> str | None:
            body = scrape(serve).text
            posted = metric(body, "threadbridge_replies_posted_total", source="web", kind="answer")
            return body if posted else None

        body = wait_until(counted, "the web answer counted")
        response = scrape(serve)
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    finally:
        serve.stop()
    for source in ("slack", "web"):
        assert metric(body, "threadbridge_messages_received_total", source=source) == 1
    assert metric(body, "threadbridge_messages_duplicate_total", source="slack") == 1
    assert metric(body, "threadbridge_replies_posted_total", source="slack", kind="answer") == 1
    count = metric(body, "threadbridge_turn_seconds_count", agent="demo", outcome="answered")
    assert count == 2
    assert metric(body, "threadbridge_store_up") == 1
    assert metric(body, "threadbridge_outbox_depth", source="slack", status="pending") == 0
    assert metric(body, "threadbridge_breaker_state", agent="demo", state="closed") == 1
    assert metric(body, "process_resident_memory_bytes") is not None


def test_the_collector_runs_once_serving(tmp_path: Path) -> None:
    """`serve` holds the garbage collector off while it starts (core objects, made once) and
    turns it on once it listens: collections go on under load."""
    env = {"THREADBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN}
    serve = ServeProcess(tmp_path, config_text(f"sqlite:///{tmp_path}/tb.db"), env=env)
    serve.start()
    try:
        before = metric(scrape(serve).text, "python_gc_collections_total", generation="0")
        for n in range(10):
            assert serve.post(f"gc{n}", "hello").status_code == 202
        for n in range(10):
            serve.wait_messages(f"gc{n}", 2)
        after = metric(scrape(serve).text, "python_gc_collections_total", generation="0")
    finally:
        serve.stop()
    assert before is not None and after is not None
    assert after > before


def test_readyz_names_a_channel_that_lost_its_connection(tmp_path: Path, slack: FakeSlack) -> None:
    with fake_discord() as discord:
        sections = slack_section(slack) + discord_section(discord)
        env = {"DISCORD_BOT_TOKEN": DISCORD_TOKEN, "SLACK_BOT_TOKEN": BOT_TOKEN}
        env["SLACK_APP_TOKEN"] = APP_TOKEN  # Slack in Socket Mode: ready once the socket is up
        serve = ServeProcess(
            tmp_path, config_text(f"sqlite:///{tmp_path}/tb.db", sections=sections), env=env
        )
        serve.start()
        try:
            ready = wait_until(
                lambda: (r := readyz(serve)).status_code == 200 and r, "Slack and Discord ready"
            )
            assert ready.json()["checks"] == {
                "bridge": "ok",
                "store": "ok",
                "web": "ok",
                "slack": "ok",
                "discord": "ok",
            }
            # 4004: the token is refused; discord.py does not reconnect after it.
            asyncio.run(discord.disconnect(code=4004))
            down = wait_until(
                lambda: (r := readyz(serve)).status_code == 503 and r, "discord not ready"
            )
        finally:
            serve.stop()
    body = down.json()
    assert body["status"] == "not ready"
    assert body["not_ready"] == ["discord"]
    assert body["checks"]["discord"] == "the gateway is disconnected"
    assert body["checks"]["store"] == body["checks"]["slack"] == "ok"


def discord_section(discord: FakeDiscord) -> str:
    return (
        f'[discord]\napi_base_url = "{discord.api_base_url}"\n'
        f'gateway_url = "{discord.gateway_url}"\nguild_ready_timeout_s = 0.1\n'
    )


# -- JSON logs and the trace id ------------------------------------------------------------------


@contextmanager
def recorded_agent(latency_s: float = 0.0) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The OpenAI-compatible emulator, behind a recorder of each call's path and headers."""
    seen: list[dict[str, str]] = []
    emulator = openai_emulator(api_keys={AGENT_KEY}, latency_s=latency_s)

    async def recorder(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            seen.append({"path": scope["path"], **headers})
        await emulator(scope, receive, send)

    with run_asgi(recorder) as url:
        yield f"{url}/v1", seen


def agent_section(url: str, source: str = "slack") -> str:
    return (
        f'[agents.gpt]\nservice = "openai"\nbase_url = "{url}"\nmodel = "gpt-4o-mini"\n'
        f'api_key_env = "OPS_AGENT_KEY"\n\n[[routes]]\nsource = "{source}"\nagent = "gpt"\n'
    )


@pytest.fixture
def agent() -> Iterator[tuple[str, list[dict[str, str]]]]:
    with recorded_agent() as running:
        yield running


def test_json_logs_follow_one_message_from_the_event_to_the_reply(
    tmp_path: Path, slack: FakeSlack, agent: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = agent
    gpt = agent_section(url)
    env = {**SLACK_ENV, "OPS_AGENT_KEY": AGENT_KEY, "THREADBRIDGE_LOG_FORMAT": "json"}
    text = config_text(f"sqlite:///{tmp_path}/tb.db", sections=slack_section(slack), agent=gpt)
    serve = ServeProcess(tmp_path, text, env=env)
    serve.start()
    try:
        root = app_mention(f"{MENTION} trace me")
        assert deliver(serve, root, "EvTrace1").status_code == 200
        wait_until(lambda: answers(slack, root), "the answer")

        def all_logged() -> list[dict[str, Any]] | None:
            records = [json.loads(line) for line in serve.log().splitlines() if line.strip()]
            done = any(r["message"] == "answer posted to slack" for r in records)
            return records if done else None

        records = wait_until(all_logged, "the posted reply logged")
    finally:
        serve.stop()
    for record in records:  # every line is one JSON object with the same first fields
        assert list(record)[:5] == ["time", "level", "logger", "message", "trace_id"]
    [accepted] = [r for r in records if r["message"].startswith("accepted ")]
    trace = accepted["trace_id"]
    assert trace == trace_of(accepted["event_id"])
    traced = [r["message"] for r in records if r["trace_id"] == trace]
    assert any(m.startswith("turn answered by gpt") for m in traced), traced
    assert "answer posted to slack" in traced
    assert any("POST /slack/events" in m for m in traced)  # the access log line too
    calls = [h for h in seen if h["path"].endswith("/chat/completions")]
    assert [h.get("x-trace-id") for h in calls] == [trace]  # the agent call carried it
    logged = serve.log()
    for secret in (BOT_TOKEN, SIGNING_SECRET, AGENT_KEY):
        assert secret not in logged


# -- a PostgreSQL outage -------------------------------------------------------------------------


class PausablePostgres(PostgresServer):
    """A PostgreSQL that can be stopped and started again on the same data and port."""

    def pause(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "pg-resumed.log")
        self._run(pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "start")


@pytest.fixture
def postgres_own() -> Iterator[PausablePostgres]:
    """A PostgreSQL of this test's own (the session's is shared and must stay up)."""
    if pg_bin("initdb") is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="threadbridge-pg-outage-"))
    root.chmod(0o755)
    server = PausablePostgres(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with fake_telegram() as fake:
        yield fake


@pytest.fixture
def slow_agent() -> Iterator[tuple[str, list[dict[str, str]]]]:
    with recorded_agent(latency_s=1.5) as running:
        yield running


def test_a_store_outage_gets_503s_then_redeliveries_are_answered_once(
    tmp_path: Path,
    slack: FakeSlack,
    tg: FakeTelegram,
    postgres_own: PausablePostgres,
    slow_agent: tuple[str, list[dict[str, str]]],
) -> None:
    url, seen = slow_agent  # Slack's agent takes 1.5 s: a turn can be in flight when it goes
    telegram = (
        f'[telegram]\napi_base_url = "{tg.base_url}"\nmode = "webhook"\n'
        'public_url = "https://bots.example.com"\n'
    )
    sections = slack_section(slack) + telegram
    text = config_text(postgres_own.database(), sections=sections, agent=agent_section(url))
    env = {
        **SLACK_ENV,
        "OPS_AGENT_KEY": AGENT_KEY,
        "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
        "TELEGRAM_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    serve = ServeProcess(tmp_path, text, env=env)
    serve.start()

    def hook(update: dict[str, Any]) -> httpx.Response:
        return asyncio.run(tg.webhook_post(f"{serve.url}/telegram/webhook", update))

    try:
        before = app_mention(f"{MENTION} before the outage")
        assert deliver(serve, before, "EvBefore").status_code == 200
        wait_until(lambda: answers(slack, before), "the answer before the outage")
        assert readyz(serve).status_code == 200
        in_flight = app_mention(f"{MENTION} in flight when the store goes")
        assert deliver(serve, in_flight, "EvInFlight").status_code == 200
        wait_until(lambda: len(seen) == 2, "the in-flight turn's call to the agent")

        postgres_own.pause()
        down = wait_until(lambda: (r := readyz(serve)).status_code == 503 and r, "store down")
        during = app_mention(f"{MENTION} during the outage")
        assert deliver(serve, during, "EvDuring").status_code == 503
        update = tg.private_message("during the outage too")
        update["update_id"] = 777
        assert hook(update).status_code == 503
        assert serve.post("w-outage", "and from the web").status_code == 503
        # The in-flight turn got its answer but could not store it: it is handed back, whole.
        wait_until(lambda: "it will be retried" in serve.log(), "the in-flight turn handed back")

        postgres_own.resume()
        wait_until(lambda: readyz(serve).status_code == 200, "ready again")
        # Slack and Telegram send again what did not get a 2xx; a second retry crosses the first.
        assert deliver(serve, during, "EvDuring", retry=1).status_code == 200
        assert deliver(serve, during, "EvDuring", retry=2).status_code == 200
        assert hook(update).status_code == 200
        assert hook(update).status_code == 200
        wait_until(lambda: answers(slack, during), "the Slack answer after the outage")
        wait_until(lambda: answers(slack, in_flight), "the in-flight message's answer")
        wait_until(lambda: tg.sent(PRIVATE_CHAT), "the Telegram answer after the outage")
        time.sleep(1.0)  # anything doubled would have been posted by now
        conversations = httpx.get(f"{serve.url}/api/conversations", timeout=10).json()
    finally:
        serve.stop()
    body = down.json()
    assert body["not_ready"] == ["store"]
    assert body["checks"]["store"].startswith("unavailable")
    assert len(answers(slack, during)) == 1
    assert len(answers(slack, before)) == 1
    [answer] = answers(slack, in_flight)
    assert "in flight when the store goes" in answer
    [reply] = tg.sent(PRIVATE_CHAT)
    assert "during the outage too" in reply["text"]
    # One conversation each for the three Slack threads and the Telegram chat; none for the
    # web message refused with a 503, and no half-written rows.
    assert conversations["total"] == 4
    assert {c["status"] for c in conversations["items"]} == {"open"}  # no turn marked failed


def outage_lines(log: str) -> list[str]:
    """The log's lines but the access log's and those of the requests the test makes."""
    return [line for line in log.splitlines() if line.strip() and "INFO:  " not in line]


def test_a_store_outage_is_logged_in_a_few_lines_and_its_end_too(
    tmp_path: Path, postgres_own: PausablePostgres
) -> None:
    """Three loops poll the store every 0.1 s here: ~5 s down once meant ~150 tracebacks."""
    serve = ServeProcess(tmp_path, config_text(postgres_own.database()))
    serve.start()
    try:
        assert serve.post("w-before", "before").status_code == 202
        serve.wait_messages("w-before", 2)
        before = len(serve.log())
        postgres_own.pause()
        wait_until(lambda: "the store is unavailable" in serve.log(), "the outage noticed")
        time.sleep(5.0)
        postgres_own.resume()
        wait_until(lambda: "store is back after" in serve.log(), "the recovery said")
        said = outage_lines(serve.log()[before:])
        assert serve.post("w-after", "after").status_code == 202
        serve.wait_messages("w-after", 2)
    finally:
        serve.stop()
    assert len(said) <= 3, "\n".join(said)
    assert "Traceback" not in "\n".join(said)
    [down] = [line for line in said if "the store is unavailable" in line]
    assert "WARNING" in down, down  # the driver's error named in the line, no traceback
    [back] = [line for line in said if "store is back after" in line]
    seconds = float(back.split("store is back after ")[1].split(" s")[0])
    assert seconds >= 5.0, back


def test_an_answer_ready_while_the_store_is_down_is_stored_when_it_is_back(
    tmp_path: Path, postgres_own: PausablePostgres
) -> None:
    """No "could not answer" notice for a turn the agent answered, and no second agent call:
    the answer waits in memory (within the lease) until the store takes it."""
    with recorded_agent(latency_s=2.5) as (url, seen):
        gpt = agent_section(url, source="web")
        text = config_text(postgres_own.database(), agent=gpt, lease_s=30)
        serve = ServeProcess(tmp_path, text, env={"OPS_AGENT_KEY": AGENT_KEY})
        found, log = answer_during_an_outage(serve, postgres_own, seen)
    assert [(m["role"], m["status"]) for m in found] == [("user", "done"), ("agent", "done")]
    assert "answered during the outage" in found[1]["text"]
    assert len([h for h in seen if h["path"].endswith("/chat/completions")]) == 1
    assert "it will be retried" not in log and "failed unexpectedly" not in log, log[-3000:]


def answer_during_an_outage(
    serve: ServeProcess, postgres_own: PausablePostgres, seen: list[dict[str, str]]
) -> tuple[list[dict[str, Any]], str]:
    """Post a web message, stop the store while its agent call runs, start it again: the
    thread's messages a second after it is answered, and the log."""
    serve.start()
    try:
        assert serve.post("w-mid", "answered during the outage").status_code == 202
        wait_until(lambda: seen, "the call to the agent")
        postgres_own.pause()  # the agent answers 2.5 s after the call, into the outage
        wait_until(lambda: "storing it once the store is back" in serve.log(), "answer held")
        time.sleep(1.0)  # a few failed tries to store it
        postgres_own.resume()
        serve.wait_messages("w-mid", 2)
        time.sleep(1.0)  # a notice or a second answer would show by now
        return serve.messages("w-mid"), serve.log()
    finally:
        serve.stop()
