"""The gateway half of the fake Discord: sessions, sequence numbers, RESUME replay, intents.

`Gateway` serves the WebSocket at /gw for `tests.fakes.discord.FakeDiscord`, which owns the
world (users, guild, channels) and hands it in as a `World`. Everything here runs on the fake's
server loop; the recorded lists are read from tests' threads under a lock.

The wire, as discord.py 2.7 speaks it: the URL carries `?v=10&encoding=json&compress=...`, and
discord.py always asks for transport compression (`zlib-stream`, or `zstd-stream` when
`zstandard` or Python 3.14's `compression.zstd` is importable); there is no switch to turn it
off. Every frame from the server then goes into one compression stream per connection: zlib
with a `Z_SYNC_FLUSH` after each frame (the client waits for the `00 00 ff ff` tail), zstd with
a block flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.websockets import WebSocket

Json = dict[str, Any]

DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE_UPDATE, VOICE_STATE_UPDATE = 0, 1, 2, 3, 4
RESUME, RECONNECT, REQUEST_GUILD_MEMBERS, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 6, 7, 8, 9, 10, 11

GUILDS, GUILD_MEMBERS, GUILD_PRESENCES = 1 << 0, 1 << 1, 1 << 8
GUILD_MESSAGES, GUILD_MESSAGE_REACTIONS, GUILD_MESSAGE_TYPING = 1 << 9, 1 << 10, 1 << 11
DIRECT_MESSAGES, DIRECT_MESSAGE_REACTIONS, DIRECT_MESSAGE_TYPING = 1 << 12, 1 << 13, 1 << 14
MESSAGE_CONTENT = 1 << 15
# A privileged intent is refused (close 4014) unless the application has one of its flags
# (the full one, or the "limited" one that bots in fewer than 100 servers get).
PRIVILEGED = {
    "members": (GUILD_MEMBERS, 1 << 14 | 1 << 15),
    "presences": (GUILD_PRESENCES, 1 << 12 | 1 << 13),
    "message_content": (MESSAGE_CONTENT, 1 << 18 | 1 << 19),
}
_MESSAGES = (GUILD_MESSAGES, DIRECT_MESSAGES)
_REACTIONS = (GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGE_REACTIONS)
# event -> (intent needed for a guild's event, intent needed for a DM's); unlisted: always sent.
_GATED: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE"), _MESSAGES),
    "MESSAGE_DELETE_BULK": _MESSAGES,
    **dict.fromkeys(("MESSAGE_REACTION_ADD", "MESSAGE_REACTION_REMOVE"), _REACTIONS),
    "TYPING_START": (GUILD_MESSAGE_TYPING, DIRECT_MESSAGE_TYPING),
    **dict.fromkeys(("GUILD_MEMBER_ADD", "GUILD_MEMBER_UPDATE"), (GUILD_MEMBERS, 0)),
    "GUILD_MEMBER_REMOVE": (GUILD_MEMBERS, 0),
    "PRESENCE_UPDATE": (GUILD_PRESENCES, 0),
}
for _event in ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE", "CHANNEL_CREATE", "CHANNEL_UPDATE"):
    _GATED[_event] = (GUILDS, 0)
for _event in ("CHANNEL_DELETE", "THREAD_CREATE", "THREAD_UPDATE", "THREAD_DELETE"):
    _GATED[_event] = (GUILDS, 0)
_CONTENT_FIELDS = {"content": "", "embeds": [], "attachments": [], "components": []}
_REPLAY_LIMIT = 1000  # dispatches kept per session for RESUME
_CLOSE_REASONS = {
    4001: "Unknown opcode.",
    4002: "Decode error.",
    4003: "Not authenticated.",
    4004: "Authentication failed.",
    4005: "Already authenticated.",
    4010: "Invalid shard.",
    4012: "Invalid API version.",
    4013: "Invalid intent(s).",
    4014: "Disallowed intent(s).",
}


class World(Protocol):
    """What the gateway needs to know of the fake's state."""

    token: str
    gateway_url: str
    heartbeat_interval: int
    bot_id: str

    def ready(self) -> Json:
        """READY's `d` without the per-session fields (session, shard, guilds)."""
        ...

    def guilds(self) -> list[Json]:
        """Each guild as GUILD_CREATE carries it, as things stand now."""
        ...


@dataclass(frozen=True)
class Resume:
    """One RESUME the fake accepted: the session, the client's last seq, how many it replayed."""

    session_id: str
    seq: int | None
    replayed: int
    at: float


def _compressor(kind: str) -> Callable[[bytes], bytes] | None:
    """One compression stream, as `?compress=` asks; None if unknown or not installed here."""
    if kind == "zlib-stream":
        stream = zlib.compressobj()
        return lambda raw: stream.compress(raw) + stream.flush(zlib.Z_SYNC_FLUSH)
    if kind != "zstd-stream":
        return None
    try:  # the two libraries discord.py decompresses zstd-stream with, in its order
        import zstandard  # type: ignore[import-not-found]

        zstd_stream = zstandard.ZstdCompressor().compressobj()
        block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        return lambda raw: zstd_stream.compress(raw) + zstd_stream.flush(block)
    except ImportError:
        pass
    try:
        from compression.zstd import ZstdCompressor  # type: ignore[import-not-found]
    except ImportError:
        return None
    compressor = ZstdCompressor()
    return lambda raw: compressor.compress(raw, ZstdCompressor.FLUSH_BLOCK)


class _Connection:
    """One WebSocket: frames leave in order through a queue, compressed as the URL asked."""

    def __init__(self, socket: WebSocket, compress: Callable[[bytes], bytes] | None) -> None:
        self.socket, self._compress = socket, compress
        self.session: _Session | None = None
        self.query = dict(socket.query_params)
        self._queue: asyncio.Queue[Json | int | None] = asyncio.Queue()

    def send(self, frame: Json) -> None:
        self._queue.put_nowait(frame)

    def close(self, code: int) -> None:
        """Close with `code` once every frame queued before has gone out."""
        self._queue.put_nowait(code)

    def stop(self) -> None:
        self._queue.put_nowait(None)

    async def write(self) -> None:
        while (item := await self._queue.get()) is not None:
            try:
                if isinstance(item, int):
                    await self.socket.close(code=item, reason=_CLOSE_REASONS.get(item))
                    return
                raw = json.dumps(item, separators=(",", ":"))
                if self._compress is None:
                    await self.socket.send_text(raw)
                else:
                    await self.socket.send_bytes(self._compress(raw.encode()))
            except Exception:  # the client went away: the reader sees it and cleans up
                return


@dataclass
class _Session:
    id: str
    intents: int
    shard: tuple[int, int] | None
    bot_id: str
    seq: int = 0
    frames: list[Json] = field(default_factory=list)
    conn: _Connection | None = None
    dead: bool = False

    def routes(self, guild_id: str | None) -> bool:
        """Whether this shard gets the guild's events (DMs go to shard 0)."""
        if self.shard is None:
            return True
        shard_id, count = self.shard
        return shard_id == (0 if guild_id is None else (int(guild_id) >> 22) % count)

    def wants(self, event: str, guild_id: str | None) -> bool:
        needed = _GATED.get(event, (0, 0))[guild_id is None]
        return needed == 0 or bool(self.intents & needed)

    def view(self, event: str, data: Json, guild_id: str | None) -> Json:
        """What this session sees: without MESSAGE_CONTENT, a guild message that does not
        mention the bot and is not its own comes with content, embeds and files blanked.
        """
        if event not in ("MESSAGE_CREATE", "MESSAGE_UPDATE") or guild_id is None:
            return data
        if self.intents & MESSAGE_CONTENT or (data.get("author") or {}).get("id") == self.bot_id:
            return data
        if any(m.get("id") == self.bot_id for m in data.get("mentions") or []):
            return data
        return {**data, **json.loads(json.dumps(_CONTENT_FIELDS))}

    def push(self, event: str, data: Json) -> None:
        self.seq += 1
        frame = {"t": event, "s": self.seq, "op": DISPATCH, "d": data}
        self.frames = [*self.frames[-_REPLAY_LIMIT + 1 :], frame]
        if self.conn is not None:
            self.conn.send(frame)


class Gateway:
    """The gateway endpoint and its sessions."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._conns: list[_Connection] = []
        self._identifies: list[Json] = []
        self._resumes: list[Resume] = []
        self._other: list[Json] = []  # presence and voice updates, member requests
        self._connections = 0
        self._client_closes: list[int | None] = []

    # -- recorded -----------------------------------------------------------------------------

    @property
    def identifies(self) -> list[Json]:
        with self._lock:
            return list(self._identifies)

    @property
    def resumes(self) -> list[Resume]:
        with self._lock:
            return list(self._resumes)

    @property
    def other_ops(self) -> list[Json]:
        with self._lock:
            return list(self._other)

    @property
    def connections(self) -> int:
        """How many WebSocket connections were accepted so far."""
        with self._lock:
            return self._connections

    @property
    def connected(self) -> int:
        """How many are open now."""
        with self._lock:
            return len(self._conns)

    @property
    def client_closes(self) -> list[int | None]:
        """The code each closed connection ended with, as the client's close frame said
        (None: dropped without one), in order."""
        with self._lock:
            return list(self._client_closes)

    @property
    def live_sessions(self) -> int:
        with self._lock:
            return sum(not s.dead for s in self._sessions.values())

    # -- driven by the fake (on the server loop) ----------------------------------------------

    def dispatch(self, event: str, data: Json) -> int:
        """Send `event` to every live session it is routed to; return how many got it.

        A session whose client is away (reconnecting) keeps it for the RESUME replay.
        """
        data = json.loads(json.dumps(data))  # frozen now: later edits by the test don't leak
        guild_id = data.get("guild_id")
        if event.startswith("GUILD_") and "guild_id" not in data:
            guild_id = data.get("id")
        sent = 0
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.dead]
        for session in sessions:
            if session.routes(guild_id) and session.wants(event, guild_id):
                session.push(event, session.view(event, data, guild_id))
                sent += 1
        return sent

    def reconnect(self) -> int:
        """Send op 7 RECONNECT on every identified connection; the client RESUMEs."""
        return self._each_identified(lambda c: c.send(_frame(RECONNECT, None)))

    def disconnect(self, code: int) -> int:
        """Close every connection with `code`; sessions stay resumable."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            self._detach(conn)
            conn.close(code)
        return len(conns)

    def invalidate(self, resumable: bool = False) -> int:
        """Send op 9 INVALID_SESSION; unless `resumable`, the sessions end (a new IDENTIFY)."""

        def invalidate(conn: _Connection) -> None:
            if conn.session is not None and not resumable:
                conn.session.dead = True
            conn.send(_frame(INVALID_SESSION, resumable))

        return self._each_identified(invalidate)

    def _each_identified(self, act: Callable[[_Connection], None]) -> int:
        with self._lock:
            conns = [c for c in self._conns if c.session is not None]
        for conn in conns:
            act(conn)
            self._detach(conn)  # what is dispatched from now on waits for the RESUME
        return len(conns)

    # -- the endpoint -------------------------------------------------------------------------

    async def endpoint(self, socket: WebSocket) -> None:
        await socket.accept()
        query = socket.query_params
        compress = _compressor(query.get("compress", ""))
        conn = _Connection(socket, compress)
        with self._lock:
            self._conns.append(conn)
            self._connections += 1
        writer = asyncio.create_task(conn.write())
        code: int | None = None
        try:
            if query.get("v") != "10":
                conn.close(4012)
            elif query.get("encoding", "json") != "json" or (
                query.get("compress") and not compress
            ):
                conn.close(4002)
            else:
                conn.send(_frame(HELLO, {"heartbeat_interval": self.world.heartbeat_interval}))
            code = await self._read(conn)
        finally:
            self._gone(conn, code)
            conn.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)

    async def _read(self, conn: _Connection) -> int | None:
        while True:
            try:
                message = await conn.socket.receive()
            except Exception:
                return None
            if message["type"] == "websocket.disconnect":
                return int(message.get("code") or 1000)
            raw = message.get("text") or (message.get("bytes") or b"").decode()
            try:
                payload = json.loads(raw)
                self._on_payload(conn, payload["op"], payload.get("d"))
            except (ValueError, KeyError, TypeError):
                conn.close(4002)

    def _on_payload(self, conn: _Connection, op: int, data: Any) -> None:
        if op == HEARTBEAT:
            conn.send(_frame(HEARTBEAT_ACK, None))
        elif op == IDENTIFY:
            self._identify(conn, data)
        elif op == RESUME:
            self._resume(conn, data)
        elif conn.session is None:
            conn.close(4003)
        elif op == REQUEST_GUILD_MEMBERS:
            self._record_other(op, data)
            self._members_chunk(conn.session, data)
        elif op in (PRESENCE_UPDATE, VOICE_STATE_UPDATE):
            self._record_other(op, data)
        else:
            conn.close(4001)

    def _identify(self, conn: _Connection, data: Json) -> None:
        if data.get("token") != self.world.token:
            return conn.close(4004)
        if conn.session is not None:
            return conn.close(4005)
        shard = data.get("shard")
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            return conn.close(4010)
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents >= 1 << 26:
            return conn.close(4013)
        flags = self.world.ready()["application"]["flags"]
        if any(intents & bit and not flags & allowed for bit, allowed in PRIVILEGED.values()):
            return conn.close(4014)
        session = _Session(
            uuid.uuid4().hex, intents, tuple(shard) if shard else None, self.world.bot_id
        )
        with self._lock:
            self._sessions[session.id] = session
            recorded = {k: v for k, v in data.items() if k != "token"}
            recorded |= {"session_id": session.id, "query": conn.query, "at": time.time()}
            self._identifies.append(recorded)
        self._attach(conn, session)
        guilds = [g for g in self.world.guilds() if session.routes(g["id"])]
        ready = self.world.ready() | {
            "session_id": session.id,
            "resume_gateway_url": self.world.gateway_url,
            "guilds": [{"id": g["id"], "unavailable": True} for g in guilds],
        }
        ready.pop("shard", None)
        if session.shard is not None:
            ready["shard"] = list(session.shard)
        session.push("READY", ready)
        for guild in guilds:
            if session.wants("GUILD_CREATE", guild["id"]):
                session.push("GUILD_CREATE", guild)

    def _resume(self, conn: _Connection, data: Json) -> None:
        if data.get("token") != self.world.token:
            return conn.close(4004)
        with self._lock:
            session = self._sessions.get(str(data.get("session_id")))
        if session is None or session.dead:
            return conn.send(_frame(INVALID_SESSION, False))
        seq = data.get("seq")
        missed = [f for f in session.frames if f["s"] > (seq or 0)]
        if session.conn is not None and session.conn is not conn:
            session.conn.close(4000)  # a RESUME elsewhere takes the session over
        self._attach(conn, session)
        for frame in missed:
            conn.send(frame)
        with self._lock:
            self._resumes.append(Resume(session.id, seq, len(missed), time.time()))
        session.push("RESUMED", {"_trace": ['["gateway-prd-fake",{"micros":0}]']})

    def _members_chunk(self, session: _Session, data: Json) -> None:
        guild_id = str(data.get("guild_id"))
        guild = next((g for g in self.world.guilds() if g["id"] == guild_id), None)
        members = guild["members"] if guild else []
        wanted = {str(u) for u in data.get("user_ids") or []}
        if wanted:
            members = [m for m in members if m["user"]["id"] in wanted]
        chunk = {"guild_id": guild_id, "members": members, "chunk_index": 0, "chunk_count": 1}
        chunk |= {"not_found": [], "nonce": data.get("nonce")}
        session.push("GUILD_MEMBERS_CHUNK", chunk)

    def _record_other(self, op: int, data: Any) -> None:
        with self._lock:
            self._other.append({"op": op, "d": data, "at": time.time()})

    def _attach(self, conn: _Connection, session: _Session) -> None:
        conn.session, session.conn = session, conn

    def _detach(self, conn: _Connection) -> None:
        session, conn.session = conn.session, None
        if session is not None and session.conn is conn:
            session.conn = None

    def _gone(self, conn: _Connection, code: int | None) -> None:
        """The client closed: 1000/1001 ends its session (as Discord does), others keep it."""
        if conn.session is not None and code in (1000, 1001):
            conn.session.dead = True
        self._detach(conn)
        with self._lock:
            self._conns.remove(conn)
            self._client_closes.append(code)


def _frame(op: int, data: Any) -> Json:
    return {"t": None, "s": None, "op": op, "d": data}
