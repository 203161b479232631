"""Render an agent's Markdown as Telegram HTML, and split it at Telegram's length limit.

Telegram's HTML parse mode knows a few tags and the entities `&lt;`, `&gt;`, `&amp;` and
`&quot;`; an unknown tag or entity, or a tag left open, gets the whole message rejected. So
agent text is escaped everywhere and the only tags written are built here: b, i, s, code, pre,
a and blockquote, nested as Telegram allows (nothing inside code, no code or link inside a
link, no quote inside a quote). Inline tags open and close on one line; a code block or a
quote closes where its block ends.

Splitting keeps every part valid on its own: a part that ends inside tags closes them, and
the next part reopens them with the same attributes. Where to cut is `core.text`'s choice,
made over the HTML with tags and entities kept whole.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from html import unescape

from core.text import MIN_LIMIT, Cut, best_cut, can_cut, find_cuts

LIMIT = 4096
"""Telegram's limit on a message's text (a caption's is 1,024)."""

RULE = "———"
"""What a horizontal rule (`---`, `***`, `___`) becomes: Telegram has none."""

_FENCE = re.compile(r"(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})(?P<info>.*)")
# A language name short and plain enough to go into a class attribute as it is.
_LANGUAGE = re.compile(r"[A-Za-z0-9_+#.-]{1,32}")
_TABLE_DELIMITER = re.compile(r"[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*")
_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*")
_RULE_LINE = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*")
_BULLET = re.compile(r"(?P<indent>[ \t]*)[-*+][ \t]+(?P<text>.*)")
_QUOTE = re.compile(r"[ \t]{0,3}>[ \t]?(?P<text>.*)")

# Inline: the places where something other than plain text may start.
_SPECIAL = re.compile(r"\\[!-/:-@\[-`{-~]|`+|!?\[|<|(?<![\w/])(?:https?|tg)://|\*+|_+|~+")
_AUTOLINK = re.compile(r"<(?P<url>[A-Za-z][A-Za-z0-9+.\-]{1,31}:[^\s<>]*)>")
_EMAIL = re.compile(r"<(?P<address>[^\s<>@]+@[^\s<>@]+\.[^\s<>@]+)>")
_BARE_URL = re.compile(r"(?:https?|tg)://[^\s<>]*")
_LINKABLE = re.compile(r"(?:https?://|tg://|mailto:)\S", re.IGNORECASE)
_DESTINATION = re.compile(
    r"\([ \t]*(?:<(?P<angled>[^<>\n]*)>|(?P<plain>(?:[^\s()]|\((?:[^\s()])*\))*))"
    r"(?:[ \t]+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?[ \t]*\)"
)

# Rendered HTML: a tag or an entity is one atom, never cut.
_ATOM = re.compile(r"<[^>]*>|&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_TAG = re.compile(r"<[^>]*>")
_TAG_NAME = re.compile(r"</?([A-Za-z][A-Za-z0-9-]*)")
_TAGS_AND_SPACE = re.compile(r"(?:<[^>]*>|\s)+")
_PRE_CODE = re.compile(r"<pre><code\s[^>]*>")
_PRE_CODE_END = "</code></pre>"
# How usable a cut is: a poor one leaves an empty element (`<b></b>`), so it is a last resort.
_POOR, _FINE = 0, 1


def to_html(markdown: str) -> str:
    """Render `markdown` as Telegram HTML, escaping `&`, `<` and `>` in all of its text.

    Emphasis, code spans and links pair up within a line; a marker without a partner stays
    as text. Code keeps its text as written; a code block the author never closed runs to
    the end, as in CommonMark. Only http(s), tg and mailto URLs become links, and a bare URL
    is left for Telegram to link. A table goes into a `<pre>` block to keep its columns.
    """
    lines = markdown.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        taken, rendered = _block(lines, index)
        out.append(rendered)
        index += taken
    return "\n".join(out)


def plain(html: str) -> str:
    """The text of Telegram HTML as the reader sees it: tags removed, entities unescaped.

    What to send instead when Telegram rejects a part's entities.
    """
    return unescape(_TAG.sub("", html))


def split_html(html: str, limit: int = LIMIT) -> list[str]:
    """Split Telegram HTML into parts of at most `limit` characters, each valid on its own.

    Telegram counts the text left after parsing, but the parts are held to `limit` as
    written, tags and entities included: never shorter than that text, so always safe, at
    the cost of an extra part on a reply heavy with links. Cuts fall where `core.text` would
    make them, never inside a tag or an entity. Nothing but whitespace at the cuts is lost.
    `html` is assumed to be well formed (as `to_html` writes it); a blank one gives no parts.
    A code block whose tags would take over half a part loses its language; where the tags
    open at a cut still take that much to reopen (a link to a very long URL), the part is
    sent as plain text instead.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters, got {limit}")
    if not plain(html).strip():
        return []
    if len(html) <= limit:
        return [html]
    doc = _scan(_fit_languages(html, limit), limit)
    html = doc.text
    parts: list[str] = []
    pos = 0
    while _first_visible(html, pos) < len(html):
        opening = _reopening(doc, pos)
        rest = html[pos:].rstrip() + _closing(doc, len(html))
        if opening is not None and len(opening) + len(rest) <= limit:
            parts.append(opening + rest)
            break
        cut = None if opening is None else _next_cut(doc, pos, len(opening))
        if opening is None or cut is None:
            part, pos = _plain_part(doc, pos)
            parts.append(part)
            continue
        end, start = cut
        parts.append(opening + html[pos:end] + _closing(doc, end))
        pos = start
    return parts


# -- blocks -----------------------------------------------------------------------------


def _block(lines: list[str], index: int) -> tuple[int, str]:
    """How many lines the block starting at `index` takes, and what it renders to."""
    line = lines[index]
    fence = _FENCE.fullmatch(line.rstrip())
    if fence and not (fence["marker"][0] == "`" and "`" in fence["info"]):
        return _code_block(lines, index, fence)
    if index + 1 < len(lines) and _is_table(line, lines[index + 1]):
        end = index + 2
        while end < len(lines) and "|" in lines[end] and lines[end].strip():
            end += 1
        return end - index, "<pre>" + _escape("\n".join(lines[index:end])) + "</pre>"
    quoted = []
    for quote in map(_QUOTE.fullmatch, lines[index:]):
        if quote is None:
            break
        quoted.append(_line(quote["text"]))
    if quoted:
        # Telegram quotes one level only: a nested `>` stays text.
        body = "\n".join(quoted)
        return len(quoted), f"<blockquote>{body}</blockquote>" if body.strip() else body
    return 1, _line(line)


def _code_block(lines: list[str], index: int, fence: re.Match[str]) -> tuple[int, str]:
    marker, indent = fence["marker"], len(fence["indent"])
    words = fence["info"].split()
    language = words[0] if words and _LANGUAGE.fullmatch(words[0]) else ""
    end = index + 1
    while end < len(lines) and not _closes(marker, lines[end]):
        end += 1
    # Code lines lose as much indentation as the fence line has (a fence in a list item).
    code = "\n".join(
        line[min(indent, len(line) - len(line.lstrip(" "))) :] for line in lines[index + 1 : end]
    )
    attribute = f' class="language-{language}"' if language else ""
    taken = min(end + 1, len(lines)) - index
    return taken, f"<pre><code{attribute}>{_escape(code)}</code></pre>"


def _closes(marker: str, line: str) -> bool:
    closing = _FENCE.fullmatch(line.rstrip())
    return (
        closing is not None
        and closing["marker"][0] == marker[0]
        and len(closing["marker"]) >= len(marker)
        and not closing["info"].strip()
    )


def _is_table(header: str, delimiter: str) -> bool:
    return "|" in header and "|" in delimiter and bool(_TABLE_DELIMITER.fullmatch(delimiter))


def _line(line: str) -> str:
    """One line outside code blocks: a rule, a heading, a bullet or text."""
    if _RULE_LINE.fullmatch(line):
        return RULE
    heading = _HEADING.fullmatch(line)
    if heading:
        # The heading is bold already: strong emphasis inside it adds nothing.
        text = _inline(heading["text"] or "", strong=False)
        return f"<b>{text}</b>" if text.strip() else ""
    bullet = _BULLET.fullmatch(line)
    if bullet:
        return f"{bullet['indent']}• {_inline(bullet['text'])}"
    return _inline(line)


# -- inline -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Delimiter:
    """A run of `*`, `_` or `~` that may open or close emphasis."""

    char: str
    count: int
    can_open: bool
    can_close: bool
    opens: list[str] = field(default_factory=list)  # tags written after the leftover
    closes: list[str] = field(default_factory=list)  # tags written before the leftover

    def render(self) -> str:
        return "".join(self.closes) + self.char * self.count + "".join(self.opens)


def _inline(text: str, *, links: bool = True, strong: bool = True) -> str:
    """One line's inline Markdown; inside a link's label (`links` False) no link or code."""
    tokens: list[str | _Delimiter] = []
    pos = 0
    while (special := _SPECIAL.search(text, pos)) is not None:
        tokens.append(_escape(text[pos : special.start()]))
        token, pos = _token(text, special, links, strong)
        tokens.append(token)
    tokens.append(_escape(text[pos:]))
    _match_emphasis(tokens, strong)
    return "".join(t if isinstance(t, str) else t.render() for t in tokens)


def _token(
    text: str, special: re.Match[str], links: bool, strong: bool
) -> tuple[str | _Delimiter, int]:
    """What starts at `special`, and where the text after it resumes."""
    start, found = special.start(), special.group(0)
    if found[0] == "\\":
        return _escape(found[1]), special.end()
    if found[0] == "`":
        return _code_span(text, special, code=links)
    if found[0] in "*_~":
        return _delimiter(text, start, special.end()), special.end()
    if found[0] in "[!<":
        link = _link_at(text, start, strong) if links else None
        return link or (_escape(found), special.end())
    # A bare URL stays text (Telegram links it), so that its `_` or `*` are not emphasis.
    bare = _BARE_URL.match(text, start)
    url = _trim_url(bare.group(0)) if bare else found
    return _escape(url), start + len(url)


def _code_span(text: str, special: re.Match[str], code: bool) -> tuple[str, int]:
    run = special.group(0)
    close = re.compile(rf"(?<!`){run}(?!`)").search(text, special.end())
    if close is None:
        return run, special.end()
    content = text[special.end() : close.start()]
    if content.startswith(" ") and content.endswith(" ") and content.strip(" "):
        content = content[1:-1]
    return (f"<code>{_escape(content)}</code>" if code else _escape(content)), close.end()


def _delimiter(text: str, start: int, end: int) -> str | _Delimiter:
    """A delimiter run, flanking as CommonMark defines it; `_` never works inside a word."""
    run = text[start:end]
    if run[0] == "~" and len(run) != 2:
        return run
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    left = not after.isspace() and (
        not _punctuation(after) or before.isspace() or _punctuation(before)
    )
    right = not before.isspace() and (
        not _punctuation(before) or after.isspace() or _punctuation(after)
    )
    if run[0] == "_":
        return _Delimiter(
            "_",
            len(run),
            can_open=left and (not right or _punctuation(before)),
            can_close=right and (not left or _punctuation(after)),
        )
    return _Delimiter(run[0], len(run), can_open=left, can_close=right)


def _punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def _match_emphasis(tokens: list[str | _Delimiter], strong: bool) -> None:
    """Pair openers with closers, innermost first, as CommonMark's delimiter stack does.

    Pairs found this way nest, so the tags written for them do too.
    """
    openers: list[_Delimiter] = []
    # Where each kind's openers are in `openers`: a closer finds its own kind at once.
    kinds: dict[str, list[int]] = {"*": [], "_": [], "~": []}
    for token in tokens:
        if not isinstance(token, _Delimiter):
            continue
        while token.can_close and token.count and kinds[token.char]:
            at = kinds[token.char][-1]
            opener = openers[at]
            # Delimiters between the pair can no longer open anything.
            del openers[at + 1 :]
            for indexes in kinds.values():
                while indexes and indexes[-1] > at:
                    indexes.pop()
            used = 2 if opener.count >= 2 and token.count >= 2 else 1
            tag = "s" if token.char == "~" else "i" if used == 1 else "b" if strong else ""
            opener.count, token.count = opener.count - used, token.count - used
            if tag:
                opener.opens.insert(0, f"<{tag}>")
                token.closes.append(f"</{tag}>")
            if not opener.count:
                openers.pop()
                kinds[token.char].pop()
        if token.can_open and token.count:
            kinds[token.char].append(len(openers))
            openers.append(token)


# -- links ------------------------------------------------------------------------------


def _link_at(text: str, start: int, strong: bool) -> tuple[str, int] | None:
    """A link starting at `start` rendered as HTML, and where the text resumes."""
    if text.startswith("<", start):
        auto = _AUTOLINK.match(text, start)
        if auto and _LINKABLE.match(auto["url"]):
            return _anchor(auto["url"], _escape(auto["url"])), auto.end()
        email = _EMAIL.match(text, start)
        if email:
            return _anchor("mailto:" + email["address"], _escape(email["address"])), email.end()
        return None
    parsed = _markdown_link(text, start + (text[start] == "!"))
    if parsed is None:
        return None
    label, url, end = parsed
    rendered = _inline(label, links=False, strong=strong)
    if not _LINKABLE.match(url):
        return rendered, end
    return _anchor(url, rendered if rendered.strip() else _escape(url)), end


def _markdown_link(text: str, start: int) -> tuple[str, str, int] | None:
    """`[label](url "title")` from the `[` at `start`: label, url, and the end."""
    close = _bracket_pairs(text).get(start)
    if close is None or not text.startswith("(", close + 1):
        return None
    destination = _DESTINATION.match(text, close + 1)
    if destination is None:
        return None
    url = destination["angled"] if destination["angled"] is not None else destination["plain"]
    return text[start + 1 : close], url, destination.end()


@lru_cache(maxsize=32)
def _bracket_pairs(line: str) -> dict[int, int]:
    """Each `[` and its `]` (brackets nest; a backslash escapes one), once per line."""
    pairs, stack, index = {}, [], 0
    while index < len(line):
        if line[index] == "\\":
            index += 1
        elif line[index] == "[":
            stack.append(index)
        elif line[index] == "]" and stack:
            pairs[stack.pop()] = index
        index += 1
    return pairs


def _trim_url(url: str) -> str:
    """A bare URL without the punctuation that ends its sentence (GFM's autolink rule)."""
    while url and (
        url[-1] in ".,:;!?*_~'\"" or (url[-1] == ")" and url.count(")") > url.count("("))
    ):
        url = url[:-1]
    return url


def _anchor(url: str, label: str) -> str:
    """`<a href="url">label</a>`; `label` comes rendered and escaped already."""
    href = _escape(url.replace(" ", "%20")).replace('"', "&quot;")
    return f'<a href="{href}">{label}</a>'


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- splitting --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Html:
    """Rendered HTML with what the splitter looks up more than once."""

    text: str
    limit: int
    atom_starts: tuple[int, ...]  # tags and entities
    atom_ends: tuple[int, ...]
    tag_starts: tuple[int, ...]
    tag_ends: tuple[int, ...]
    tag_opens: tuple[bool, ...]  # whether each tag opens an element
    stacks: tuple[tuple[str, ...], ...]  # the opening tags in force after each tag
    closers: tuple[str, ...]  # the closing tags for each of those
    cuts: tuple[Cut, ...] = ()
    cut_ends: tuple[int, ...] = ()


def _scan(text: str, limit: int) -> _Html:
    atoms = list(_ATOM.finditer(text))
    tags = [atom for atom in atoms if atom.group(0)[0] == "<"]
    stack: list[tuple[str, str]] = []  # (opening tag as written, name)
    opens, stacks, closers = [], [], []
    for tag in tags:
        raw = tag.group(0)
        name = _TAG_NAME.match(raw)
        names = [n for _, n in stack]
        closing = raw.startswith("</")
        if name and closing and name[1].lower() in names:
            del stack[len(names) - 1 - names[::-1].index(name[1].lower()) :]
        elif name and not closing and not raw.endswith("/>"):
            stack.append((raw, name[1].lower()))
        opens.append(not closing)
        stacks.append(tuple(raw for raw, _ in stack))
        closers.append("".join(f"</{n}>" for _, n in reversed(stack)))
    doc = _Html(
        text,
        limit,
        tuple(a.start() for a in atoms),
        tuple(a.end() for a in atoms),
        tuple(t.start() for t in tags),
        tuple(t.end() for t in tags),
        tuple(opens),
        tuple(stacks),
        tuple(closers),
    )
    # A line break beside a code block or a quote ranks as a paragraph break.
    edges = {t.start() for t in tags if t.group(0).startswith(("<pre", "<blockquote"))}
    edges |= {t.end() for t in tags if t.group(0).startswith(("</pre", "</blockquote"))}

    def in_code(pos: int) -> bool:
        return any(tag.startswith(("<pre", "<code")) for tag in _stack(doc, pos))

    cuts = tuple(find_cuts(text, edges, in_code))
    return replace(doc, cuts=cuts, cut_ends=tuple(c.end for c in cuts))


def _fit_languages(html: str, limit: int) -> str:
    """`html` without the language of each code block whose tags take over half a part."""
    return _PRE_CODE.sub(
        lambda tag: tag[0] if len(tag[0]) + len(_PRE_CODE_END) <= limit // 2 else "<pre><code>",
        html,
    )


def _tag_before(doc: _Html, pos: int) -> int:
    """The index of the last tag that ends at or before `pos` (-1 for none)."""
    return bisect_right(doc.tag_ends, pos) - 1


def _stack(doc: _Html, pos: int) -> tuple[str, ...]:
    index = _tag_before(doc, pos)
    return doc.stacks[index] if index >= 0 else ()


def _closing(doc: _Html, pos: int) -> str:
    index = _tag_before(doc, pos)
    return doc.closers[index] if index >= 0 else ""


def _reopening(doc: _Html, pos: int) -> str | None:
    """The tags that reopen the elements open at `pos`, with the same attributes.

    None when they and their closing tags would take over half a part.
    """
    opening = "".join(_stack(doc, pos))
    return opening if len(opening) + len(_closing(doc, pos)) <= doc.limit // 2 else None


def _inside_atom(doc: _Html, pos: int) -> bool:
    index = bisect_right(doc.atom_starts, pos) - 1
    return index >= 0 and doc.atom_starts[index] < pos < doc.atom_ends[index]


def _first_visible(text: str, pos: int) -> int:
    """The first character from `pos` on that is neither whitespace nor in a tag."""
    skipped = _TAGS_AND_SPACE.match(text, pos)
    return skipped.end() if skipped else pos


def _next_cut(doc: _Html, pos: int, prefix: int) -> tuple[int, int] | None:
    """Where the part starting at `pos` ends and the next starts; None if nothing fits."""
    first = _first_visible(doc.text, pos)

    def size(end: int) -> int:
        return prefix + (end - pos) + len(_closing(doc, end))

    lo, hi = bisect_right(doc.cut_ends, pos), bisect_right(doc.cut_ends, pos + doc.limit)
    fitting = [c for c in doc.cuts[lo:hi] if size(c.end) <= doc.limit]
    rated = [(c, _usable(doc, first, c.end, c.start)) for c in fitting]
    cut = best_cut((c for c, use in rated if use == _FINE), size, doc.limit)
    if cut is not None:
        return cut.end, cut.start
    end = _hard_cut(doc, pos, first, size, _FINE)
    poor = [c for c, use in rated if use == _POOR]
    if end is None and poor:
        cut = max(poor, key=lambda c: c.end)
        return cut.end, cut.start
    if end is None:
        end = _hard_cut(doc, pos, first, size, _POOR)
    return None if end is None else (end, end)


def _usable(doc: _Html, first: int, end: int, start: int) -> int | None:
    """Whether a part may end at `end` and the next start at `start`.

    None inside a tag or an entity, or when the part would show nothing; `_POOR` when a part
    would hold an empty element: one that ends just after an opening tag, or whose next part
    starts just before a closing tag (reopened, it would close at once).
    """
    if end <= first or _inside_atom(doc, end) or _inside_atom(doc, start):
        return None
    text = doc.text
    last = _tag_before(doc, end)
    if last >= 0 and doc.tag_opens[last] and not text[doc.tag_ends[last] : end].strip():
        return _POOR
    following = bisect_left(doc.tag_starts, start)
    if (
        following < len(doc.tag_starts)
        and not doc.tag_opens[following]
        and not text[start : doc.tag_starts[following]].strip()
    ):
        return _POOR
    return _FINE


def _hard_cut(
    doc: _Html, pos: int, first: int, size: Callable[[int], int], wanted: int
) -> int | None:
    """The furthest place between two characters that fits, kept off graphemes when it can."""
    top = min(len(doc.text) - 1, pos + doc.limit)
    for careful, bottom in ((True, max(pos, top - 64)), (False, pos)):
        for end in range(top, bottom, -1):
            if size(end) > doc.limit or not can_cut(doc.text, end, careful):
                continue
            use = _usable(doc, first, end, end)
            if use is not None and use >= wanted:
                return end
    return None


def _plain_part(doc: _Html, pos: int) -> tuple[str, int]:
    """A part of escaped plain text from `pos`, and where the next part starts.

    For where tags cannot be kept: the ones open at `pos` take too much room to reopen, or
    a single tag (a link to a very long URL) is longer than a part.
    """
    text, first = doc.text, _first_visible(doc.text, pos)
    end, width = first, 0
    while end < len(text):
        atom = _ATOM.match(text, end)
        piece = atom.group(0) if atom else text[end]
        grow = 0 if atom and piece[0] == "<" else len(_escape(unescape(piece)))
        if width + grow > doc.limit:
            break
        width, end = width + grow, end + len(piece)
    while end < len(text) and not can_cut(text, end, careful=False):
        end -= 1
    lo, hi = bisect_right(doc.cut_ends, first), bisect_right(doc.cut_ends, end)
    soft = (
        c for c in doc.cuts[lo:hi] if not (_inside_atom(doc, c.end) or _inside_atom(doc, c.start))
    )
    cut = best_cut(soft, lambda at: at - first, doc.limit) if end < len(text) else None
    end, start = (cut.end, cut.start) if cut else (end, end)
    return _escape(plain(text[first:end]).rstrip()), start
