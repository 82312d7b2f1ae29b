"""Charts as inline SVG (bars, time-series lines, stacked bars) for the report
page and the console.

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
        # Enough decimals that small amounts (cents of tiny models) do not
        # all print as $0.0000.
        if value >= 100:
            return f"${value:,.2f}"
        return f"${value:,.4f}" if value >= 0.01 or value == 0 else f"${value:,.6f}"
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


def _legend(series: Sequence[Series], x0: int, y: int) -> list[str]:
    parts = []
    for j, s in enumerate(series):
        x = x0 + j * 150
        parts.append(
            f'<rect x="{x}" y="{y - 10}" width="10" height="10" fill="{s.color}"/>'
            f'<text class="legend" x="{x + 14}" y="{y}" font-size="11">{escape(s.name)}</text>'
        )
    return parts


def _axis(
    labels: Sequence[str], top: float, money: bool, box: tuple[int, int, int, int]
) -> list[str]:
    """Y gridlines at 0, half and top, and at most ~8 x labels (dates)."""
    left, y0, plot_w, plot_h = box
    parts = []
    for frac in (0.0, 0.5, 1.0):
        y = y0 + plot_h - plot_h * frac
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#ddd"/><text class="tick" x="{left - 4}" y="{y + 4:.1f}" '
            f'font-size="10" text-anchor="end">{_fmt(top * frac, money)}</text>'
        )
    step = max(1, -(-len(labels) // 8))
    slot = plot_w / max(1, len(labels))
    for i in range(0, len(labels), step):
        x = left + slot * (i + 0.5)
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{y0 + plot_h + 14}" font-size="10" '
            f'text-anchor="middle">{escape(labels[i][5:] if len(labels[i]) == 10 else labels[i])}'
            "</text>"
        )
    return parts


def line_chart(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    money: bool = False,
    width: int = 640,
    height: int = 240,
) -> str:
    """A time series: one line per series over evenly spaced labels (days).

    Each point is a circle carrying its value in data attributes and a
    <title>, so the numbers are readable without hovering or scripts.
    """
    left, y0, plot_w, plot_h = 70, 30, width - 80, height - 80
    top = max([0.0, *(v for s in series for v in s.values)]) or 1.0
    parts = [
        f'<svg id="{escape(chart_id)}" class="chart" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="0" y="16" font-weight="bold">{escape(title)}</text>',
    ]
    if not labels:
        parts.append('<text class="empty" x="0" y="52">no usage in this period</text></svg>')
        return "".join(parts)
    parts += _axis(labels, top, money, (left, y0, plot_w, plot_h))
    slot = plot_w / len(labels)
    # Dashes besides colours: lines that coincide or colours that look alike
    # can still be told apart.
    dashes = ("", "6 3", "2 3", "8 3 2 3")
    for j, s in enumerate(series):
        dash = dashes[j % len(dashes)]
        points = [
            (left + slot * (i + 0.5), y0 + plot_h - plot_h * float(v) / top)
            for i, v in enumerate(s.values)
        ]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(
            f'<polyline class="line" data-series="{escape(s.name)}" points="{path}" '
            f'fill="none" stroke="{s.color}" stroke-width="2" stroke-dasharray="{dash}"/>'
        )
        for (x, y), label, v in zip(points, labels, s.values, strict=True):
            parts.append(
                f'<circle class="point" data-series="{escape(s.name)}" '
                f'data-label="{escape(label)}" data-value="{float(v):.6f}" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="3" fill="{s.color}"><title>{escape(s.name)}, {escape(label)}: '
                f"{_fmt(float(v), money)}</title></circle>"
            )
    parts += _legend(series, left, height - 8)
    parts.append("</svg>")
    return "".join(parts)


def stacked_bars(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    money: bool = False,
    width: int = 640,
    height: int = 240,
) -> str:
    """Vertical bars per label (day), the series stacked in each bar."""
    left, y0, plot_w, plot_h = 70, 30, width - 80, height - 80
    totals = [sum(float(s.values[i]) for s in series) for i in range(len(labels))]
    top = max([0.0, *totals]) or 1.0
    parts = [
        f'<svg id="{escape(chart_id)}" class="chart" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="0" y="16" font-weight="bold">{escape(title)}</text>',
    ]
    if not labels:
        parts.append('<text class="empty" x="0" y="52">no usage in this period</text></svg>')
        return "".join(parts)
    parts += _axis(labels, top, money, (left, y0, plot_w, plot_h))
    slot = plot_w / len(labels)
    bar_w = max(1.0, slot * 0.7)
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar_w) / 2
        base = y0 + plot_h
        for s in series:
            v = float(s.values[i])
            h = plot_h * v / top
            base -= h
            parts.append(
                f'<rect class="bar" data-series="{escape(s.name)}" data-label="{escape(label)}" '
                f'data-value="{v:.6f}" x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{s.color}"><title>{escape(s.name)}, {escape(label)}: '
                f"{_fmt(v, money)}</title></rect>"
            )
    parts += _legend(series, left, height - 8)
    parts.append("</svg>")
    return "".join(parts)
