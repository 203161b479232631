"""adapters.slack.format: an agent's Markdown rendered as Slack mrkdwn."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.slack.format import RULE, to_mrkdwn
from core.text import fences_balanced, split_text

CASES = [
    # emphasis
    ("**bold** and __bold__", "*bold* and *bold*"),
    ("*italic* and _italic_", "_italic_ and _italic_"),
    ("~~struck~~", "~struck~"),
    ("***both***", "_*both*_"),
    ("**bold with *italic* inside**", "*bold with _italic_ inside*"),
    ("*italic with **bold** inside*", "_italic with *bold* inside_"),
    ("**Note:** read this", "*Note:* read this"),
    ("(**bold**), *it*.", "(*bold*), _it_."),
    # markers that are not emphasis stay as written
    ("a lone * star and a lone _ too", "a lone * star and a lone _ too"),
    ("snake_case_names and __init__s", "snake_case_names and __init__s"),
    ("2*3*4 = 24", "2*3*4 = 24"),
    ("a * b * c", "a * b * c"),
    ("un**frigging**believable", "un**frigging**believable"),
    ("**unclosed bold", "**unclosed bold"),
    ("~5 minutes, ~~~ three", "~5 minutes, ~~~ three"),
    (r"\*not italic\* and \[not a link\](x)", r"\*not italic\* and [not a link](x)"),
    # links
    ("[the docs](https://example.com/docs)", "<https://example.com/docs|the docs>"),
    ("[q](https://x.test/?a=1&b=2)", "<https://x.test/?a=1&amp;b=2|q>"),
    ("[a | b](https://x.test)", "<https://x.test|a \u2223 b>"),
    ("[x > y & z](https://x.test)", "<https://x.test|x &gt; y &amp; z>"),
    ("[pipe](https://x.test/a|b)", "<https://x.test/a%7Cb|pipe>"),
    (
        "[Foo](https://en.wikipedia.org/wiki/Foo_(bar))",
        "<https://en.wikipedia.org/wiki/Foo_(bar)|Foo>",
    ),
    ('[t](https://x.test "Title")', "<https://x.test|t>"),
    ("[t](<https://x.test/a b>)", "<https://x.test/a%20b|t>"),
    ("[**Docs**](https://d.test)", "<https://d.test|*Docs*>"),
    ("**[Docs](https://d.test)**", "*<https://d.test|Docs>*"),
    ("[see https://a.test](https://b.test)", "<https://b.test|see https://a.test>"),
    (
        "[a [b] c](https://x.test) [a\\]b](https://y.test)",
        "<https://x.test|a [b] c> <https://y.test|a]b>",
    ),
    ("[](https://x.test)", "<https://x.test>"),
    ("[relative](/docs/x) and [js](javascript:alert(1))", "relative and js"),
    ("[not a link] (https://x.test)", "[not a link] (<https://x.test>)"),
    ("<https://x.test/a?b=1>", "<https://x.test/a?b=1>"),
    ("<mailto:a@b.test>", "<mailto:a@b.test>"),
    ("<a@b.test>", "<mailto:a@b.test|a@b.test>"),
    ("<ftp://x.test>", "&lt;ftp://x.test&gt;"),
    ("<https://x.test|written for Slack>", "<https://x.test|written for Slack>"),
    ("see https://x.test/a_b_c.", "see <https://x.test/a_b_c>."),
    (
        "(https://x.test/a) and https://x.test/b?c=1&d=2!",
        "(<https://x.test/a>) and <https://x.test/b?c=1&amp;d=2>!",
    ),
    ("**https://x.test**", "*<https://x.test>*"),
    ("![a chart](https://x.test/c.png)", "<https://x.test/c.png|a chart>"),
    ("![](https://x.test/c.png)", "<https://x.test/c.png>"),
    # blocks
    ("# Title", "*Title*"),
    ("### Step 2: run it ###", "*Step 2: run it*"),
    ("## **Already bold** title", "*Already bold title*"),
    ("#hashtag", "#hashtag"),
    ("- one\n* two\n+ three", "• one\n• two\n• three"),
    ("- **Bold**: text\n-not a bullet", "• *Bold*: text\n-not a bullet"),
    ("- top\n  - nested\n    * deeper", "• top\n  • nested\n    • deeper"),
    ("1. first\n2) **second**", "1. first\n2) *second*"),
    ("> quoted *text*", "> quoted _text_"),
    (">tight\n>\n> - item", "> tight\n>\n> • item"),
    ("> > nested", "> &gt; nested"),
    ("---", RULE),
    ("* * *\n___", f"{RULE}\n{RULE}"),
    (
        "| a | b |\n|---|:--:|\n| **1** | <2> |\n\nafter",
        "```\n| a | b |\n|---|:--:|\n| **1** | &lt;2&gt; |\n```\n\nafter",
    ),
    ("a | b, not a table", "a | b, not a table"),
    # code: as written, but escaped
    ("`**not bold** <b> & [x](y)`", "`**not bold** &lt;b&gt; &amp; [x](y)`"),
    ("``a ` b``", "``a ` b``"),
    ("`<!here>` and `a&b`", "`&lt;!here&gt;` and `a&amp;b`"),
    ("`unclosed **b**", "`unclosed *b*"),
    (
        "```python\nif a < b and c > d & e:\n    print('**x**')\n```",
        "```\nif a &lt; b and c &gt; d &amp; e:\n    print('**x**')\n```",
    ),
    ("~~~\n<!here>\n~~~", "```\n&lt;!here&gt;\n```"),
    ("  ```sh\n  ls *.py\n  ```", "  ```\n  ls *.py\n  ```"),
    ("```js\nopen = 1", "```\nopen = 1"),
    ("```inline``` code", "```inline``` code"),
    # escaping and mentions
    ("a & b < c > d", "a &amp; b &lt; c &gt; d"),
    ("&amp; stays what was written", "&amp;amp; stays what was written"),
    ("<!everyone> <!channel> <!here>", "&lt;!everyone&gt; &lt;!channel&gt; &lt;!here&gt;"),
    ("<@U123ABC> and <#C1|general>", "&lt;@U123ABC&gt; and &lt;#C1|general&gt;"),
    ("<!subteam^S1> <!date^1|x>", "&lt;!subteam^S1&gt; &lt;!date^1|x&gt;"),
    ("[click](https://x.test|<!here>)", "<https://x.test%7C%3C!here%3E|click>"),
    (">>> not a multi-line quote", "> &gt;&gt; not a multi-line quote"),
    ("line one\r\nline two", "line one\nline two"),
]


@pytest.mark.parametrize(("markdown", "expected"), CASES)
def test_renders(markdown: str, expected: str) -> None:
    assert to_mrkdwn(markdown) == expected


LLM_ANSWER = """\
## Setting up the webhook

To receive events, you need **two things**:

- A public URL (see [the guide](https://docs.example.com/hooks?lang=en&v=2))
- A *signing secret*, kept in `SECRET_KEY`

### Example

```python
def verify(body: bytes, sig: str) -> bool:
    return hmac.compare_digest(sign(body), sig)  # a < b && c > d
```

> **Note:** never log the secret.

1. Deploy
2. Test with `curl -X POST <url>`

---
That's it! Ask me if anything is unclear."""

LLM_MRKDWN = """\
*Setting up the webhook*

To receive events, you need *two things*:

• A public URL (see <https://docs.example.com/hooks?lang=en&amp;v=2|the guide>)
• A _signing secret_, kept in `SECRET_KEY`

*Example*

```
def verify(body: bytes, sig: str) -&gt; bool:
    return hmac.compare_digest(sign(body), sig)  # a &lt; b &amp;&amp; c &gt; d
```

> *Note:* never log the secret.

1. Deploy
2. Test with `curl -X POST &lt;url&gt;`

────────────
That's it! Ask me if anything is unclear."""


def test_a_realistic_answer() -> None:
    assert to_mrkdwn(LLM_ANSWER) == LLM_MRKDWN


def test_a_rendered_answer_splits_into_balanced_parts() -> None:
    rendered = to_mrkdwn(LLM_ANSWER * 20)
    parts = split_text(rendered, 500)
    assert len(parts) > 1
    assert all(len(part) <= 500 and fences_balanced(part) for part in parts)


# -- property: agent text never becomes Slack syntax ------------------------------------

GENERATED_LINK = re.compile(r"<(?:https?://|mailto:)[^\s<>|]*(?:\|[^<>\n]*)?>", re.IGNORECASE)
QUOTE_MARKER = re.compile(r"^([ \t]{0,3})>", re.MULTILINE)
ENTITY = re.compile(r"&(?:amp|lt|gt);")

PIECES = st.sampled_from(
    [
        "<",
        ">",
        "&",
        "!",
        "@",
        "#",
        "|",
        "*",
        "**",
        "_",
        "__",
        "~~",
        "`",
        "```",
        "~~~",
        "[",
        "]",
        "(",
        ")",
        "\\",
        " ",
        " ",
        "\n",
        "\n\n",
        "> ",
        "# ",
        "- ",
        "1. ",
        "|---|",
        "x",
        "word",
        "https://",
        "http://x.test/a",
        "mailto:",
        "a@b.test",
        "<!here>",
        "<!channel>",
        "<!everyone>",
        "<@U1>",
        "<#C1>",
        "<!subteam^S1>",
        "javascript:",
        "](",
        "<https://",
        "![",
        "%",
        ";",
        "&lt;",
        "é",
        "😀",
    ]
)
TEXT = st.builds("".join, st.lists(st.one_of(PIECES, st.text(max_size=3)), max_size=60))


def outside_links_and_quotes(mrkdwn: str) -> str:
    return QUOTE_MARKER.sub(r"\1", GENERATED_LINK.sub("", mrkdwn))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markdown=TEXT)
def test_agent_text_never_becomes_a_mention_or_raw_markup(markdown: str) -> None:
    out = to_mrkdwn(markdown)
    assert "<!" not in out and "<@" not in out and "<#" not in out
    rest = outside_links_and_quotes(out)
    assert "<" not in rest and ">" not in rest, (markdown, out)
    assert "&" not in ENTITY.sub("", out), (markdown, out)
    for link in GENERATED_LINK.findall(out):
        assert re.match(r"<(https?://|mailto:)", link, re.IGNORECASE)
