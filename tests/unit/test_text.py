"""core.text: splitting rendered replies at a platform's limit, shared by every adapter."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.text import MIN_LIMIT, fences_balanced, split_text

# -- an oracle for the fence grammar core.text documents --------------------------------

FENCE = re.compile(r"(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})(?P<info>.*)")


def open_fence_at(text: str, pos: int) -> re.Match[str] | None:
    """The opening-line match of the fence a part ending at `pos` is inside of, if any.

    The line `pos` falls in counts only when `pos` is past its visible text: a cut never
    falls inside a fence line.
    """
    line_start = text.rfind("\n", 0, pos) + 1
    line_end = text.find("\n", pos)
    whole = text[line_start : len(text) if line_end < 0 else line_end].rstrip()
    lines = text[:line_start].split("\n")[:-1]
    if text[line_start:pos].rstrip() == whole:
        lines.append(whole)
    opened: re.Match[str] | None = None
    for line in lines:
        match = FENCE.fullmatch(line.rstrip())
        if match is None:
            continue
        marker, info = match["marker"], match["info"]
        if opened is None:
            if not (marker[0] == "`" and "`" in info):
                opened = match
        elif (
            marker[0] == opened["marker"][0]
            and len(marker) >= len(opened["marker"])
            and not info.strip()
        ):
            opened = None
    return opened


def locate(text: str, pos: int, body: str) -> int | None:
    """Where `body` starts in `text` if only whitespace lies between `pos` and it."""
    visible = re.compile(r"\S").search(text, pos)
    if visible is None:
        return None
    start = visible.start() - (len(body) - len(body.lstrip()))
    if not body.strip():
        # Only whitespace (a cut in a code line's indentation): it starts the line.
        start = max(pos, text.rfind("\n", pos, visible.start()) + 1)
    if start < pos or text[pos:start].strip() or not text.startswith(body, start):
        return None
    return start


def assert_reassembles(text: str, parts: list[str]) -> list[tuple[int, int]]:
    """The parts are the text, cut at whitespace, plus the fence lines the splitter added.

    Precisely: removing from each part a first line that reopens the fence open at that point
    of the input (the author's opening line, or its bare marker) and a last line that closes
    the fence open where the part ends (its indentation and marker, or the bare marker)
    leaves bodies b0..bn such that text == w0 + b0 + w1 + b1 + ... + bn + w(n+1), where every
    w is whitespace (possibly empty). So nothing but whitespace at the cuts, and at either end
    of the text, is lost, and the splitter adds nothing but those fence lines. Returns where
    each body lies in the text.
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    pos = 0
    spans = []
    for index, part in enumerate(parts):
        body = part
        reopened = open_fence_at(text, pos) if index else None
        if reopened is not None:
            first, sep, body = part.partition(newline)
            assert sep, (part, pos)
            assert first in (reopened.group(0).rstrip(), reopened["marker"]), (first, part)
        start = locate(text, pos, body)
        last = index == len(parts) - 1
        if start is None or (not last and open_fence_at(text, start + len(body))):
            body, sep, closing = body.rpartition(newline)
            start = locate(text, pos, body)
            assert sep and start is not None, (part, pos, text[pos : pos + len(part) + 40])
            fence = open_fence_at(text, start + len(body))
            assert fence is not None, part
            assert closing in (fence["indent"] + fence["marker"], fence["marker"]), part
        pos = start + len(body)
        spans.append((start, pos))
    assert not text[pos:].strip(), text[pos:]
    return spans


def check(text: str, limit: int) -> list[str]:
    """Split and assert every rule that holds for any text and limit; return the parts."""
    parts = split_text(text, limit)
    assert all(len(part) <= limit for part in parts)
    assert all(part.strip() for part in parts)
    if len(text) > limit:  # (a text that fits comes back as written)
        assert not any(part.endswith("\r") or part.startswith("\n") for part in parts)
    assert all(fences_balanced(part) for part in parts[:-1])
    if parts:
        assert fences_balanced(parts[-1]) == fences_balanced(text)
    assert_reassembles(text, parts)
    return parts


# -- examples ---------------------------------------------------------------------------


def test_a_text_that_fits_comes_back_unchanged() -> None:
    text = "  Hello *world*.\n\n```python\nprint(1)\n"
    assert split_text(text, 100) == [text]
    assert split_text("x" * 16, 16) == ["x" * 16]


@pytest.mark.parametrize("text", ["", " ", "\n\n\t \r\n"])
def test_a_blank_text_gives_no_parts(text: str) -> None:
    assert split_text(text, 100) == []


@pytest.mark.parametrize("limit", [-1, 0, 1, MIN_LIMIT - 1])
def test_a_limit_without_room_for_fence_lines_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        split_text("some text " * 10, limit)


def test_cuts_at_the_paragraph_rather_than_a_later_line() -> None:
    text = "First paragraph, line one.\nline two.\n\nSecond paragraph,\nsome more words here."
    assert check(text, 50) == [
        "First paragraph, line one.\nline two.",
        "Second paragraph,\nsome more words here.",
    ]


def test_cuts_at_a_line_break_when_no_paragraph_fits() -> None:
    text = "alpha beta gamma\ndelta epsilon zeta\neta theta iota"
    assert check(text, 40) == ["alpha beta gamma\ndelta epsilon zeta", "eta theta iota"]


def test_cuts_after_a_sentence_when_no_line_break_fits() -> None:
    text = "One short sentence. Another one here! Is this the third? Yes it is."
    assert check(text, 40) == [
        "One short sentence. Another one here!",
        "Is this the third? Yes it is.",
    ]


def test_cuts_after_a_cjk_sentence_end_without_a_space() -> None:
    text = "我是一个学生。我喜欢学习中文！你呢？我们一起学习吧。"  # noqa: RUF001
    assert check(text, 20) == ["我是一个学生。我喜欢学习中文！你呢？", "我们一起学习吧。"]  # noqa: RUF001


def test_a_numbered_list_marker_is_not_a_sentence_end() -> None:
    text = "Steps to follow today\n1. first step to do\n2. second"
    assert check(text, 30) == ["Steps to follow today", "1. first step to do\n2. second"]


def test_cuts_at_a_space_when_no_sentence_ends() -> None:
    text = "the quick brown fox jumps over the lazy dog and keeps running"
    assert check(text, 20) == [
        "the quick brown fox",
        "jumps over the lazy",
        "dog and keeps",
        "running",
    ]


def test_cuts_anywhere_when_there_is_no_space() -> None:
    assert check("a" * 40, 16) == ["a" * 16, "a" * 16, "a" * 8]


def test_a_hard_cut_never_splits_a_surrogate_pair_crlf_or_emoji() -> None:
    surrogates = "\ud83d\ude00" * 20  # as from text decoded with surrogatepass
    assert all(len(part) % 2 == 0 for part in check(surrogates, 17))
    crlf = "x\r\n" * 20
    assert not any(part.endswith("\r") for part in check(crlf, 16))
    thumbs = "👍🏽" * 20
    assert check(thumbs, 17) == ["👍🏽" * 8, "👍🏽" * 8, "👍🏽" * 4]
    family = "👨\u200d👩\u200d👧" * 6  # a ZWJ sequence is one grapheme
    assert all(part.startswith("👨") and part.endswith("👧") for part in check(family, 16))


def test_a_part_inside_a_fence_is_closed_and_the_next_reopened() -> None:
    code = "\n".join(f"line_{n} = {n}" for n in range(6))
    text = f"Look:\n\n```python\n{code}\n```\n\nDone."
    # "Look:" alone would fill under a third of the part: the cut goes into the code instead.
    assert check(text, 60) == [
        "Look:\n\n```python\nline_0 = 0\nline_1 = 1\nline_2 = 2\n```",
        "```python\nline_3 = 3\nline_4 = 4\nline_5 = 5\n```\n\nDone.",
    ]


def test_a_fence_is_kept_whole_when_the_part_before_it_is_full_enough() -> None:
    code = "\n".join(f"line_{n} = {n}" for n in range(5))
    text = f"Look at this piece of code below:\n\n```python\n{code}\n```\n\nDone."
    assert check(text, 80) == [
        "Look at this piece of code below:",
        f"```python\n{code}\n```\n\nDone.",
    ]


def test_tilde_and_long_fences_reopen_with_the_same_line() -> None:
    text = "~~~~ sh\n" + "\n".join(f"echo {n}" for n in range(12)) + "\n~~~~"
    parts = check(text, 50)
    assert len(parts) > 1
    assert all(p.startswith("~~~~ sh\n") and p.endswith("\n~~~~") for p in parts)


def test_a_fence_line_inside_a_list_item_keeps_its_indentation() -> None:
    text = "1. Run:\n   ```bash\n" + "\n".join(f"   step {n}" for n in range(9)) + "\n   ```"
    parts = check(text, 60)
    assert parts[1].startswith("   ```bash\n   step")
    assert parts[0].endswith("\n   ```")


def test_an_unclosed_fence_at_the_end_stays_open_only_in_the_last_part() -> None:
    text = "Intro text.\n\n```js\n" + "\n".join(f"let v{n} = {n};" for n in range(10))
    parts = check(text, 60)
    assert [fences_balanced(part) for part in parts] == [True] * (len(parts) - 1) + [False]
    assert parts[-1].startswith("```js\n")


def test_a_long_info_string_is_reopened_as_the_bare_marker() -> None:
    text = "```python-console\n" + "\n".join([">>> x = 1"] * 8) + "\n```"
    parts = check(text, 40)
    assert parts[0].startswith("```python-console\n>>> x = 1\n")
    assert all(part.startswith("```\n>>> x = 1\n") for part in parts[1:])


def test_an_opening_line_longer_than_the_limit_loses_only_its_info_string() -> None:
    text = "Intro.\n```a-very-long-info-string-here\n" + "\n".join(["x = 1"] * 8) + "\n```"
    parts = split_text(text, 24)
    assert parts[0] == "Intro."
    assert all(part.startswith("```\nx = 1") and fences_balanced(part) for part in parts[1:])
    assert "".join(parts[1:]).count("x = 1") == 8


def test_a_backtick_line_with_backticks_after_it_is_not_a_fence() -> None:
    assert fences_balanced("```inline``` is code, not a fence")
    assert fences_balanced("```py\nx\n```\n~~~\ny\n~~~")
    assert not fences_balanced("```py\nx\n~~~\n")
    assert not fences_balanced("````\nx\n```\n")


def test_crlf_text_gets_crlf_fence_lines() -> None:
    text = "```py\r\n" + "print(1)\r\n" * 10 + "```\r\n"
    parts = check(text, 50)
    assert all(p.startswith("```py\r\n") and p.endswith("\r\n```") for p in parts)


# -- a realistic long answer ------------------------------------------------------------

PROSE = (
    "The bridge keeps one conversation per thread. Each reply is rendered for the platform "
    "first and then split, so that no part is ever longer than the platform allows! Why does "
    "this matter? Because a message over the limit is rejected outright."
)


def long_answer() -> str:
    """About 10,000 characters: prose, a long Python fence, prose, a long shell fence."""
    python = "\n".join(
        f"def handler_{n}(event: dict[str, str]) -> str:\n"
        f'    """Answer event number {n}."""\n'
        f'    return event.get("text", "") + "{n}"\n'
        for n in range(30)
    )
    shell = "\n".join(f"curl -s https://example.test/api/{n} | jq '.items[{n}]'" for n in range(60))
    paragraphs = [PROSE] * 6
    text = "\n\n".join(
        [
            "## Overview",
            *paragraphs,
            f"```python\n{python}```",
            *paragraphs[:4],
            f"```bash\n{shell}\n```",
            *paragraphs[:3],
        ]
    )
    assert 9_500 <= len(text) <= 10_500, len(text)
    return text


@pytest.mark.parametrize("limit", [3_000, 2_000, 4_096])
def test_a_long_answer_with_two_code_fences(limit: int) -> None:
    text = long_answer()
    parts = check(text, limit)
    assert len(parts) <= math.ceil(len(text) / limit) + 1
    # Lines here are short, so every cut falls at a line break or a blank line.
    spans = assert_reassembles(text, parts)
    assert all(text[end] == "\n" for _, end in spans[:-1])
    assert all(text[start - 1] == "\n" for start, _ in spans[1:])
    assert "".join(parts).count("def handler_") == 30
    for part in parts:
        if "def handler_" in part:
            assert part.startswith("```python\n") or "\n```python\n" in part
        if "curl -s" in part:
            assert part.startswith("```bash\n") or "\n```bash\n" in part


# -- properties -------------------------------------------------------------------------

WORD = st.one_of(
    st.sampled_from(
        [
            "the",
            "agent",
            "naïve",
            "Straße",
            "😀",
            "👍🏽",
            "🇫🇷",
            "中文",
            "日本語です",
            "a_b",
            "**b**",
        ]
    ),
    st.text(
        st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters="\x85"),
        min_size=1,
        max_size=12,
    ),
    st.just("x" * 40),
)
SENTENCE = st.builds(
    lambda words, end: " ".join(words) + end,
    st.lists(WORD, min_size=1, max_size=8),
    st.sampled_from(["", ".", "!", "?", "。", "！", "？", ":"]),  # noqa: RUF001
)


def short_fence_lines(line: str) -> str:
    """Keep a line that reads as a fence line short enough for the smallest limit.

    A fence line too long for a part loses its info string by design (an example covers it),
    which the reassembly check does not allow for.
    """
    return "x" + line if FENCE.fullmatch(line.rstrip()) and len(line) > 8 else line


LINE = st.builds(" ".join, st.lists(SENTENCE, min_size=1, max_size=3)).map(short_fence_lines)
PARAGRAPH = st.builds("\n".join, st.lists(LINE, min_size=1, max_size=4))
CODE_LINE = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x85\u2028\u2029"), max_size=30),
    st.sampled_from(["", "    return x", "\tif y:", "``", "~~~", "```", "# comment. Two."]),
).map(short_fence_lines)


FENCE_LINES = [
    (indent + marker, info)
    for indent in ("", "  ", "   ")
    for marker in ("```", "~~~", "````", "~~~~~")
    for info in ("", "python", " js", "sh a=1", "日本")
]


@st.composite
def fenced(draw: st.DrawFn, limit: int, closed: bool = True) -> str:
    """A fenced block whose fence lines (with CRLF breaks) leave room for code in a part.

    Longer fence lines lose their info string by design: an example test covers that.
    """
    fits = [(fence, info) for fence, info in FENCE_LINES if 2 * len(fence) + len(info) <= limit - 6]
    fence, info = draw(st.sampled_from(fits))
    code = draw(st.lists(CODE_LINE, max_size=12))
    lines = [fence + info, *code]
    if closed:
        lines.append(fence)
    return "\n".join(lines)


@st.composite
def markdown(draw: st.DrawFn, limit: int = 240) -> str:
    """Paragraphs and fenced blocks, maybe ending inside a fence, maybe with CRLF breaks."""
    block = st.one_of(PARAGRAPH, PARAGRAPH, fenced(limit))
    blocks = draw(st.lists(block, min_size=1, max_size=7))
    if draw(st.booleans()):
        blocks.append(draw(fenced(limit, closed=False)))
    text = ""
    for block_text in blocks:
        text += block_text + draw(st.sampled_from(["\n\n", "\n", "\n\n\n", " \n\n"]))
    text = text.rstrip("\n") if draw(st.booleans()) else text
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return draw(st.sampled_from(["", "\n", "  "])) + text


LIMIT_AND_TEXT = st.integers(MIN_LIMIT, 240).flatmap(
    lambda limit: st.tuples(st.just(limit), markdown(limit))
)
# Sized to keep this file near five seconds; raise max_examples locally to search harder.
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(case=LIMIT_AND_TEXT)
def test_parts_fit_are_balanced_and_reassemble(case: tuple[int, str]) -> None:
    limit, text = case
    check(text, limit)


@settings(PROPERTY, max_examples=80)
@given(text=markdown(), slack=st.integers(0, 50))
def test_a_text_under_the_limit_is_returned_unchanged(text: str, slack: int) -> None:
    limit = max(MIN_LIMIT, len(text) + slack)
    assert split_text(text, limit) == ([text] if text.strip() else [])


@settings(PROPERTY, max_examples=100)
@given(
    words=st.lists(st.text("abcdefgh", min_size=1, max_size=5), min_size=1, max_size=300),
    seps=st.lists(st.sampled_from([" ", " ", " ", "\n", "\n\n"]), min_size=300, max_size=300),
    limit=st.integers(MIN_LIMIT, 200),
)
def test_parts_of_short_words_are_never_tiny(words: list[str], seps: list[str], limit: int) -> None:
    text = "".join(word + sep for word, sep in zip(words, seps, strict=False)).strip()
    parts = check(text, limit)
    assert all(len(part) >= limit // 3 for part in parts[:-1])
