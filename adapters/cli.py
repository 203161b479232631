"""`threadbridge chat`: talk to an agent from the terminal, source `cli`."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Callable

from core.bridge import Bridge
from core.errors import MessageRejected
from core.model import Author, Inbound, Reply, ThreadRef

SOURCE = "cli"
HELP = "Type a message and press Enter. /new starts a fresh conversation, /quit (or Ctrl-D) ends."


class TerminalAdapter:
    """Reads lines from stdin, prints the agent's replies as they are posted."""

    source = SOURCE
    working_every_s: float | None = None

    def __init__(
        self,
        thread: str | None = None,
        user: str = "you",
        write: Callable[[str], None] | None = None,
        agent: str | None = None,
    ) -> None:
        self.thread = ThreadRef(SOURCE, "-", "-", thread or uuid.uuid4().hex[:12])
        self.user = user
        self.agent = agent  # every conversation this terminal opens goes to it (after /new too)
        self.bridge: Bridge | None = None
        self._write = write or _print
        self._waiting = 0
        self._answered = asyncio.Event()

    async def start(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def stop(self) -> None:
        return None

    async def post(self, reply: Reply) -> list[str]:
        if reply.thread != self.thread:
            # An answer left from an earlier session's thread: it is stored, and shown by
            # `threadbridge chat --thread ID` or `conversations show`; not printed here.
            return [f"cli:{uuid.uuid4().hex}"]
        prefix = "!" if reply.kind == "notice" else "agent"
        self._write(f"\n{prefix}> {reply.text}\n")
        self._waiting = max(0, self._waiting - 1)
        if self._waiting == 0:
            self._answered.set()
        return [f"cli:{uuid.uuid4().hex}"]

    async def show_working(self, thread: ThreadRef) -> None:
        self._write("(the agent is working…)")

    async def send(self, text: str) -> bool:
        """Submit one line; False when it was not sent (empty, too long)."""
        assert self.bridge is not None
        inbound = Inbound(
            event_id=f"cli:{uuid.uuid4().hex}",
            thread=self.thread,
            author=Author(id=self.user, name=self.user),
            text=text,
            data={"thread_id": self.thread.thread, "user_name": self.user},
        )
        try:
            self.bridge.check(text)
            await self._open_with_agent(inbound)
            await self.bridge.submit(inbound)
        except MessageRejected as exc:
            self._write(f"! {exc.reason}")
            return False
        self._waiting += 1
        self._answered.clear()
        return True

    async def _open_with_agent(self, inbound: Inbound) -> None:
        """Open the thread's conversation with the chosen agent, whatever the routes say."""
        assert self.bridge is not None
        store = self.bridge.store
        if self.agent is not None and await store.conversation_for_thread(self.thread.key) is None:
            await store.open_conversation(self.thread, self.agent, inbound.data, self.user)

    async def wait_answer(self, timeout: float) -> bool:
        """Wait until every sent message has had its reply; False on timeout."""
        try:
            await asyncio.wait_for(self._answered.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def repl(self, reply_timeout: float = 300.0) -> None:
        """Read, send, print — until /quit or end of input."""
        assert self.bridge is not None
        self._write(HELP)
        stdin = StdinReader(f"{self.user}> ")
        while True:
            line = await stdin.next_line()
            if line is None or line.strip() in ("/quit", "/exit"):
                return
            if line.strip() == "/new":
                await self.bridge.new_conversation(self.thread)
                self._write("(a new conversation starts with your next message)")
            elif await self.send(line) and not await self.wait_answer(reply_timeout):
                self._write("! no answer yet; it will be kept and shown in the admin search")


class StdinReader:
    """Reads stdin on a daemon thread, one line per request, so that Ctrl-C or the end of
    the program never waits for a blocked `input()` (an executor thread would be joined)."""

    def __init__(self, prompt: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._wanted = threading.Semaphore(0)
        self._prompt = prompt
        threading.Thread(target=self._read, name="stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            self._wanted.acquire()  # prompt only once the previous answer is printed
            line = _prompt(self._prompt)
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)
            if line is None:
                return

    async def next_line(self) -> str | None:
        """The next line typed; None at the end of input."""
        self._wanted.release()
        return await self._lines.get()


def _prompt(text: str) -> str | None:
    try:
        return input(text) if sys.stdin.isatty() else _read_line()
    except EOFError:
        return None


def _read_line() -> str | None:
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _print(text: str) -> None:
    print(text, flush=True)
