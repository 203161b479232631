"""Benchmark 6 (issue 9): a burst of replies to Telegram, paced to Telegram's limits.

600 messages to the bot in 60 chats (40 private chats, 20 groups; 10 each) are waiting in the
fake Telegram (`tests/fakes/telegram.py` with `Limits()`: 1 message a second per chat in bursts
of 3, 20 a minute per group, 30 a second overall; a message over a limit gets 429 with
`retry_after`) when `threadbridge serve` starts: the Telegram adapter in polling mode, the demo
agent (no network, answers at once), SQLite. So 600 replies are due at once, and the adapter's
pacer decides when each goes. Figures: 429 answers (target 0), and the achieved rate as a share
of the fastest the limits allow for this workload (target ≥ 95%).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.bench.common import DEMO_AGENT, THREADBRIDGE, process, write_config
from tests.bench.table import BenchTable
from tests.fakes.telegram import BOT_TOKEN, BOT_USERNAME, FakeTelegram, Limits, fake_telegram

PRIVATE_CHATS = int(os.environ.get("BENCH_PACING_PRIVATE", "40"))
GROUPS = int(os.environ.get("BENCH_PACING_GROUPS", "20"))
PER_CHAT = int(os.environ.get("BENCH_PACING_PER_CHAT", "10"))
WAIT_S = 180.0
BENCH_6 = "6 Telegram pacing"


def config(tmp_path: Path, api: str) -> Path:
    telegram = f'\n[telegram]\napi_base_url = "{api}"\npoll_timeout_s = 2\n'
    return write_config(tmp_path, "demo", DEMO_AGENT + telegram)


def queue_burst(tg: FakeTelegram) -> dict[int, int]:
    """Queue PER_CHAT messages in each chat; return chat id -> messages queued."""
    chats = [2001 + n for n in range(PRIVATE_CHATS)]
    chats += [-4000000101 - n for n in range(GROUPS)]
    for n in range(PER_CHAT):
        for chat in chats:
            if chat > 0:
                user = {"id": chat, "is_bot": False, "first_name": f"User {chat}"}
                tg.queue_update(tg.private_message(f"question {n}", chat, user))
            else:
                tg.queue_update(tg.group_message(f"@{BOT_USERNAME} question {n}", chat))
    return dict.fromkeys(chats, PER_CHAT)


def fastest_span(per_chat: dict[int, int], limits: Limits) -> float:
    """The shortest time from the first reply to the last that the limits allow."""
    total = sum(per_chat.values())
    spans = [(total - limits.overall_burst) / limits.overall]
    for chat, count in per_chat.items():
        spans.append((count - limits.per_chat_burst) / limits.per_chat)
        if chat < 0:
            spans.append((count - limits.per_group_burst) / (limits.per_group_per_min / 60))
    return max(0.0, *spans)


async def wait_replies(tg: FakeTelegram, count: int) -> list[float]:
    """When each successful sendMessage arrived, once `count` have (or WAIT_S passed)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        sent = [c.at for c in tg.calls_to("sendMessage") if c.status == 200]
        if len(sent) >= count or time.monotonic() > deadline:
            return sorted(sent)
        await asyncio.sleep(0.25)


@pytest.mark.timeout(300)
async def test_telegram_pacing(tmp_path: Path, bench: BenchTable) -> None:
    limits = Limits()
    with fake_telegram(limits=limits) as tg:
        per_chat = queue_burst(tg)
        expected = sum(per_chat.values())
        serve_cmd = [THREADBRIDGE, "serve", "--config", str(config(tmp_path, tg.base_url))]
        env = {"TELEGRAM_BOT_TOKEN": BOT_TOKEN}
        with process([*serve_cmd, "--port", "0"], tmp_path / "serve.log", env):
            sent = await wait_replies(tg, expected)
            tg.close()  # answer the held getUpdates: serve stops without a torn request
        refused = [c for c in tg.calls_to("sendMessage") if c.status == 429]
    span = sent[-1] - sent[0] if len(sent) > 1 else float("nan")
    fastest = fastest_span(per_chat, limits)
    share = 100 * fastest / span if len(sent) >= expected and span > 0 else None
    print(
        f"\nTelegram pacing: {len(sent)}/{expected} replies in {len(per_chat)} chats over "
        f"{span:.1f} s (the limits allow {fastest:.1f} s), {len(refused)} answered 429; "
        f"logs in {tmp_path}"
    )
    bench.record(BENCH_6, "replies posted", len(sent), at_least=expected)
    bench.record(BENCH_6, "429 answers", len(refused), at_most=0)
    bench.record(BENCH_6, "first to last reply", span, "s")
    bench.record(BENCH_6, "rate, share of the limits' fastest", share, "%", at_least=95)
