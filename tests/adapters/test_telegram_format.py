"""adapters.telegram.format: Markdown as Telegram HTML, split at Telegram's limit."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.telegram.format import LIMIT, RULE, plain, split_html, to_html
from core.text import MIN_LIMIT

# -- a validator: what Telegram's HTML parse mode accepts --------------------------------

ALLOWED = {"b", "i", "s", "u", "code", "pre", "a", "blockquote"}
ENTITIES = {"amp", "lt", "gt", "quot"}
SPLITTABLE = {"b", "i", "s", "u"}  # may sit inside anything but code
LANGUAGE_CLASS = re.compile(r"language-[A-Za-z0-9_+#.-]+")
HREF = re.compile(r"(?:https?://|tg://|mailto:)\S+", re.IGNORECASE)


class TelegramHTML(HTMLParser):
    """Collects every way `html` breaks Telegram's rules: tags, nesting, escaping."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        parent = self.stack[-1] if self.stack else None
        if tag not in ALLOWED:
            self.errors.append(f"tag <{tag}>")
        if parent == "code" or (parent == "pre" and tag != "code"):
            self.errors.append(f"<{tag}> inside <{parent}>")
        if "a" in self.stack and tag not in SPLITTABLE:
            self.errors.append(f"<{tag}> inside a link")
        if "blockquote" in self.stack and tag in ("blockquote", "pre"):
            self.errors.append(f"<{tag}> inside a quote")
        if tag == "a":
            if len(attrs) != 1 or attrs[0][0] != "href" or not HREF.fullmatch(attrs[0][1] or ""):
                self.errors.append(f"link attributes {attrs}")
        elif tag == "code" and attrs:
            only_class = len(attrs) == 1 and attrs[0][0] == "class"
            if parent != "pre" or not only_class or not LANGUAGE_CLASS.fullmatch(attrs[0][1] or ""):
                self.errors.append(f"code attributes {attrs} in <{parent}>")
        elif attrs:
            self.errors.append(f"<{tag}> attributes {attrs}")
        self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.errors.append(f"self-closing <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if any(char in data for char in "<>&"):
            self.errors.append(f"unescaped text {data!r}")

    def handle_entityref(self, name: str) -> None:
        if name not in ENTITIES:
            self.errors.append(f"entity &{name};")

    def handle_comment(self, data: str) -> None:
        self.errors.append("comment")

    def handle_decl(self, decl: str) -> None:
        self.errors.append("declaration")

    def handle_pi(self, data: str) -> None:
        self.errors.append("processing instruction")

    def unknown_decl(self, data: str) -> None:
        self.errors.append("declaration")


def assert_valid(html: str) -> None:
    """Assert `html` is what Telegram accepts: known tags, properly nested, all escaped."""
    parser = TelegramHTML()
    parser.feed(html)
    parser.close()
    # An entity ref must end with `;` (the parser accepts `&amp` too; Telegram does not).
    assert not re.search(r"&(?!(?:amp|lt|gt|quot|#[0-9]+|#x[0-9a-fA-F]+);)", html), html
    assert parser.errors == [], (parser.errors, html)
    assert parser.stack == [], (parser.stack, html)


def test_the_validator_catches_what_telegram_rejects() -> None:
    for bad in [
        "<b>open",
        "<b><i>x</b></i>",
        "a < b",
        "a & b",
        "&nbsp;",
        "<span>x</span>",
        "<code><b>x</b></code>",
        '<code class="language-py">x</code>',
        '<a href="javascript:x">x</a>',
        '<a href="https://a.test"><a href="https://b.test">x</a></a>',
        "<blockquote><blockquote>x</blockquote></blockquote>",
        "<br/>",
    ]:
        with pytest.raises(AssertionError):
            assert_valid(bad)
    assert_valid('<pre><code class="language-py">&lt;&amp;&gt;</code></pre> <b><i>x</i></b>')


# -- to_html: examples ------------------------------------------------------------------

CASES = [
    # emphasis
    ("**bold** and __bold__", "<b>bold</b> and <b>bold</b>"),
    ("*italic* and _italic_", "<i>italic</i> and <i>italic</i>"),
    ("~~struck~~", "<s>struck</s>"),
    ("***both***", "<i><b>both</b></i>"),
    ("*italic with **bold** inside*", "<i>italic with <b>bold</b> inside</i>"),
    ("**bold with *italic* inside**", "<b>bold with <i>italic</i> inside</b>"),
    ("_italic with __bold__ inside_", "<i>italic with <b>bold</b> inside</i>"),
    ("**Note:** read this", "<b>Note:</b> read this"),
    ("un**frigging**believable", "un<b>frigging</b>believable"),
    # markers that are not emphasis stay as written
    ("**unclosed bold", "**unclosed bold"),
    ("*unclosed italic and **bold", "*unclosed italic and **bold"),
    ("**bold *not italic**", "*<i>bold <i>not italic</i></i>"),
    ("snake_case_names and __init__s", "snake_case_names and __init__s"),
    ("a lone * star and a lone _ too", "a lone * star and a lone _ too"),
    ("a * b * c", "a * b * c"),
    ("~5 minutes, ~~~ three", "~5 minutes, ~~~ three"),
    (r"\*not italic\* and \[not a link\](x)", "*not italic* and [not a link](x)"),
    # code spans: escaped, nothing inside
    ("`**not bold** <b> & [x](y)`", "<code>**not bold** &lt;b&gt; &amp; [x](y)</code>"),
    ("``a ` b``", "<code>a ` b</code>"),
    ("`` `x` ``", "<code>`x`</code>"),
    ("`unclosed **b**", "`unclosed <b>b</b>"),
    ("**bold `code` bold**", "<b>bold <code>code</code> bold</b>"),
    # links
    ("[the docs](https://example.com/docs)", '<a href="https://example.com/docs">the docs</a>'),
    ("[q](https://x.test/?a=1&b=2)", '<a href="https://x.test/?a=1&amp;b=2">q</a>'),
    ('[q](<https://x.test/"a b">)', '<a href="https://x.test/&quot;a%20b&quot;">q</a>'),
    ("[x > y & z](https://x.test)", '<a href="https://x.test">x &gt; y &amp; z</a>'),
    ("[**Docs**](https://d.test)", '<a href="https://d.test"><b>Docs</b></a>'),
    ("**[Docs](https://d.test)**", '<b><a href="https://d.test">Docs</a></b>'),
    ("[`code` label](https://d.test)", '<a href="https://d.test">code label</a>'),
    (
        "[inner [x](https://a.test)](https://b.test)",
        '<a href="https://b.test">inner [x](https://a.test)</a>',
    ),
    ("[me](tg://user?id=42)", '<a href="tg://user?id=42">me</a>'),
    ("[mail](mailto:a@b.test)", '<a href="mailto:a@b.test">mail</a>'),
    ("[](https://x.test)", '<a href="https://x.test">https://x.test</a>'),
    ("[relative](/docs/x) and [js](javascript:alert(1))", "relative and js"),
    ("[ftp](ftp://x.test/f)", "ftp"),
    ("![a chart](https://x.test/c.png)", '<a href="https://x.test/c.png">a chart</a>'),
    (
        "<https://x.test/a?b=1&c=2>",
        '<a href="https://x.test/a?b=1&amp;c=2">https://x.test/a?b=1&amp;c=2</a>',
    ),
    ("<a@b.test>", '<a href="mailto:a@b.test">a@b.test</a>'),
    ("<ftp://x.test>", "&lt;ftp://x.test&gt;"),
    ("see https://x.test/a_b_c_d.", "see https://x.test/a_b_c_d."),
    ("**https://x.test/a_b**", "<b>https://x.test/a_b</b>"),
    # blocks
    ("# Title", "<b>Title</b>"),
    ("### Step 2: *run* it ###", "<b>Step 2: <i>run</i> it</b>"),
    ("## **Already bold** title", "<b>Already bold title</b>"),
    ("#hashtag", "#hashtag"),
    ("- one\n* two\n+ three", "• one\n• two\n• three"),
    ("- top\n  - nested", "• top\n  • nested"),
    ("-not a bullet", "-not a bullet"),
    ("1. first\n2. **second**\n10) tenth", "1. first\n2. <b>second</b>\n10) tenth"),
    ("> quoted *text*", "<blockquote>quoted <i>text</i></blockquote>"),
    ("> one\n>two\n> - three\n\nafter", "<blockquote>one\ntwo\n• three</blockquote>\n\nafter"),
    ("> > nested", "<blockquote>&gt; nested</blockquote>"),
    (">", ""),
    ("---", RULE),
    ("* * *\n___", f"{RULE}\n{RULE}"),
    ("| a | b |\n|---|---|\n| <1> | 2 |", "<pre>| a | b |\n|---|---|\n| &lt;1&gt; | 2 |</pre>"),
    # code blocks: as written, escaped
    (
        "```python\nif a < b and c > d & e:\n    print('**x** <tag>')\n```",
        '<pre><code class="language-python">if a &lt; b and c &gt; d &amp; e:\n'
        "    print('**x** &lt;tag&gt;')</code></pre>",
    ),
    ("```\nplain\n```", "<pre><code>plain</code></pre>"),
    ("~~~ sh title=x\nls *.py\n~~~", '<pre><code class="language-sh">ls *.py</code></pre>'),
    ('```"><b>\nx\n```', "<pre><code>x</code></pre>"),
    (
        "1. Run:\n   ```sh\n   make\n     indented\n   ```",
        '1. Run:\n<pre><code class="language-sh">make\n  indented</code></pre>',
    ),
    (
        "```js\nnever closed\n\n# not a heading",
        '<pre><code class="language-js">never closed\n\n# not a heading</code></pre>',
    ),
    ("```inline``` code", "<code>inline</code> code"),
    # escaping
    ('a & b < c > d "e"', 'a &amp; b &lt; c &gt; d "e"'),
    ("<b>not a tag</b> &amp;", "&lt;b&gt;not a tag&lt;/b&gt; &amp;amp;"),
    ("line one\r\nline two", "line one\nline two"),
]


@pytest.mark.parametrize(("markdown", "expected"), CASES)
def test_renders(markdown: str, expected: str) -> None:
    rendered = to_html(markdown)
    assert rendered == expected
    assert_valid(rendered)


LLM_ANSWER = """\
## Setting up the webhook

To receive events, you need **two things**:

- A public URL (see [the guide](https://docs.example.com/hooks?lang=en&v=2))
- A *signing secret*, kept in `SECRET_KEY`

```python
def verify(body: bytes, sig: str) -> bool:
    return hmac.compare_digest(sign(body), sig)  # a < b && c > d
```

> **Note:** never log the secret.

---
That's it!"""

LLM_HTML = """\
<b>Setting up the webhook</b>

To receive events, you need <b>two things</b>:

• A public URL (see <a href="https://docs.example.com/hooks?lang=en&amp;v=2">the guide</a>)
• A <i>signing secret</i>, kept in <code>SECRET_KEY</code>

<pre><code class="language-python">def verify(body: bytes, sig: str) -&gt; bool:
    return hmac.compare_digest(sign(body), sig)  # a &lt; b &amp;&amp; c &gt; d</code></pre>

<blockquote><b>Note:</b> never log the secret.</blockquote>

———
That's it!"""


def test_a_realistic_answer() -> None:
    assert to_html(LLM_ANSWER) == LLM_HTML


def test_plain_removes_tags_and_unescapes() -> None:
    assert plain(LLM_HTML).startswith("Setting up the webhook\n\nTo receive events, you need two")
    assert "# a < b && c > d" in plain(LLM_HTML)
    assert plain('<a href="https://x.test/?a=1&amp;b=2">&lt;q&gt; &quot;</a>') == '<q> "'


# -- split_html: examples ---------------------------------------------------------------


def check(html: str, limit: int) -> list[str]:
    """Split and assert what holds for any HTML and limit; return the parts."""
    parts = split_html(html, limit)
    for part in parts:
        assert len(part) <= limit, (len(part), part)
        assert plain(part).strip(), part
        assert_valid(part)
    assert_nothing_lost(html, parts)
    return parts


def assert_nothing_lost(html: str, parts: list[str]) -> None:
    """The parts' text, in order, is the whole text but for whitespace at the cuts."""
    whole, pos = plain(html), 0
    for part in parts:
        piece = plain(part).strip()
        rest = whole[pos:]
        skipped = len(rest) - len(rest.lstrip())
        assert rest[skipped:].startswith(piece), (piece[:80], rest[skipped : skipped + 80])
        pos += skipped + len(piece)
    assert not whole[pos:].strip(), whole[pos:]


def test_html_that_fits_comes_back_unchanged() -> None:
    assert split_html(LLM_HTML) == [LLM_HTML]
    assert split_html("<b>x</b>", MIN_LIMIT) == ["<b>x</b>"]


@pytest.mark.parametrize("html", ["", "  \n", "<b> </b>", "<pre><code></code></pre>"])
def test_blank_html_gives_no_parts(html: str) -> None:
    assert split_html(html) == []


@pytest.mark.parametrize("limit", [-1, 0, MIN_LIMIT - 1])
def test_a_limit_too_small_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        split_html("some text " * 10, limit)


def test_cuts_at_the_paragraph_rather_than_a_later_line() -> None:
    html = to_html("First paragraph, **line** one.\nline two.\n\nSecond paragraph,\nsome more.")
    assert check(html, 60) == [
        "First paragraph, <b>line</b> one.\nline two.",
        "Second paragraph,\nsome more.",
    ]


def test_cuts_after_a_sentence_then_at_a_space() -> None:
    assert check("One short sentence. Another one here! Is this the third? Yes.", 40) == [
        "One short sentence. Another one here!",
        "Is this the third? Yes.",
    ]
    assert check("the quick brown fox jumps over the lazy dog", 20) == [
        "the quick brown fox",
        "jumps over the lazy",
        "dog",
    ]


def test_bold_across_a_cut_is_closed_and_reopened() -> None:
    html = to_html("**" + " ".join(f"word{n}" for n in range(12)) + "** after")
    parts = check(html, 40)
    assert len(parts) > 2
    assert all(part.startswith("<b>") for part in parts)
    assert all(part.endswith("</b>") for part in parts[:-1])


def test_a_link_across_a_cut_is_reopened_with_the_same_href() -> None:
    html = to_html("[" + "click here " * 8 + "](https://x.test/?a=1&b=2)")
    parts = check(html, 100)
    assert len(parts) > 1
    assert all(part.startswith('<a href="https://x.test/?a=1&amp;b=2">') for part in parts)
    assert all(part.endswith("</a>") for part in parts)


def test_a_code_block_across_a_cut_is_reopened_with_its_language() -> None:
    code = "\n".join(f"line_{n} = {n}  # <{n}> & more" for n in range(8))
    html = to_html(f"Look at this:\n\n```python\n{code}\n```\n\nDone.")
    parts = check(html, 160)
    assert len(parts) > 2
    opening = '<pre><code class="language-python">'
    assert all(opening in part for part in parts[:-1])
    assert all(part.startswith(opening) for part in parts[1:])
    assert all(part.endswith("</code></pre>") for part in parts[:-1])
    # Cut at line breaks in the code: no code line is broken.
    assert "".join(parts).count("line_") == 8
    assert all(re.search(r"line_\d = \d", part) for part in parts[:-1])


def test_a_cut_never_falls_inside_an_entity_or_a_tag() -> None:
    html = "<b>" + "&amp;&lt;" * 40 + "</b>"
    for limit in range(MIN_LIMIT, 60):
        for part in check(html, limit):
            assert re.fullmatch(r"<b>(?:&amp;|&lt;)+</b>", part), part


def test_no_part_holds_an_empty_element() -> None:
    html = to_html("Intro words here.\n```py\n" + "x = 1\n" * 20 + "```")
    for limit in (40, 50, 64):
        for part in check(html, limit):
            assert not re.search(r"<(\w+)[^>]*></\1>", part), part


def test_the_language_is_dropped_when_the_tags_would_take_half_a_part() -> None:
    html = to_html("```python3-console\n" + "\n".join([">>> x = 1"] * 12) + "\n```")
    assert all(part.startswith("<pre><code>&gt;&gt;&gt; x = 1") for part in check(html, 64))
    parts = check(html, 120)
    assert all(part.startswith('<pre><code class="language-python3-console">') for part in parts)


def test_a_tag_longer_than_a_part_is_sent_as_plain_text() -> None:
    url = "https://x.test/" + "a" * 200
    html = to_html(f"Some text first. [the link]({url}) and **bold** after it, then more.")
    parts = check(html, 64)
    assert "the link" in "".join(parts)
    assert all(url not in part for part in parts)


def test_crlf_and_emoji_are_never_cut_apart() -> None:
    assert not any(part.endswith("\r") for part in check("x\r\n" * 40, MIN_LIMIT))
    thumbs = "👍🏽" * 40
    assert all(len(plain(part)) % 2 == 0 for part in check(f"<i>{thumbs}</i>", 30))


# -- a long answer ----------------------------------------------------------------------

PROSE = (
    "The bridge keeps one conversation per thread. Each reply is rendered for the platform "
    "first and then split, so that **no part** is ever longer than the platform allows! Why "
    "does this matter? Because a message over the limit is rejected outright, see "
    "[the docs](https://core.telegram.org/bots/api#sendmessage?a=1&b=2)."
)


def long_answer() -> str:
    """About 10,000 characters: prose and three code blocks, one longer than a part."""
    python = "\n".join(
        f"def handler_{n}(event: dict[str, str]) -> str:\n"
        f'    """Answer event <{n}> & more."""\n'
        f'    return event.get("text", "") + "**{n}**"\n'
        for n in range(45)
    )
    shell = "\n".join(
        f"curl -s 'https://x.test/api/{n}?a=1&b=2' | jq '.items[{n}]'" for n in range(20)
    )
    json = "\n".join(f'  "key_{n}": "<value {n}>",' for n in range(20))
    text = "\n\n".join(
        [
            "## Overview",
            *[PROSE] * 3,
            f"```python\n{python}```",
            *[PROSE] * 2,
            f"```bash\n{shell}\n```",
            PROSE,
            f"```json\n{{\n{json}\n}}\n```",
            PROSE,
        ]
    )
    assert 9_500 <= len(text) <= 10_500, len(text)
    return text


def test_a_long_answer_with_code_blocks() -> None:
    html = to_html(long_answer())
    assert len(html) > 2 * LIMIT
    parts = check(html, LIMIT)
    assert 3 <= len(parts) <= 4
    assert "".join(parts).count("def handler_") == 45
    languages = {"def handler_": "python", "curl -s": "bash", '"key_': "json"}
    for part in parts:
        for block in re.findall(r"<pre>.*?</pre>", part, re.DOTALL):
            for marker, language in languages.items():
                if marker in block:
                    assert block.startswith(f'<pre><code class="language-{language}">'), block[:60]
    # The python block is longer than a part: the next part reopens it with its language.
    assert parts[1].startswith('<pre><code class="language-python">def handler_')
    assert all(part.count("<pre>") == part.count("</pre>") for part in parts)


# -- properties -------------------------------------------------------------------------

PIECES = st.sampled_from(
    [
        *"<>&\"'*_~`[]()!#-+>|\\:/. \n\t",
        "**",
        "__",
        "~~",
        "```",
        "```py\n",
        "~~~",
        "> ",
        "- ",
        "# ",
        "1. ",
        "---\n",
        "](",
        "https://",
        "tg://",
        "mailto:",
        "javascript:",
        "&amp;",
        "<b>",
        "</i>",
        "a_b",
        "👍🏽",
        "word",
    ]
)
ANY_TEXT = st.one_of(
    st.lists(st.one_of(PIECES, st.text(max_size=3)), max_size=60).map("".join),
    st.text(max_size=200),
)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(text=ANY_TEXT)
def test_any_text_renders_to_valid_html(text: str) -> None:
    html = to_html(text)
    assert_valid(html)
    # Nothing an agent writes disappears but Markdown syntax and the URLs behind links.
    assert set(re.sub(r"\W", "", plain(html))) <= set(re.sub(r"\W", "", text))


WORD = st.one_of(
    st.sampled_from(
        [
            "the",
            "agent",
            "**bold**",
            "*italic*",
            "_it_",
            "~~gone~~",
            "`a<b>&c`",
            "[link](https://x.test/?a=1&b=2)",
            "[bad](javascript:x)",
            "<tag>",
            "a&b",
            "snake_case",
            "end.",
            "done!",
            "中文。",
            "👍🏽",
            "x" * 60,
        ]
    ),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),
)
LINE = st.lists(WORD, min_size=1, max_size=12).map(" ".join)
CODE_LINE = st.one_of(LINE, st.text(max_size=40), st.sampled_from(["", "    x = '<a>' & b"]))
BLOCK = st.one_of(
    st.lists(LINE, min_size=1, max_size=4).map("\n".join),
    LINE.map(lambda line: "## " + line),
    st.lists(LINE, min_size=1, max_size=3).map(lambda lines: "\n".join("- " + x for x in lines)),
    st.lists(LINE, min_size=1, max_size=3).map(lambda lines: "\n".join("> " + x for x in lines)),
    st.builds(
        lambda language, lines: f"```{language}\n" + "\n".join(lines) + "\n```",
        st.sampled_from(["", "python", "sh", "a-rather-long-language-name"]),
        st.lists(CODE_LINE, max_size=15),
    ),
    st.just("---"),
)
MARKDOWN = st.lists(BLOCK, min_size=1, max_size=20).map("\n\n".join)
LIMITS = st.one_of(st.integers(64, 300), st.integers(64, LIMIT))


@PROPERTY
@given(markdown=MARKDOWN, limit=LIMITS)
def test_parts_fit_are_valid_and_lose_nothing(markdown: str, limit: int) -> None:
    check(to_html(markdown), limit)


@settings(PROPERTY, max_examples=60)
@given(text=ANY_TEXT, limit=st.integers(MIN_LIMIT, 80))
def test_any_rendered_text_splits_at_small_limits(text: str, limit: int) -> None:
    check(to_html(text), limit)
