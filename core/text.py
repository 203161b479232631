"""Split a rendered reply into parts that fit a platform's length limit.

Each adapter renders the agent's Markdown to its platform's format first and then calls
`split_text` with its limit; the rules for where to cut live here, once for every platform.

Cuts are made, best first, at a blank line (or beside a fence line), at a line break, after a
sentence end, at a space, and only then anywhere (never inside a surrogate pair, a `\\r\\n` or,
when it can be helped, a grapheme such as an emoji sequence). The furthest cut of the best kind
wins unless it fills under a third of the part. A part that has to end inside a code fence is
closed with a fence line and the next part reopens it with the same opening line; when that
line would take over half the limit, the bare marker reopens it instead.

Fences are recognised in Markdown and Slack mrkdwn (lines of three or more backticks or tildes,
at any indentation so that fences inside list items count). Only at absurdly small limits,
next to a fence line about as long as the limit itself, does a part lose a fence's info string
or come out unbalanced.

The boundaries (`find_cuts`), the choice among them (`best_cut`) and the test for a cut between
two characters (`can_cut`) are public for splitters of other formats: Telegram's HTML splitter
keeps tags balanced itself but cuts where this module would.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace

MIN_LIMIT = 16
"""The smallest limit accepted: room for a fence line on either side and some text."""

# Cut ranks, best first; a hard cut falls between any two characters, a raw one even inside
# a fence line (when that line alone is too long for a part).
_PARAGRAPH, _LINE, _SENTENCE, _SPACE, _HARD, _RAW = 4, 3, 2, 1, 0, -1
# How usable a cut is: a poor one leaves an empty code block, so it is a last resort.
_POOR, _FINE = 0, 1

_FENCE_LINE = re.compile(r"(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})(?P<info>.*)")
_FENCE_START = re.compile(r"[ \t]*(?:```|~~~)")
_WHITESPACE = re.compile(r"\s+")
_NOT_SPACE = re.compile(r"\S")
# The CJK full stop and full-width ! and ? (escaped: ruff flags the look-alikes).
_CJK_ENDS = "\u3002\uff01\uff1f"
_CJK_SENTENCE_END = re.compile(f"[{_CJK_ENDS}]" + r"(?=\S)")
# "1. " opens a numbered list item; the space after it is not a sentence end.
_LIST_NUMBER = re.compile(r"^[ \t]*\d{1,9}[.)]", re.MULTILINE)
_SENTENCE_ENDS = ".!?" + _CJK_ENDS
# Characters that belong to the grapheme before them: a hard cut never falls just before one.
_JOINERS = re.compile(r"[\u200d\ufe00-\ufe0f\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f]")
_REGIONAL_INDICATOR = re.compile(r"[\U0001f1e6-\U0001f1ff]")


@dataclass(frozen=True)
class _Fence:
    """A fenced code block, by offsets into the text."""

    opening: str  # the opening line as written, without its line break
    closing: str  # a line that closes it: the same indentation and marker
    marker: str
    start: int  # the opening line starts here
    body: int  # the opening line's text ends here
    content: int  # the first character of code that is not whitespace (or `end`)
    end: int  # the closing line starts here (len(text) when the author never closed it)
    closed: int  # the closing line's text ends here (len(text) when never closed)


@dataclass(frozen=True)
class Cut:
    """A place to cut: the part ends at `end`, the next one starts at `start`.

    `rank` orders boundaries, best first: a paragraph, a line, a sentence, a space, and below
    those cuts that fall between any two characters.
    """

    end: int
    start: int
    rank: int


@dataclass(frozen=True)
class _Doc:
    """The text with everything the splitter looks up more than once."""

    text: str
    limit: int
    newline: str
    fences: tuple[_Fence, ...]
    fence_starts: tuple[int, ...]
    line_starts: tuple[int, ...]
    cuts: tuple[Cut, ...] = ()
    cut_ends: tuple[int, ...] = ()


def split_text(text: str, limit: int) -> list[str]:
    """Split `text` into parts of at most `limit` characters, in order.

    Nothing is lost but whitespace at the cut points (and at either end of the text). A text
    that fits is returned unchanged as the only part; a blank text gives no parts. A code
    fence the author left open at the very end stays open in the last part.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters, got {limit}")
    if not text.strip():
        return []
    if len(text) <= limit:
        return [text]
    doc = _scan(text, limit)
    parts: list[str] = []
    pos = _part_start(text, 0)
    while pos < len(text):
        opening, _ = _wrapper(doc, _open_fence(doc, pos))
        prefix = opening + doc.newline if opening else ""
        rest = text[pos:].rstrip()
        if len(prefix) + len(rest) <= limit:
            parts.append(prefix + rest)
            break
        cut = _next_cut(doc, pos, len(prefix))
        if cut.rank == _RAW and _past_long_opening(doc, pos) != pos:
            pos = _past_long_opening(doc, pos)
            continue
        _, closing = _wrapper(doc, _open_fence(doc, cut.end))
        suffix = doc.newline + closing if closing else ""
        parts.append(prefix + text[pos : cut.end] + suffix)
        pos = _part_start(text, cut.start)
    return parts


def fences_balanced(text: str) -> bool:
    """Whether every code fence opened in `text` is closed again."""
    return all(fence.end < len(text) for fence in _find_fences(text))


def find_cuts(
    text: str,
    block_edges: Collection[int] = (),
    in_code: Callable[[int], bool] | None = None,
) -> list[Cut]:
    """Every soft cut in `text`, ordered by where the part before it would end.

    A cut is a run of whitespace (dropped, but for the indentation of the line after it) or
    a CJK sentence end without a space. A line break ranks as a paragraph when it is one of
    several or touches an offset in `block_edges` (where a code block's first line starts or
    its last line ends); a sentence end where `in_code(offset)` holds ranks as a space.
    """
    list_numbers = {m.end() for m in _LIST_NUMBER.finditer(text)}
    cuts = []
    for run in _WHITESPACE.finditer(text):
        begin, end = run.span()
        if begin == 0 or end == len(text):
            continue
        breaks = text.count("\n", begin, end)
        if breaks:
            start = text.rindex("\n", begin, end) + 1
            beside_block = start in block_edges or begin in block_edges
            rank = _PARAGRAPH if breaks > 1 or beside_block else _LINE
        else:
            start = end
            sentence = text[begin - 1] in _SENTENCE_ENDS and begin not in list_numbers
            code = in_code is not None and in_code(begin)
            rank = _SENTENCE if sentence and not code else _SPACE
        cuts.append(Cut(begin, start, rank))
    for mark in _CJK_SENTENCE_END.finditer(text):
        if in_code is None or not in_code(mark.end()):
            cuts.append(Cut(mark.end(), mark.end(), _SENTENCE))
    return sorted(cuts, key=lambda cut: cut.end)


def best_cut(cuts: Iterable[Cut], size: Callable[[int], int], limit: int) -> Cut | None:
    """The cut to end a part at, of `cuts` that all fit in it; None when there are none.

    The furthest cut of the best rank wins unless the part it ends (`size(cut.end)`
    characters long) fills under a third of `limit`: then the furthest of the next rank down
    that does, and failing all, the best rank's furthest cut.
    """
    cuts = list(cuts)
    enough = limit // 3
    for floor in (_PARAGRAPH, _LINE, _SENTENCE, _SPACE):
        best = max((c for c in cuts if c.rank >= floor), key=lambda c: c.end, default=None)
        if best is not None and size(best.end) >= enough:
            return best
    return max(cuts, key=lambda c: (c.rank, c.end), default=None)


# -- scanning ---------------------------------------------------------------------------


def _scan(text: str, limit: int) -> _Doc:
    fences = tuple(_find_fences(text))
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = (0, *(m.end() for m in re.finditer("\n", text)))
    doc = _Doc(text, limit, newline, fences, tuple(f.start for f in fences), lines)
    fence_lines = {f.start for f in fences} | {f.closed for f in fences}
    cuts = tuple(find_cuts(text, fence_lines, lambda pos: _inside_code(doc, pos)))
    return replace(doc, cuts=cuts, cut_ends=tuple(c.end for c in cuts))


def _find_fences(text: str) -> list[_Fence]:
    """Every fenced code block, CommonMark-style but at any indentation."""
    fences: list[_Fence] = []
    opened: tuple[re.Match[str], int, int] | None = None
    offset = 0
    for line in text.split("\n"):
        line_end = offset + len(line.rstrip())
        match = _FENCE_LINE.fullmatch(line.rstrip())
        if opened is None and match and _opens(match):
            opened = (match, offset, line_end)
        elif opened is not None and match and _closes(opened[0], match):
            fences.append(_fence(text, *opened, end=offset, closed=line_end))
            opened = None
        offset += len(line) + 1
    if opened is not None:
        fences.append(_fence(text, *opened, end=len(text), closed=len(text)))
    return fences


def _opens(match: re.Match[str]) -> bool:
    # A backtick fence's info string may not hold a backtick (CommonMark): "```x```" is code.
    return not (match["marker"][0] == "`" and "`" in match["info"])


def _closes(opening: re.Match[str], match: re.Match[str]) -> bool:
    marker = match["marker"]
    return (
        marker[0] == opening["marker"][0]
        and len(marker) >= len(opening["marker"])
        and not match["info"].strip()
    )


def _fence(text: str, match: re.Match[str], start: int, body: int, end: int, closed: int) -> _Fence:
    code = _NOT_SPACE.search(text, body, end)
    return _Fence(
        opening=match.group(0).rstrip(),
        closing=match["indent"] + match["marker"],
        marker=match["marker"],
        start=start,
        body=body,
        content=code.start() if code else end,
        end=end,
        closed=closed,
    )


# -- choosing a cut ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """A part being cut: it starts at `pos` after `prefix` characters of reopening fence."""

    doc: _Doc
    pos: int
    prefix: int
    first: int  # the first character from `pos` on that is not whitespace

    def size(self, end: int) -> int:
        """The part's length if it ends at `end`, with the line closing a fence left open."""
        doc = self.doc
        _, closing = _wrapper(doc, _open_fence(doc, end))
        return self.prefix + (end - self.pos) + (len(doc.newline) + len(closing) if closing else 0)


def _next_cut(doc: _Doc, pos: int, prefix: int) -> Cut:
    """Where the part that starts at `pos` ends: the best boundary that fills it enough."""
    part = _Part(doc, pos, prefix, _first_visible(doc.text, pos))
    lo, hi = bisect_right(doc.cut_ends, pos), bisect_right(doc.cut_ends, pos + doc.limit)
    fitting = [c for c in doc.cuts[lo:hi] if part.size(c.end) <= doc.limit]
    usable = [(c, _usable(part, c.end, c.start)) for c in fitting]
    good = [c for c, use in usable if use == _FINE]
    best = best_cut(good, part.size, doc.limit)
    if best is not None:
        return best
    poor = [c for c, use in usable if use == _POOR]
    return (
        _hard_cut(part, _FINE)
        or max(poor, key=lambda c: c.end, default=None)
        or _hard_cut(part, _POOR)
        or _raw_cut(part)
    )


def _usable(part: _Part, end: int, start: int) -> int | None:
    """Whether a part may end at `end` and the next start at `start`.

    None when a cut falls inside a fence line or the part would be blank; `_POOR` when it
    would leave an empty code block (a cut just after an opening line or just before a
    closing one, or only whitespace after a reopening line); `_FINE` otherwise.
    """
    doc = part.doc
    if _in_fence_line(doc, end) or _in_fence_line(doc, start) or _forges_fence(part, end, start):
        return None
    if end <= part.first:
        return _POOR if part.prefix else None
    fence = _open_fence(doc, end)
    if fence is not None and fence.start >= part.pos and end <= fence.content:
        return _POOR
    after = _fence_before(doc, start)
    if after is not None and after.end == start < len(doc.text):
        return _POOR
    return _FINE


def _hard_cut(part: _Part, wanted: int) -> Cut | None:
    """The furthest cut between two characters that fits, kept off graphemes when it can."""
    text, pos = part.doc.text, part.pos
    top = min(len(text) - 1, pos + part.doc.limit - part.prefix)
    for careful, bottom in ((True, max(pos, top - 64)), (False, pos)):
        for end in range(top, bottom, -1):
            if not can_cut(text, end, careful) or part.size(end) > part.doc.limit:
                continue
            use = _usable(part, end, end)
            if use is not None and use >= wanted:
                return Cut(end, end, _HARD)
    return None


def _raw_cut(part: _Part) -> Cut:
    # Reached only when a fence line is too long for a part: cut it as plain text.
    text, pos = part.doc.text, part.pos
    end = max(pos + 1, min(len(text) - 1, pos + part.doc.limit - part.prefix))
    while end > pos + 1 and (
        not can_cut(text, end, careful=False) or part.size(end) > part.doc.limit
    ):
        end -= 1
    return Cut(end, end, _RAW)


def can_cut(text: str, pos: int, careful: bool = True) -> bool:
    """Whether a cut may fall between text[pos - 1] and text[pos].

    Never inside a `\\r\\n` or a surrogate pair; when `careful`, not inside an emoji sequence,
    a flag or before a combining mark either.
    """
    before, after = text[pos - 1], text[pos]
    if (before, after) == ("\r", "\n") or ("\ud800" <= before <= "\udbff" <= after <= "\udfff"):
        return False
    if not careful:
        return True
    joined = _JOINERS.match(after) or before == "\u200d" or unicodedata.combining(after)
    flag = _REGIONAL_INDICATOR.match(before) and _REGIONAL_INDICATOR.match(after)
    return not (joined or flag)


def _first_visible(text: str, pos: int) -> int:
    found = _NOT_SPACE.search(text, pos)
    return found.start() if found else len(text)


# -- fences around a position -----------------------------------------------------------


def _fence_before(doc: _Doc, pos: int) -> _Fence | None:
    """The last fence whose opening line starts before `pos`."""
    index = bisect_left(doc.fence_starts, pos) - 1
    return doc.fences[index] if index >= 0 else None


def _open_fence(doc: _Doc, pos: int) -> _Fence | None:
    """The fence a part ending (or starting) at `pos` is inside of, if any."""
    fence = _fence_before(doc, pos)
    return fence if fence is not None and fence.body <= pos <= fence.end else None


def _inside_code(doc: _Doc, pos: int) -> bool:
    fence = _fence_before(doc, pos)
    return fence is not None and fence.body < pos < fence.end


def _in_fence_line(doc: _Doc, pos: int) -> bool:
    fence = _fence_before(doc, pos)
    return fence is not None and (fence.start < pos < fence.body or fence.end < pos < fence.closed)


def _forges_fence(part: _Part, end: int, start: int) -> bool:
    """Whether a cut in the middle of a line leaves a piece that reads as a fence line.

    "Use ```x``` here" is prose, but cut at its first space the next part would open a fence
    with "```x``` here"; a code line "~~~ js" cut at its space would end a part with "~~~".
    """
    doc = part.doc
    head = max(part.pos, _line_start(doc, end))
    head_end = _line_end(doc, end)
    if _fence_like(doc.text, head, end) and doc.text[end:head_end].strip():
        return True
    return start != _line_start(doc, start) and _fence_like(doc.text, start, _line_end(doc, start))


def _fence_like(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] reads as a fence line (checked cheaply first: lines are long)."""
    return bool(_FENCE_START.match(text, start, end)) and bool(
        _FENCE_LINE.fullmatch(text[start:end].rstrip())
    )


def _line_start(doc: _Doc, pos: int) -> int:
    return doc.line_starts[bisect_right(doc.line_starts, pos) - 1]


def _line_end(doc: _Doc, pos: int) -> int:
    """Where the line holding `pos` ends (its line break, or the end of the text)."""
    line = bisect_right(doc.line_starts, pos)
    return doc.line_starts[line] - 1 if line < len(doc.line_starts) else len(doc.text)


def _wrapper(doc: _Doc, fence: _Fence | None) -> tuple[str, str]:
    """The lines that reopen and close `fence` around a part, or ("", "") for none.

    The author's opening line is repeated when both lines take at most half the limit;
    otherwise the bare marker (dropping the info string) while that leaves room for code.
    """
    if fence is None:
        return "", ""
    breaks = 2 * len(doc.newline)
    if len(fence.opening) + len(fence.closing) + breaks <= doc.limit // 2:
        return fence.opening, fence.closing
    if 2 * len(fence.marker) + breaks <= doc.limit - 2:
        return fence.marker, fence.marker
    return "", ""


def _past_long_opening(doc: _Doc, pos: int) -> int:
    """Past the fence opening line at `pos`, which leaves a part no room to close the fence.

    The next part opens the fence with its bare marker instead, as a reopening part does: the
    info string is the one thing besides whitespace the splitter drops, and only here. A
    fence the author never closed and never wrote code into is left to be cut as text.
    """
    fence = _fence_before(doc, pos + 1)
    if fence is None or fence.start != pos or fence.content == len(doc.text):
        return pos
    return _part_start(doc.text, fence.body)


def _part_start(text: str, pos: int) -> int:
    """Where a part at `pos` begins: past blank lines, but keeping the line's indentation."""
    run = _WHITESPACE.match(text, pos)
    if run is None:
        return pos
    if run.end() == len(text):
        return len(text)
    if "\n" not in run.group(0):
        return pos
    return text.rindex("\n", pos, run.end()) + 1
