"""Bad input at every door of one real `threadbridge serve`: ten thousand malformed requests
on a SQLite store, and five thousand more of the same kinds on PostgreSQL.

Slack (HTTP events, signed and not), the Telegram webhook (with and without its secret), the web
chat and the admin API, all on one process, with the fake Slack and fake Telegram behind it. For
every request: never a 5xx, the connection kept, no inbox row written when the request was
refused, and a 413 for any body over `[server] max_body_bytes` (sent with a Content-Length or
chunked). At the end the server still answers `/healthz`, and every conversation it opened came
from a message it accepted.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.dbview import DatabaseView
from tests.e2e.serve import ServeProcess
from tests.fakes.slack import BOT_TOKEN as SLACK_BOT_TOKEN
from tests.fakes.slack import (
    BOT_USER_ID,
    FakeSlack,
    app_mention,
    assistant_thread_started,
    event_callback,
    fake_slack,
    message,
    slash_command,
)
from tests.fakes.telegram import BOT_TOKEN as TELEGRAM_BOT_TOKEN
from tests.fakes.telegram import BOT_USERNAME, FakeTelegram, fake_telegram

pytestmark = pytest.mark.e2e

SIGNING_SECRET = "fuzz-signing-secret"
WEBHOOK_SECRET = "fuzz-webhook-secret"
ADMIN_TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_BODY = 1024 * 1024  # [server] max_body_bytes, left at its default

# Examples per test, sized so that the file sends about 10,000 requests on SQLite.
EXAMPLES = {
    "admin": 1200,
    "slack_unsigned": 1000,
    "slack_signed_raw": 1100,
    "slack_event": 1000,  # two requests each
    "telegram_no_secret": 1200,
    "telegram": 1700,
    "web": 1800,
}


# PostgreSQL gets half as many: the same doors, and a run that stays within the test timeout
# (each request costs more there; under load a whole test took 110 s of its 120).
SHARE = {"sqlite": 1.0, "postgresql": 0.5}


def fuzz(target: Target, name: str, case: Callable[..., None], **strategies: Any) -> None:
    """Call `case(target, **drawn)` on EXAMPLES[name] draws of `strategies` (a SHARE of them
    on the target's backend)."""

    @settings(
        max_examples=int(EXAMPLES[name] * SHARE[target.backend]),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(**strategies)
    def run(**drawn: Any) -> None:
        case(target, **drawn)

    run()


# -- the server under test ---------------------------------------------------------------------


@dataclass
class Target:
    """The serve process, a keep-alive client to it, and a read-only view of its database."""

    serve: ServeProcess
    slack: FakeSlack
    tg: FakeTelegram
    client: httpx.Client
    db: DatabaseView
    backend: str  # "sqlite" or "postgresql"
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def tables(self) -> tuple[str, ...]:
        """Every table of the store (the admin API's may grow)."""
        return self.db.tables()

    def rows(self, tables: tuple[str, ...] = ("inbox",)) -> dict[str, int]:
        return self.db.counts(tables)

    def send(
        self,
        door: str,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
        watch: tuple[str, ...] = ("inbox",),
    ) -> httpx.Response:
        """One request: never a 5xx, a 413 for a body over the limit, and a refused one leaves
        the watched tables as they were. A `Chunked` body goes without a Content-Length."""
        before = self.rows(watch)
        size = len(content or b"")
        shown = f"{method} {path} params={params!r} headers={headers!r} body={content!r:.400}"
        shown += f" ({size:,} bytes{', chunked' if isinstance(content, Chunked) else ''})"
        try:
            response = self.client.request(
                method,
                path + (f"?{query_string(params)}" if params else ""),
                content=content.chunks() if isinstance(content, Chunked) else content,
                headers={k: v.encode("latin-1") for k, v in (headers or {}).items()},
            )
        except httpx.TransportError as exc:
            raise AssertionError(f"the server dropped {shown}: {exc!r}\n{self.log_tail()}") from exc
        self.sent += 1
        self.statuses[f"{door} {response.status_code}"] += 1
        assert response.status_code < 500, (
            f"{response.status_code} {response.text[:300]!r} for {shown}\n{self.log_tail()}"
        )
        if size > MAX_BODY:
            assert response.status_code == 413, f"{response.status_code} for {shown}"
        if response.status_code >= 400:
            after = self.rows(watch)
            assert after == before, f"refused with {response.status_code} but wrote rows: {shown}"
        return response

    def log_tail(self) -> str:
        return self.serve.log()[-4000:]


class Chunked(bytes):
    """A request body sent in pieces with Transfer-Encoding: chunked (no Content-Length)."""

    def chunks(self, size: int = 64 * 1024) -> Iterator[bytes]:
        for start in range(0, len(self), size):
            yield bytes(self[start : start + size])


def percent(text: str) -> str:
    """`text` percent-encoded as UTF-8, lone surrogates too (so the bytes are not UTF-8)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def query_string(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{percent(k)}={percent(v)}" for k, v in params)


def config_text(store: str, slack: FakeSlack, tg: FakeTelegram) -> str:
    return f"""
default_agent = "demo"

[server]
public_url = "https://bots.example.com"

[store]
url = "{store}"

[bridge]
poll_s = 0.1

[agents.demo]
service = "local"

[web]
enabled = true

[slack]
api_base_url = "{slack.base_url}"
admins = ["U0002"]

[telegram]
api_base_url = "{tg.base_url}"
mode = "webhook"
"""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        store = f"sqlite:///{tmp_path}/tb.db"
    else:
        store = request.getfixturevalue("postgres").database()
    env = {
        "SLACK_BOT_TOKEN": SLACK_BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "TELEGRAM_BOT_TOKEN": TELEGRAM_BOT_TOKEN,
        "TELEGRAM_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "THREADBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with fake_slack() as slack, fake_telegram() as tg:
        serve = ServeProcess(tmp_path, config_text(store, slack, tg), env=env)
        serve.start()
        db = DatabaseView(store)
        try:
            with httpx.Client(base_url=serve.url, timeout=30, trust_env=False) as client:
                found = Target(serve, slack, tg, client, db, request.param)
                seed(found)
                yield found
        finally:
            db.close()
            serve.stop()


def seed(target: Target) -> None:
    """A few finished web conversations, so that the admin API has something to search."""
    for n in range(3):
        target.serve.post(f"seed-{n}", f"seed message {n} about pensions")
    for n in range(3):
        target.serve.wait_messages(f"seed-{n}", 2)


# -- values of the wrong kind --------------------------------------------------------------------

# Text with what breaks naive code: NUL, lone surrogates (JSON can carry them as \ud800),
# right-to-left marks, Slack and HTML syntax.
awkward_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Zs", "So"]), max_size=10),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\ud800",
            "\udfff x",
            "\u202e",
            "<!channel>",
            "<@UBOT>",
            "<script>",
            "'; DROP TABLE inbox; --",
            "%s%s%n",
            "../../etc/passwd",
            "1e999",
            "NaN",
            "x" * 5000,
        ]
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    awkward_text,
)
# Two levels deep at most: deeper nesting finds nothing more here and costs generation time.
junk: st.SearchStrategy[Any] = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    st.lists(st.dictionaries(st.text(max_size=4), scalars, max_size=2), max_size=2),
)


# Bodies at and over [server] max_body_bytes, some sent chunked: (size, how it starts, chunked).
oversized = st.tuples(
    st.one_of(st.integers(MAX_BODY - 8, MAX_BODY + 8), st.integers(MAX_BODY, 2 * MAX_BODY)),
    st.sampled_from([b"", b"{", b'{"text": "', b"\xff\xfe", b"[[", b"payload=%7B"]),
    st.booleans(),
)


def sized(spec: tuple[int, bytes, bool]) -> bytes:
    size, start, chunked = spec
    body = start + b"x" * (size - len(start))
    return Chunked(body) if chunked else body


def or_oversized(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """`bodies`, or now and then a body around the size limit instead (built only then).

    Hypothesis favours the first of the forty choices, so it is about one draw in 200 (some 50
    requests of the ten thousand); `test_huge_bodies_are_refused_everywhere` tries every door."""
    return st.tuples(st.sampled_from(range(40)), bodies, oversized).map(
        lambda drawn: sized(drawn[2]) if drawn[0] == 20 else drawn[1]
    )


def over(body: bytes | None) -> bool:
    return body is not None and len(body) > MAX_BODY


def parses(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def to_json(value: Any) -> bytes:
    """JSON as a careless sender writes it: NaN and Infinity, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document: each key of each object, each item of each list."""
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += paths(value, (*prefix, index))
    return found


def mutate(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    """Put `value` at `path` in `doc` (or take that place out) when the place still exists."""
    *above, last = path
    parent = doc
    for step in above:
        if not _has(parent, step):
            return
        parent = parent[step]
    if delete and _has(parent, last):
        del parent[last]
    elif not delete and (isinstance(parent, dict) or _has(parent, last)):
        parent[last] = value


def _has(container: Any, step: Any) -> bool:
    if isinstance(container, dict):
        return step in container
    return isinstance(container, list) and isinstance(step, int) and step < len(container)


Mutation = tuple[int, Any, bool]  # index into the document's paths, new value, or delete
mutations = st.lists(st.tuples(st.integers(0, 10_000), junk, st.booleans()), min_size=1, max_size=2)


def mutated(doc: Any, changes: list[Mutation]) -> Any:
    """A copy of `doc` with `changes` made (the fakes' builders share their users and chats)."""
    doc = copy.deepcopy(doc)
    places = paths(doc)
    for index, value, delete in changes:
        mutate(doc, places[index % len(places)], value, delete)
    return doc


# -- the admin API ----------------------------------------------------------------------------


def admin_operations(target: Target) -> list[tuple[str, str, list[str]]]:
    """(method, path, query parameter names) of every admin operation under /api/."""
    spec = target.client.get("/openapi.json").json()
    found = []
    for path, operations in spec["paths"].items():
        if not path.startswith("/api/") or path.startswith("/api/chat/"):
            continue
        for method, operation in operations.items():
            names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
            found.append((method.upper(), path, names))
    return sorted(found)


query_values = st.one_of(
    awkward_text,
    st.integers().map(str),
    st.sampled_from(
        [
            "-1",
            "0",
            "201",
            "1e3",
            "true",
            "maybe",
            "2024-13-45",
            "2024-01-01T25:00:00",
            "9999-12-31T23:59:59+99:00",
            "0001-01-01",
            "1700000000",
            "open",
            "failed",
            "%",
            "_",
            "*",
        ]
    ),
)


def test_the_admin_api_refuses_bad_queries_and_writes_nothing(target: Target) -> None:
    fuzz(
        target,
        "admin",
        admin_case,
        operation=st.integers(0, 1000),
        path_value=st.one_of(awkward_text, st.uuids().map(str)),
        known=st.lists(st.tuples(st.integers(0, 100), query_values), max_size=5),
        unknown=st.lists(st.tuples(st.text(max_size=10), query_values), max_size=2),
        auth=st.sampled_from(["right"] * 6 + ["none", "wrong", "basic", "empty"]),
        body=st.one_of(
            st.none(), or_oversized(st.one_of(junk.map(to_json), st.binary(max_size=100)))
        ),
    )


def admin_case(
    target: Target,
    operation: int,
    path_value: str,
    known: list[tuple[int, str]],
    unknown: list[tuple[str, str]],
    auth: str,
    body: bytes | None,
) -> None:
    operations = admin_operations_cached(target)
    method, path, names = operations[operation % len(operations)]
    path = re.sub(r"\{[^}]+\}", lambda _: percent(path_value) or "x", path)
    params = [(names[i % len(names)], v) for i, v in known] if names else []
    params += unknown
    headers = {
        "right": AUTH,
        "none": {},
        "wrong": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        "basic": {"Authorization": f"Basic {ADMIN_TOKEN}"},
        "empty": {"Authorization": "Bearer"},
    }[auth]
    if body is not None:
        headers = {**headers, "Content-Type": "application/json"}
    # The bridge is idle (the seeded turns are done): a refused request changes no table at all.
    tables = target.tables
    before = target.rows(tables)
    response = target.send(
        "admin", method, path, content=body, headers=headers, params=params, watch=tables
    )
    if auth != "right":
        # Routing comes first (404, 405, a 307 to the path without its slash), and FastAPI
        # decodes a JSON body before any dependency runs (400, 422 for one that does not
        # parse): none of these tells anything. What matters: nothing is served or done.
        assert not response.is_success, response.text
        if body is None or parses(body):
            assert response.status_code in (307, 401, 404, 405), response.text
    if method == "GET":
        assert target.rows(tables) == before, f"GET {path} wrote rows"


_operations: list[tuple[str, str, list[str]]] = []


def admin_operations_cached(target: Target) -> list[tuple[str, str, list[str]]]:
    if not _operations:
        _operations.extend(admin_operations(target))
    return _operations


# -- Slack ------------------------------------------------------------------------------------


def slack_sign(
    body: bytes, secret: str = SIGNING_SECRET, timestamp: str | None = None
) -> dict[str, str]:
    """Slack's signature headers over raw bytes (slack_sdk's helper insists on UTF-8)."""
    ts = timestamp if timestamp is not None else str(int(time.time()))
    digest = hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256)
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest.hexdigest()}"}


SLACK_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", ""]
# Header values as HTTP carries them: any byte but controls, no space at either end.
header_text = st.text(
    st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=30
)


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bodies that are not a valid Slack request: bytes, bad UTF-8, JSON of any shape, forms."""
    kind = draw(st.sampled_from(["bytes", "bad-utf8", "json", "form", "payload"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "bad-utf8":
        good = to_json(draw(junk))
        cut = draw(st.integers(0, len(good)))
        return (
            good[:cut]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))
            + good[cut:]
        )
    if kind == "json":
        return to_json(draw(junk))
    fields = draw(st.dictionaries(st.sampled_from(list(slash_command())), awkward_text, max_size=6))
    if kind == "payload":
        fields["payload"] = to_json(draw(junk)).decode()
    return urlencode(fields, errors="surrogatepass").encode()


def test_slack_refuses_what_slack_did_not_sign(target: Target) -> None:
    fuzz(
        target,
        "slack_unsigned",
        slack_unsigned_case,
        body=or_oversized(raw_bodies()),
        content_type=st.sampled_from(SLACK_TYPES),
        signature=st.sampled_from(["none", "junk", "wrong secret", "stale"]),
        stamp=header_text,
        junk_signature=st.one_of(header_text, header_text.map("v0=".__add__)),
    )


def slack_unsigned_case(
    target: Target,
    body: bytes,
    content_type: str,
    signature: str,
    stamp: str,
    junk_signature: str,
) -> None:
    headers = {"Content-Type": content_type}
    if signature == "junk":
        headers.update({"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": junk_signature})
    elif signature == "wrong secret":
        headers.update(slack_sign(body, secret=f"not-the-{SIGNING_SECRET}"))
    elif signature == "stale":  # signed right, six minutes ago: a replay
        headers.update(slack_sign(body, timestamp=str(int(time.time()) - 360)))
    response = target.send("slack-unsigned", "POST", "/slack/events", content=body, headers=headers)
    assert response.status_code in ((413,) if over(body) else (400, 401, 403)), response.text


def test_slack_signed_garbage_is_refused_without_a_500(target: Target) -> None:
    fuzz(
        target,
        "slack_signed_raw",
        slack_signed_raw_case,
        body=or_oversized(raw_bodies()),
        content_type=st.sampled_from(SLACK_TYPES),
        retry=st.one_of(st.none(), header_text),
    )


def slack_signed_raw_case(
    target: Target, body: bytes, content_type: str, retry: str | None
) -> None:
    headers = {"Content-Type": content_type, **slack_sign(body)}
    if retry is not None:
        headers.update({"X-Slack-Retry-Num": retry, "X-Slack-Retry-Reason": retry})
    target.send("slack-signed", "POST", "/slack/events", content=body, headers=headers)


def slack_bases() -> list[Callable[[], dict[str, Any]]]:
    mention = f"<@{BOT_USER_ID}>"
    files = [{"id": "F1", "name": "a.pdf", "title": "a", "url_private": "https://files/a.pdf"}]
    return [
        lambda: event_callback(app_mention(f"{mention} fuzzed question")),
        lambda: event_callback(
            app_mention(f"{mention} in a thread", thread_ts="1700000000.000100")
        ),
        lambda: event_callback(message("a dm", channel="D0001", channel_type="im")),
        lambda: event_callback(message(f"{mention} with a file", files=files)),
        lambda: event_callback(message("a reply", thread_ts="1700000000.000200")),
        lambda: event_callback(assistant_thread_started()),
        lambda: {"type": "url_verification", "token": "t", "challenge": "c"},
        lambda: {"type": "ssl_check", "token": "t"},
    ]


SLACK_BASES = slack_bases()


def test_slack_signed_events_with_wrong_types_never_break_the_server(target: Target) -> None:
    base = st.integers(0, len(SLACK_BASES) - 1)
    fuzz(target, "slack_event", slack_event_case, base=base, changes=mutations)


def slack_event_case(target: Target, base: int, changes: list[Mutation]) -> None:
    doc = mutated(SLACK_BASES[base](), changes)
    as_json = to_json(doc)
    # Interactive payloads come as a form field holding JSON; bolt reads both ways.
    as_form = urlencode({"payload": as_json.decode()}).encode()
    for body, content_type in ((as_json, SLACK_TYPES[0]), (as_form, SLACK_TYPES[1])):
        headers = {"Content-Type": content_type, **slack_sign(body)}
        target.send("slack-event", "POST", "/slack/events", content=body, headers=headers)


# -- Telegram ---------------------------------------------------------------------------------

TELEGRAM_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", ""]


def test_telegram_refuses_a_webhook_without_its_secret(target: Target) -> None:
    fuzz(
        target,
        "telegram_no_secret",
        telegram_no_secret_case,
        body=or_oversized(st.one_of(st.binary(max_size=200), junk.map(to_json))),
        secret=st.one_of(
            st.none(), header_text, st.just(WEBHOOK_SECRET[:-1]), st.just(WEBHOOK_SECRET + "x")
        ),
    )


def telegram_no_secret_case(target: Target, body: bytes, secret: str | None) -> None:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    response = target.send(
        "telegram-nosecret", "POST", "/telegram/webhook", content=body, headers=headers
    )
    assert response.status_code == (413 if over(body) else 403), response.text


_update_ids = iter(range(10_000_000, 100_000_000))
_telegram_bases: list[dict[str, Any]] = []


def telegram_bases(tg: FakeTelegram) -> list[dict[str, Any]]:
    """Updates as Telegram sends them, built once (the fake numbers its messages)."""
    if not _telegram_bases:
        bot = f"@{BOT_USERNAME}"
        command = [{"type": "bot_command", "offset": 0, "length": 4}]
        person = {"id": 5, "is_bot": False, "first_name": "x"}
        updates = [
            tg.private_message("a private question"),
            tg.group_message(f"{bot} a group question"),
            tg.group_message("/new", entities=command),
            tg.topic_message(f"{bot} in a topic", thread_id=3),
            {"edited_message": tg.private_message("edited")["message"]},
            {"callback_query": {"id": "1", "from": person, "chat_instance": "c"}},
        ]
        _telegram_bases.extend({"update_id": 0, **update} for update in updates)
    return _telegram_bases


def test_telegram_malformed_updates_are_refused_or_ignored(target: Target) -> None:
    fuzz(
        target,
        "telegram",
        telegram_case,
        base=st.integers(0, 5),
        changes=mutations,
        # Mostly updates with a field changed; some bodies that are no update at all.
        noise=st.one_of(
            st.none(),
            st.none(),
            st.none(),
            or_oversized(st.binary(max_size=200)),
            junk.map(to_json),
        ),
        content_type=st.sampled_from(TELEGRAM_TYPES),
    )


def telegram_case(
    target: Target, base: int, changes: list[Mutation], noise: bytes | None, content_type: str
) -> None:
    raw = noise
    if raw is None:
        update = mutated(telegram_bases(target.tg)[base], changes)
        if isinstance(update, dict) and update.get("update_id") == 0:
            update["update_id"] = next(_update_ids)  # unchanged: a new one, not a redelivery
        raw = to_json(update)
    headers = {"Content-Type": content_type, "X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    response = target.send("telegram", "POST", "/telegram/webhook", content=raw, headers=headers)
    # 503 asks Telegram to send the update again: for a malformed one that never ends.
    assert response.status_code in ((413,) if over(raw) else (200, 400)), response.text


# -- the web chat -----------------------------------------------------------------------------

thread_ids = st.one_of(
    st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=64),
    st.text(max_size=80),
    st.sampled_from(["..", ".", "%2e%2e", "a/b", "a%2Fb", "x" * 65, " ", "é", "\x00", "null"]),
)
chat_bodies = st.one_of(
    junk.map(to_json),
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {"text": junk},
        optional={"user": junk, "id": junk, "extra": junk},
    ).map(to_json),
    st.fixed_dictionaries(
        {"text": awkward_text},
        optional={"user": awkward_text, "id": awkward_text},
    ).map(to_json),
)


def test_the_web_chat_refuses_bad_posts_and_thread_ids(target: Target) -> None:
    fuzz(
        target,
        "web",
        web_case,
        thread=thread_ids,
        body=or_oversized(chat_bodies),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]
        ),
        method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
    )


def web_case(target: Target, thread: str, body: bytes, content_type: str, method: str) -> None:
    path = f"/api/chat/{percent(thread)}"
    if method == "GET":
        path += "/messages"
        body = b""
    target.send("web", method, path, content=body, headers={"Content-Type": content_type})


# -- huge bodies, and the end -----------------------------------------------------------------


def test_what_the_fuzzing_found_stays_fixed(target: Target) -> None:
    """Each of these was a 500, a 503 or a dropped connection once."""
    event = event_callback(app_mention(f"<@{BOT_USER_ID}> hi"))
    slack_cases: list[tuple[bytes, dict[str, str]]] = [
        (b"\xff{", {}),  # not UTF-8: bolt decodes before it checks the signature
        (b"null", {}),  # JSON, not an object
        (b"trigger_id=", {}),  # a form sent as JSON
        (b"{}", {"X-Slack-Request-Timestamp": "", "X-Slack-Signature": "v0="}),
        (b"{}", {"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "v0=x"}),
        (to_json({**event, "event": None}), {}),  # bolt's own error handler fails on it
        (to_json({**event, "event": 5}), {}),
        (to_json({**event, "authorizations": "x"}), {}),
        # Wrong types where our listener reads: ignored (200, so Slack does not resend).
        (to_json({**event, "event": {**event["event"], "files": [5]}}), {}),
        (to_json({**event, "event": {**event["event"], "channel": 5}}), {}),
        (to_json({**event, "event": {**event["event"], "text": ["a list"]}}), {}),
    ]
    before = target.rows()
    for body, headers in slack_cases:
        signed = {"Content-Type": "application/json", **slack_sign(body), **headers}
        response = target.send("found", "POST", "/slack/events", content=body, headers=signed)
        assert response.status_code in (200, 400, 401), (body, response.text)
    assert target.rows() == before  # none of them was taken in

    private = telegram_bases(target.tg)[0]
    hook = {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    for change in (
        {"date": 67768036191676800},  # beyond time_t: OverflowError or OSError, not 503
        {"date": -(2**62)},
        {"from": {"id": 5, "is_bot": False, "first_name": 3}},  # a crash when named
        {"entities": [{"type": "mention", "offset": "a", "length": 3}]},
        {"chat": {"id": "x", "type": "private"}},
    ):
        update = {"update_id": next(_update_ids), "message": {**private["message"], **change}}
        body = to_json(update)
        response = target.send("found", "POST", "/telegram/webhook", content=body, headers=hook)
        assert response.status_code in (200, 400), (change, response.text)
    assert target.rows() == before

    # FastAPI's own 422 fails to encode a lone surrogate it echoes back.
    surrogate = b'{"text": "\\udfff"}'
    for method, path in (("PATCH", "/api/conversations/x"), ("PUT", "/api/routes")):
        headers = {**AUTH, "Content-Type": "application/json"}
        response = target.send("found", method, path, content=b'"\\udfff x"', headers=headers)
        assert response.status_code == 422, response.text
    response = target.send("found", "POST", "/api/chat/found", content=surrogate)
    assert response.status_code == 422, response.text


def test_huge_bodies_are_refused_everywhere(target: Target) -> None:
    """2 MB at every door, with a Content-Length and chunked: a 413, and no row anywhere."""
    huge = b'{"text": "' + b"x" * 2_000_000 + b'"}'
    hook = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    doors = [
        ("slack-huge", "POST", "/slack/events", {}),
        ("slack-huge", "POST", "/slack/events", slack_sign(huge)),
        ("telegram-huge", "POST", "/telegram/webhook", hook),
        ("web-huge", "POST", "/api/chat/huge", {}),
        ("admin-huge", "PUT", "/api/routes", AUTH),
        ("admin-huge", "PATCH", "/api/conversations/x", AUTH),
        ("admin-huge", "POST", "/admin/login", form),
        ("admin-huge", "POST", "/admin/routes", form),
        ("other-huge", "GET", "/healthz", {}),
        ("other-huge", "POST", "/no/such/path", {}),
    ]
    tables = target.tables
    before = target.rows(tables)
    for door, method, path, headers in doors:
        for body in (huge, Chunked(huge)):
            sent = {"Content-Type": "application/json", **headers}
            response = target.send(door, method, path, content=body, headers=sent, watch=tables)
            assert response.status_code == 413, (door, path, response.status_code)
            assert "larger than the limit" in response.json()["detail"]
    assert target.rows(tables) == before
    assert target.client.get("/healthz").status_code == 200
    text = json.dumps({"text": "y" * 1_000_001}).encode()
    assert target.send("web-huge", "POST", "/api/chat/huge", content=text).status_code == 422
    nested = b"[" * 100_000 + b"]" * 100_000
    for path, headers in [
        ("/slack/events", {"Content-Type": "application/json", **slack_sign(nested)}),
        (
            "/telegram/webhook",
            {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET, "Content-Type": "application/json"},
        ),
        ("/api/chat/nested", {"Content-Type": "application/json"}),
    ]:
        target.send("nested", "POST", path, content=nested, headers=headers)


def test_the_server_survived_and_wrote_only_what_it_accepted(
    target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    assert target.client.get("/healthz").status_code == 200
    assert target.serve.proc is not None and target.serve.proc.poll() is None
    # Every conversation was opened for a message the server accepted into its inbox.
    inbox_threads = {row[0] for row in target.db.query("SELECT thread_key FROM inbox")}
    opened = {row[0] for row in target.db.query("SELECT thread_key FROM conversations")}
    assert opened <= inbox_threads, opened - inbox_threads
    for (payload,) in target.db.query("SELECT payload FROM inbox"):
        stored = json.loads(payload)
        assert isinstance(stored["text"], str), stored
    log = target.serve.log()
    assert "Exception in ASGI application" not in log, log[-4000:]
    with capsys.disabled():
        statuses = dict(sorted(target.statuses.items()))
        print(f"\nfuzz on {target.backend}: {target.sent} requests sent; statuses: {statuses}")
    assert target.sent >= 10_000 * SHARE[target.backend]


def test_a_malformed_polled_update_is_skipped_not_retried_forever(tmp_path: Path) -> None:
    """By long polling a failed update is fetched again; a malformed one would block the bot."""
    config = f"""
default_agent = "demo"
[store]
url = "sqlite:///{tmp_path}/tb.db"
[bridge]
poll_s = 0.1
[agents.demo]
service = "local"
[telegram]
api_base_url = "{{api}}"
poll_timeout_s = 1
"""
    with fake_telegram() as tg:
        serve = ServeProcess(
            tmp_path,
            config.replace("{api}", tg.base_url),
            {"TELEGRAM_BOT_TOKEN": TELEGRAM_BOT_TOKEN},
        )
        serve.start()
        try:
            bad = tg.private_message("from a person with a number for a name")
            bad["message"]["from"] = {**bad["message"]["from"], "first_name": 3, "last_name": []}
            tg.queue_update(bad)
            tg.queue_update(tg.private_message("and a good question after it"))
            deadline = time.monotonic() + 30
            while not any("good question" in m["text"] for m in tg.sent()):
                assert time.monotonic() < deadline, f"{tg.sent()}\n{serve.log()[-3000:]}"
                time.sleep(0.05)
            assert "malformed update" in serve.log()
        finally:
            serve.stop()
