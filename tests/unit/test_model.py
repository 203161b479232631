from __future__ import annotations

import pytest

from core.model import Author, Inbound, ThreadRef


def test_thread_key_round_trips() -> None:
    ref = ThreadRef("slack", "T0123", "C0456", "1700000000.000100")
    assert ref.key == "slack:T0123/C0456/1700000000.000100"
    assert ThreadRef.parse(ref.key) == ref


def test_thread_key_keeps_slashes_in_the_thread_part() -> None:
    ref = ThreadRef.parse("web:-/-/a/b")
    assert ref.thread == "a/b"


@pytest.mark.parametrize("bad", ["", "web", "web:", "web:-/-", "web:-//x", ":-/-/x"])
def test_thread_key_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="not a thread key"):
        ThreadRef.parse(bad)


def test_inbound_survives_json() -> None:
    inbound = Inbound(
        "e1",
        ThreadRef("telegram", "-", "42", "42"),
        Author("7", "Ann", is_admin=True),
        "hi",
        {"chat_type": "private"},
    )
    assert Inbound.from_json(inbound.to_json()) == inbound
