"""Usage per UTC day, by key or by model, drawn as pygal SVG charts rendered on the server.

Titles, axis labels and numbers are in the page's language and locale (web/language.py).
"""

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Any

import pygal
from flask_babel import gettext
from markupsafe import Markup
from pygal.style import Style

from relay.store import Store
from relay.web.language import day, number

DAY = 86400
EPOCH = dt.date(1970, 1, 1)
# Past this many series a stacked chart is unreadable: the smallest are summed into one.
MAX_SERIES = 8
STYLE = Style(
    background="transparent",
    plot_background="transparent",
    foreground="#444",
    foreground_strong="#111",
    foreground_subtle="#ccc",
    opacity="0.9",
    opacity_hover="1",
    font_family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
    label_font_size=11,
    major_label_font_size=11,
    legend_font_size=12,
    title_font_size=15,
    colors=(
        "#2563eb",
        "#f59e0b",
        "#10b981",
        "#ef4444",
        "#8b5cf6",
        "#06b6d4",
        "#ec4899",
        "#84cc16",
    ),
)


@dataclass
class DailyUsage:
    """Tokens and calls per day for each series (a key or a model), oldest day first."""

    days: list[dt.date]
    tokens: dict[str, list[int]]
    calls: dict[str, list[int]]


def daily_usage(
    store: Store, by: str, days: int = 30, key_id: int | None = None, now: float | None = None
) -> DailyUsage:
    """The last `days` UTC days of usage grouped by `by` ("key" or "model"), one key's if given."""
    today = int((now if now is not None else time.time()) // DAY)
    first = today - days + 1
    tokens: dict[str, list[int]] = {}
    calls: dict[str, list[int]] = {}
    for row in store.daily_totals(by, first, key_id):
        index = row["day"] - first
        if not 0 <= index < days:  # a row stamped in the future (clock moved back)
            continue
        tokens.setdefault(row["name"], [0] * days)[index] += row["tokens"]
        calls.setdefault(row["name"], [0] * days)[index] += row["calls"]
    labels = [EPOCH + dt.timedelta(days=first + i) for i in range(days)]
    return DailyUsage(labels, tokens, calls)


def _largest(series: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    """The series with the biggest totals first; the rest summed into one `(others)` series."""
    ranked = sorted(series.items(), key=lambda item: (-sum(item[1]), item[0]))
    if len(ranked) <= MAX_SERIES:
        return ranked
    kept, rest = ranked[: MAX_SERIES - 1], ranked[MAX_SERIES - 1 :]
    others = gettext("(others)")
    return [*kept, (others, [sum(values) for values in zip(*(v for _, v in rest), strict=True)])]


def _plain_svg(root: Any) -> Any:
    """Drop pygal's <script> (nothing runs on these pages) and give each bar a native tooltip."""
    for parent in root.iter():
        for child in list(parent):
            if child.tag == "script":
                parent.remove(child)
    for group in root.iter("g"):
        descriptions = {d.get("class"): d.text for d in group.findall("desc")}
        if "value" in descriptions and "x_label" in descriptions:
            title = group.makeelement("title", {})
            title.text = f"{descriptions['x_label']}: {descriptions['value']}"
            group.insert(0, title)
    return root


def _ticks(top: float) -> list[int]:
    """Whole-number y-axis ticks from 0 past `top`, about five of them (calls are never 0.3)."""
    if top <= 0:
        return [0, 1]
    rough = top / 5
    magnitude = 10 ** math.floor(math.log10(rough)) if rough >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    return list(range(0, math.ceil(top / step) * step + 1, step))


def bar_chart(title: str, days: list[dt.date], series: dict[str, list[int]], unit: str) -> Markup:
    """A stacked bar chart of per-day values, as inline SVG markup (no JavaScript, no CDN)."""
    chart = pygal.StackedBar(
        js=[],  # pygal's default tooltip script comes from a CDN; the pages work offline
        disable_xml_declaration=True,
        style=STYLE,
        width=760,
        height=320,
        legend_at_bottom=True,
        legend_at_bottom_columns=4,
        truncate_legend=32,
        truncate_label=-1,
        show_minor_x_labels=False,
        x_labels_major_every=5,
        y_title=unit,
        no_data_text=gettext("No calls in these days"),
    )
    chart.add_xml_filter(_plain_svg)  # pygal ignores xml_filters given as a setting
    chart.title = title
    chart.x_labels = [day(date) for date in days]
    chart.value_formatter = number
    ranked = _largest(series)
    for name, values in ranked:
        chart.add(name, values)
    if ranked:
        chart.y_labels = _ticks(max(map(sum, zip(*(v for _, v in ranked), strict=True))))
    return Markup(chart.render(is_unicode=True))  # noqa: S704 - pygal escapes every text node


def usage_charts(usage: DailyUsage, what: str) -> dict[str, Markup]:
    """Tokens and calls per day for one DailyUsage, titled by what the series are."""
    if what == "key":
        titles = gettext("Tokens per day, by key"), gettext("Calls per day, by key")
    else:
        titles = gettext("Tokens per day, by model"), gettext("Calls per day, by model")
    return {
        "tokens": bar_chart(titles[0], usage.days, usage.tokens, gettext("tokens")),
        "calls": bar_chart(titles[1], usage.days, usage.calls, gettext("calls")),
    }
