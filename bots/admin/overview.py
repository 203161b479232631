"""The overview page's figures: conversations per source per day, and the failed turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from markupsafe import Markup, escape
from sqlalchemy.engine import Connection

from core.sql import conversations, inbox
from core.store import Store, aware

# One colour per source, readable on white and told apart by most colour-blind readers.
COLOURS = {
    "slack": "#7b3f98",
    "discord": "#4e5de4",
    "telegram": "#1c93d1",
    "web": "#d9730d",
    "cli": "#4d7c0f",
}
OTHER = "#6b7280"


@dataclass(slots=True)
class Overview:
    """Conversations per day and source over `days`, and the newest failed turns."""

    days: list[date]
    per_day: dict[date, dict[str, int]] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    failed_total: int = 0

    @property
    def sources(self) -> list[str]:
        return sorted({s for counts in self.per_day.values() for s in counts})

    def total(self, source: str | None = None) -> int:
        return sum(
            n for counts in self.per_day.values() for s, n in counts.items() if source in (None, s)
        )


async def overview(store: Store, days: int = 14, failed_limit: int = 20) -> Overview:
    """The last `days` days (today included, UTC) and the newest failed turns."""
    today = datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    day = sa.func.date(conversations.c.created)
    per_day = (
        sa.select(day, conversations.c.source, sa.func.count())
        .where(conversations.c.created >= start)
        .group_by(day, conversations.c.source)
    )
    failed = (
        sa.select(
            inbox.c.event_id,
            inbox.c.thread_key,
            inbox.c.source,
            inbox.c.conversation_id,
            inbox.c.error,
            inbox.c.updated,
        )
        .where(inbox.c.status == "failed")
        .order_by(inbox.c.id.desc())
        .limit(failed_limit)
    )
    failed_count = sa.select(sa.func.count()).select_from(inbox).where(inbox.c.status == "failed")

    def job(conn: Connection) -> tuple[list[Any], list[Any], int]:
        return (
            list(conn.execute(per_day).all()),
            list(conn.execute(failed).all()),
            int(conn.execute(failed_count).scalar_one()),
        )

    counts, failures, failed_total = await store.read(job, snapshot=True)
    out = Overview(days=[first + timedelta(days=i) for i in range(days)])
    for stamp, source, count in counts:
        when = stamp if isinstance(stamp, date) else date.fromisoformat(str(stamp)[:10])
        out.per_day.setdefault(when, {})[source] = int(count)
    out.failed = [
        {
            "event_id": r.event_id,
            "thread_key": r.thread_key,
            "source": r.source,
            "conversation_id": r.conversation_id,
            "error": r.error or "",
            "when": aware(r.updated),
        }
        for r in failures
    ]
    out.failed_total = failed_total
    return out


def chart_svg(view: Overview, width: int = 420, height: int = 180) -> Markup:
    """A stacked bar chart of conversations per day, coloured by source, as inline SVG."""
    top, bottom, left, right = 12, 26, 30, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([sum(view.per_day.get(d, {}).values()) for d in view.days] + [1])
    slot = plot_w / max(len(view.days), 1)
    bar = max(slot * 0.7, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="conversations per day by source, peak {peak}" '
        'xmlns="http://www.w3.org/2000/svg" font-size="12" font-family="sans-serif">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        'stroke="#9ca3af"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" fill="#374151">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" fill="#374151">0</text>',
    ]
    every = max(1, round(len(view.days) / 7))
    for index, day in enumerate(view.days):
        x = left + index * slot + (slot - bar) / 2
        y = float(top + plot_h)
        for source, count in sorted(view.per_day.get(day, {}).items()):
            h = plot_h * count / peak
            y -= h
            label = escape(f"{day.isoformat()} {source}: {count}")
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS.get(source, OTHER)}"><title>{label}</title></rect>'
            )
        if (len(view.days) - 1 - index) % every == 0:  # counted back from today
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - 10}" text-anchor="middle" '
                f'fill="#374151">{day.strftime("%m-%d")}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # every text in it is a number, a date or escaped
