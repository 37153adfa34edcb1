"""Server-side SVG line plots for the dashboard (no JavaScript, no plotting library).

The job page plots loss and ε against the step. Steps restart at 1 in every phase
(teacher, then student), so a phase's points are shifted by the total steps of the
phases before it: x is the job's global step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

COLORS = ("#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed")


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y), x increasing


def metric_series(events: list[dict], key: str) -> list[Series]:
    """One series per phase from ``train.metrics`` event data (``phase``, ``step``,
    ``total_steps`` and ``key``); non-finite values (a NaN loss) are left out."""
    offsets: dict[str, int] = {}
    points: dict[str, list[tuple[float, float]]] = {}
    next_offset = 0
    for data in events:
        phase = str(data.get("phase") or "train")
        if phase not in offsets:
            offsets[phase] = next_offset
            points[phase] = []
        next_offset = max(
            next_offset,
            offsets[phase] + int(data.get("total_steps") or 0),
            offsets[phase] + int(data.get("step") or 0),
        )
        value, step = data.get(key), data.get("step")
        if isinstance(value, int | float) and math.isfinite(value) and step is not None:
            points[phase].append((float(offsets[phase] + int(step)), float(value)))
    return [Series(name, sorted(pts)) for name, pts in points.items() if pts]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (m * magnitude) <= count)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        if value >= lo - step * 1e-9:
            ticks.append(round(value, 12))
        value += step
    return ticks


def _bounds(values: list[float], *, zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if zero:
        lo = min(lo, 0.0)
    if hi - lo < 1e-12:  # a flat line: give it some room
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    ticks = nice_ticks(lo, hi)
    return min(lo, ticks[0]), max(hi, ticks[-1])


def line_plot(
    series: list[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    plot_id: str,
    width: int = 520,
    height: int = 240,
    y_from_zero: bool = False,
) -> Markup:
    """An inline ``<svg>``: axes with round ticks, one polyline and one ``<circle
    class="pt">`` per point per series (a ``<title>`` on each gives its value), and a
    legend when there are several series. Every text is escaped."""
    left, right, top, bottom = 56, 12, 28, 40
    inner_w, inner_h = width - left - right, height - top - bottom
    n_points = sum(len(s.points) for s in series)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{escape(plot_id)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" data-points="{n_points}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="16" class="plot-title" font-size="13" '
        f'font-weight="600" fill="#111827">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" fill="#ffffff" '
        f'stroke="#d1d5db"/>',
    ]
    if not n_points:
        parts.append(
            f'<text x="{left + inner_w / 2}" y="{top + inner_h / 2}" '
            f'text-anchor="middle" fill="#6b7280" font-size="12">no data yet</text>'
        )
        parts.append("</svg>")
        return Markup("".join(parts))
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_lo, x_hi = _bounds(xs, zero=True)
    y_lo, y_hi = _bounds(ys, zero=y_from_zero)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * inner_w

    def py(y: float) -> float:
        return top + inner_h - (y - y_lo) / (y_hi - y_lo) * inner_h

    for t in nice_ticks(y_lo, y_hi):
        parts.append(
            f'<line x1="{left}" x2="{left + inner_w}" y1="{py(t):.1f}" '
            f'y2="{py(t):.1f}" stroke="#f3f4f6"/>'
            f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" '
            f'font-size="11" fill="#4b5563">{t:.4g}</text>'
        )
    for t in nice_ticks(x_lo, x_hi):
        parts.append(
            f'<text x="{px(t):.1f}" y="{top + inner_h + 16}" text-anchor="middle" '
            f'font-size="11" fill="#4b5563">{t:.4g}</text>'
        )
    parts.append(
        f'<text x="{left + inner_w / 2}" y="{height - 6}" text-anchor="middle" '
        f'font-size="12" fill="#374151">{escape(x_label)}</text>'
        f'<text transform="translate(14 {top + inner_h / 2}) rotate(-90)" '
        f'text-anchor="middle" font-size="12" fill="#374151">{escape(y_label)}</text>'
    )
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(
            f'<polyline class="series" data-series="{escape(s.name)}" fill="none" '
            f'stroke="{color}" stroke-width="2" points="{coords}"/>'
        )
        for x, y in s.points:
            parts.append(
                f'<circle class="pt" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                f'fill="{color}"><title>{escape(s.name)} step {x:g}: {y:.4g}'
                f"</title></circle>"
            )
    if len(series) > 1:
        for i, s in enumerate(series):
            x = left + inner_w - 110
            y = top + 14 + 16 * i
            parts.append(
                f'<rect x="{x}" y="{y - 9}" width="10" height="10" '
                f'fill="{COLORS[i % len(COLORS)]}"/><text x="{x + 14}" y="{y}" '
                f'font-size="11" fill="#111827">{escape(s.name)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))
