"""Bar charts as inline SVG, for the report page.

Server-rendered SVG needs no script and no CDN (gateways often run without
internet access), prints, and is plain DOM that a test can read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#3b6ea8", "#e08a2c", "#4f9a5b", "#b04a5a")


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float]
    color: str = PALETTE[0]


def _fmt(value: float, money: bool) -> str:
    if money:
        return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"
    return f"{value:,.0f}"


def bar_chart(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    money: bool = False,
    width: int = 640,
    row_height: int = 22,
) -> str:
    """Horizontal grouped bars, one group per label, one bar per series."""
    label_w, value_w, pad = 150, 90, 8
    bars_w = width - label_w - value_w
    group_h = row_height * len(series) + pad
    height = 40 + group_h * max(1, len(labels)) + 24
    top = max([0.0, *(v for s in series for v in s.values)]) or 1.0
    parts = [
        f'<svg id="{escape(chart_id)}" class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="0" y="18" font-weight="bold">{escape(title)}</text>',
    ]
    if not labels:
        parts.append('<text class="empty" x="0" y="52">no usage in this period</text>')
    for i, label in enumerate(labels):
        y0 = 32 + i * group_h
        parts.append(
            f'<text class="bar-label" x="0" y="{y0 + group_h / 2:.0f}">{escape(label[:24])}</text>'
        )
        for j, s in enumerate(series):
            value = float(s.values[i])
            w = bars_w * value / top
            y = y0 + j * row_height
            text = _fmt(value, money)
            parts.append(
                f'<rect class="bar" data-series="{escape(s.name)}" data-label="{escape(label)}" '
                f'data-value="{value:.6f}" x="{label_w}" y="{y}" width="{w:.1f}" '
                f'height="{row_height - 4}" fill="{s.color}"><title>{escape(s.name)}, '
                f"{escape(label)}: {text}</title></rect>"
            )
            parts.append(
                f'<text class="bar-value" x="{label_w + w + 4:.1f}" y="{y + row_height - 8}" '
                f'font-size="11">{text}</text>'
            )
    legend_y = height - 8
    for j, s in enumerate(series):
        x = label_w + j * 160
        parts.append(
            f'<rect x="{x}" y="{legend_y - 10}" width="10" height="10" fill="{s.color}"/>'
            f'<text class="legend" x="{x + 14}" y="{legend_y}" font-size="11">'
            f"{escape(s.name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
