"""What the admin pages read from a request: the search query and posted forms.

The search filters themselves are read by `core.search.search_filters`, as the CLI and the API
read theirs, so the three take the same values and refuse the same ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import HTTPException, Request
from starlette.datastructures import QueryParams

from core.search import FilterError, SearchFilters, search_filters

PAGE_SIZES = (10, 25, 50, 100, 200)
FORM_BYTES = 64 * 1024
TEXT_FIELDS = ("source", "workspace", "channel", "user", "agent", "text")


@dataclass(slots=True)
class SearchForm:
    """The search page's query, as typed: re-shown in the form, carried by the paging links."""

    values: dict[str, str] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    limit: int = 25
    offset: int = 0
    reversed: bool = True
    errors: list[str] = field(default_factory=list)
    filters: SearchFilters | None = None  # None when `errors` says why

    def link(self, offset: int) -> str:
        """This search's URL at another offset."""
        pairs: list[tuple[str, Any]] = [(k, v) for k, v in self.values.items() if v]
        pairs += [("data", d) for d in self.data]
        pairs += [("limit", self.limit), ("offset", offset)]
        if not self.reversed:
            pairs.append(("order", "oldest"))
        return "/admin/conversations?" + urlencode(pairs)


def search_form(params: QueryParams) -> SearchForm:
    """Read the search page's query; what cannot be used goes to `errors`, never a 500."""
    form = SearchForm()
    for name in (*TEXT_FIELDS, "status", "since", "until"):
        form.values[name] = (params.get(name) or "").strip()[:1000]
    form.data = [d.strip()[:1000] for d in params.getlist("data") if d.strip()][:50]
    for name in ("limit", "offset"):
        raw = params.get(name)
        if raw is None or raw == "":
            continue
        if not raw.isdigit() or len(raw) > 9:
            form.errors.append(f"{name} {raw[:20]!r}: a whole number, please")
        elif name == "limit":
            form.limit = int(raw)
        else:
            form.offset = int(raw)
    form.reversed = params.get("order") != "oldest"
    try:
        form.filters = search_filters(
            **{name: form.values[name] for name in (*TEXT_FIELDS, "status", "since", "until")},
            data=form.data,
            limit=form.limit,
            offset=form.offset,
            reversed=form.reversed,
        )
    except FilterError as exc:
        form.errors.append(str(exc))
    return form


async def posted_form(request: Request) -> dict[str, str]:
    """A URL-encoded form's fields (the last value of each); 4xx for anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_BYTES:
            raise HTTPException(413, f"a form is at most {FORM_BYTES // 1024} KiB")
    try:
        text = body.decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=100))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form is not valid UTF-8 URL-encoded text") from None
