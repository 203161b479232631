"""Render an agent's Markdown as Slack mrkdwn.

Agents write CommonMark-ish Markdown; Slack's `text` field speaks mrkdwn: `*bold*`, `_italic_`,
`~strike~`, `<url|label>` links, and `&`, `<`, `>` escaped everywhere. The conversion works
line by line (emphasis and links do not span lines) and never lets agent text become Slack
syntax: the only `<` it writes opens an http(s) or mailto link it built itself, so `<!here>` or
`<@U123>` from the agent shows as text, never as a mention.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

RULE = "─" * 12
"""What a horizontal rule (`---`, `***`, `___`) becomes: Slack has none."""

_FENCE = re.compile(r"(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})(?P<info>.*)")
_TABLE_DELIMITER = re.compile(r"[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*")
_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*")
_RULE_LINE = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*")
_BULLET = re.compile(r"(?P<indent>[ \t]*)[-*+][ \t]+(?P<text>.*)")
_QUOTE = re.compile(r"(?P<indent>[ \t]{0,3})>[ \t]?(?P<text>.*)")

# Inline: the places where something other than plain text may start.
_SPECIAL = re.compile(r"\\[!-/:-@\[-`{-~]|`+|!?\[|<|(?<![\w/])https?://|\*+|_+|~+")
_AUTOLINK = re.compile(r"<(?P<url>[A-Za-z][A-Za-z0-9+.\-]{1,31}:[^\s<>]*)>")
_SLACK_LINK = re.compile(r"<(?P<url>(?:https?://|mailto:)[^\s<>|]+)\|(?P<label>[^<>\n]*)>", re.I)
_EMAIL = re.compile(r"<(?P<address>[^\s<>@|]+@[^\s<>@|]+\.[^\s<>@|]+)>")
_BARE_URL = re.compile(r"https?://[^\s<>]+")
_LINKABLE = re.compile(r"(?:https?://|mailto:)\S", re.IGNORECASE)
# Backslash escapes Slack would read as formatting keep their backslash (else `\*a\*` is bold).
_KEEP_BACKSLASH = "*_~`"


def to_mrkdwn(markdown: str) -> str:
    """Render `markdown` as Slack mrkdwn, escaping `&`, `<` and `>` everywhere.

    Code spans and fenced blocks keep their text as written (escaped; a fence loses its info
    string, and `~~~` fences become ``` since Slack knows no other). A Markdown table is put in
    a code block so that its columns stay aligned.
    """
    lines = markdown.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        taken, rendered = _block(lines, index)
        out.extend(rendered)
        index += taken
    return "\n".join(out)


# -- blocks -----------------------------------------------------------------------------


def _block(lines: list[str], index: int) -> tuple[int, list[str]]:
    """The lines the block starting at `index` takes, and what they render to."""
    line = lines[index]
    fence = _FENCE.fullmatch(line.rstrip())
    if fence and not (fence["marker"][0] == "`" and "`" in fence["info"]):
        return _code_block(lines, index, fence)
    if index + 1 < len(lines) and _is_table(line, lines[index + 1]):
        end = index + 2
        while end < len(lines) and "|" in lines[end] and lines[end].strip():
            end += 1
        return end - index, ["```", *(_escape(row) for row in lines[index:end]), "```"]
    return 1, [_line(line)]


def _code_block(lines: list[str], index: int, fence: re.Match[str]) -> tuple[int, list[str]]:
    marker, indent = fence["marker"], fence["indent"]
    out = [indent + "```"]
    for end in range(index + 1, len(lines)):
        closing = _FENCE.fullmatch(lines[end].rstrip())
        if (
            closing
            and closing["marker"][0] == marker[0]
            and len(closing["marker"]) >= len(marker)
            and not closing["info"].strip()
        ):
            return end - index + 1, [*out, closing["indent"] + "```"]
        out.append(_escape(lines[end]))
    # Never closed: left open as the author wrote it.
    return len(lines) - index, out


def _is_table(header: str, delimiter: str) -> bool:
    return "|" in header and "|" in delimiter and bool(_TABLE_DELIMITER.fullmatch(delimiter))


def _line(line: str, quoted: bool = False) -> str:
    """One line outside code: heading, rule, bullet, quote or plain text."""
    if _RULE_LINE.fullmatch(line):
        return RULE
    heading = _HEADING.fullmatch(line)
    if heading:
        text = _inline(heading["text"] or "", bold="")
        return f"*{text}*" if text.strip() else ""
    bullet = _BULLET.fullmatch(line)
    if bullet:
        return f"{bullet['indent']}• {_inline(bullet['text'])}"
    quote = None if quoted else _QUOTE.fullmatch(line)
    if quote:
        # Slack quotes one level only: a nested `>` stays text.
        return f"{quote['indent']}> {_line(quote['text'], quoted=True)}".rstrip()
    return _inline(line)


# -- inline -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Delimiter:
    """A run of `*`, `_` or `~` that may open or close emphasis."""

    char: str
    count: int
    can_open: bool
    can_close: bool
    opens: list[str] = field(default_factory=list)  # markers written after the leftover
    closes: list[str] = field(default_factory=list)  # markers written before the leftover

    def render(self) -> str:
        return "".join(self.closes) + self.char * self.count + "".join(self.opens)


def _inline(text: str, *, links: bool = True, bold: str = "*") -> str:
    """Convert one line's inline Markdown; `bold` is what strong emphasis is marked with."""
    tokens: list[str | _Delimiter] = []
    pos = 0
    while pos < len(text):
        special = _SPECIAL.search(text, pos)
        if special is None:
            break
        tokens.append(_escape(text[pos : special.start()]))
        token, pos = _token(text, special, links)
        tokens.append(token)
    tokens.append(_escape(text[pos:]))
    _match_emphasis(tokens, bold)
    return "".join(t if isinstance(t, str) else t.render() for t in tokens)


def _token(text: str, special: re.Match[str], links: bool) -> tuple[str | _Delimiter, int]:
    """What starts at `special`, and where the text after it resumes."""
    start, found = special.start(), special.group(0)
    if found[0] == "\\":
        return (found if found[1] in _KEEP_BACKSLASH else _escape(found[1])), special.end()
    if found[0] == "`":
        close = re.compile(rf"(?<!`){found}(?!`)").search(text, special.end())
        if close is None:
            return found, special.end()
        return _escape(text[start : close.end()]), close.end()
    if found[0] in "*_~":
        return _delimiter(text, start, special.end()), special.end()
    if links:
        link = _link_at(text, start)
        if link is not None:
            return link
    return _escape(found), special.end()


def _delimiter(text: str, start: int, end: int) -> str | _Delimiter:
    """A delimiter run, with CommonMark's stricter `_` flanking rules used for `*` too.

    So intraword markers (`snake_case_names`, `2*3*4`) are never emphasis, which is also
    where Slack would not render it.
    """
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
    return _Delimiter(
        char=run[0],
        count=len(run),
        can_open=left and (not right or _punctuation(before)),
        can_close=right and (not left or _punctuation(after)),
    )


def _punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def _match_emphasis(tokens: list[str | _Delimiter], bold: str) -> None:
    """Pair openers with closers, innermost first, as CommonMark's delimiter stack does."""
    openers: list[_Delimiter] = []
    for token in tokens:
        if not isinstance(token, _Delimiter):
            continue
        while token.can_close and token.count:
            opener = next((o for o in reversed(openers) if o.char == token.char), None)
            if opener is None:
                break
            # Delimiters between the pair can no longer open anything.
            del openers[next(i for i, o in enumerate(openers) if o is opener) + 1 :]
            used = 2 if opener.count >= 2 and token.count >= 2 else 1
            marker = "~" if token.char == "~" else bold if used == 2 else "_"
            opener.count, token.count = opener.count - used, token.count - used
            opener.opens.insert(0, marker)
            token.closes.append(marker)
            if not opener.count:
                openers.pop()
        if token.can_open and token.count:
            openers.append(token)


# -- links ------------------------------------------------------------------------------


def _link_at(text: str, start: int) -> tuple[str, int] | None:
    """A link starting at `start` rendered for Slack, and where the text resumes."""
    if text.startswith("<", start):
        return _angle_link(text, start)
    if text.startswith(("[", "!["), start):
        parsed = _markdown_link(text, start + (text[start] == "!"))
        if parsed is None:
            return None
        label, url, end = parsed
        rendered = _inline(label, links=False)
        return _slack_link(url, rendered) or rendered, end
    bare = _BARE_URL.match(text, start)
    if bare is None:
        return None
    url = _trim_url(bare.group(0))
    return _slack_link(url, "") or _escape(url), start + len(url)


def _angle_link(text: str, start: int) -> tuple[str, int] | None:
    """`<https://…>`, `<mailto:…>`, `<a@b.c>`, or Slack's own `<https://…|label>`."""
    slack = _SLACK_LINK.match(text, start)
    if slack:
        label = _inline(slack["label"], links=False)
        return _slack_link(slack["url"], label) or label, slack.end()
    auto = _AUTOLINK.match(text, start)
    if auto:
        link = _slack_link(auto["url"], "")
        return (link, auto.end()) if link else None
    email = _EMAIL.match(text, start)
    if email:
        address = _escape(email["address"])
        return f"<mailto:{address}|{address}>", email.end()
    return None


def _markdown_link(text: str, start: int) -> tuple[str, str, int] | None:
    """`[label](url "title")` from the `[` at `start`: label, url, and the end."""
    close = _closing_bracket(text, start)
    if close is None or not text.startswith("(", close + 1):
        return None
    destination = re.compile(
        r"\([ \t]*(?:<(?P<angled>[^<>\n]*)>|(?P<plain>(?:[^\s()]|\((?:[^\s()])*\))*))"
        r"(?:[ \t]+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?[ \t]*\)"
    ).match(text, close + 1)
    if destination is None:
        return None
    url = destination["angled"] if destination["angled"] is not None else destination["plain"]
    return text[start + 1 : close], url, destination.end()


def _closing_bracket(text: str, start: int) -> int | None:
    """The `]` matching the `[` at `start` (brackets nest; a backslash escapes one)."""
    return _bracket_pairs(text).get(start)


@lru_cache(maxsize=32)
def _bracket_pairs(line: str) -> dict[int, int]:
    # Once per line: looking for each `[`'s partner afresh is quadratic on "[[[[…".
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


def _slack_link(url: str, label: str) -> str | None:
    """`<url|label>` for an http(s) or mailto URL; None for any other (`javascript:`, `/x`).

    The URL is percent-encoded where Slack's syntax would end it early; `label` comes
    already rendered and escaped.
    """
    if not _LINKABLE.match(url):
        return None
    for char, code in (("|", "%7C"), ("<", "%3C"), (">", "%3E"), (" ", "%20")):
        url = url.replace(char, code)
    url = url.replace("&", "&amp;")
    # A look-alike keeps a `|` in the label from being read as a second separator.
    label = label.replace("|", "\u2223")
    return f"<{url}|{label}>" if label.strip() else f"<{url}>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
