"""Pictures of a checkpoint's parameters, and of tensors across a run's checkpoints (matplotlib,
Agg backend, imported only here, only for --plot).

`stats --plot FILE` draws, above, the norm and the std of each kind of tensor by layer (the
first number in a name is its layer: `transformer.h.3.attn.c_attn.weight` is `c_attn.weight`
at depth 3), and below, a histogram of each tensor's finite values. `stats --trend --plot FILE`
draws norm, std and the change from the previous checkpoint against the step. FILE's extension
chooses the kind: .png, .svg, or .html (the SVG inline in a page, with the figures as a table).
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from paramctl.errors import UsageError
from paramctl.table import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = (".png", ".svg", ".html")
MAX_HISTOGRAMS = 24
MAX_LINES = 20
HIST_BINS = 60
COLUMNS = 4


def check_target(path: str) -> str:
    kind = path[path.rfind(".") :].lower() if "." in path else ""
    if kind not in KINDS:
        raise UsageError(f"--plot writes {', '.join(KINDS)} files, not {path!r}")
    return kind


SEPARATORS = re.compile(r"[./]")
NUMBERED = re.compile(r"^(\D*?)(\d+)$")  # `3`, `block 3`, `layer_3`


def depth_part(names: Sequence[str]) -> int | None:
    """Which part of the names (split on `.` and `/`) numbers the layers: of the parts that end in
    a number (`h.3`, `block 3`, `layers/3`), the one whose numbers take the most values."""
    values: dict[int, set[int]] = {}
    for name in names:
        for i, part in enumerate(SEPARATORS.split(name)):
            m = NUMBERED.match(part)
            if m:
                values.setdefault(i, set()).add(int(m.group(2)))
    best = max(values, key=lambda i: (len(values[i]), -i), default=None)
    return best if best is not None and len(values[best]) >= 2 else None


def depth_of(name: str, part: int | None) -> tuple[int | None, str]:
    """(NAME's layer: the number in its PART, NAME with that number starred) or (None, NAME)."""
    if part is None:
        return None, name
    pieces = re.split(r"([./])", name)
    index = 2 * part
    m = NUMBERED.match(pieces[index]) if index < len(pieces) else None
    if not m:
        return None, name
    pieces[index] = m.group(1) + "*"
    return int(m.group(2)), "".join(pieces)


def histogram(t: Tensor, low: float, high: float) -> tuple[Any, Any]:
    """Counts and edges of T's finite values over [LOW, HIGH], streamed; fewer bins for a few values."""
    import numpy as np

    if low == high:
        low, high = low - 0.5, high + 0.5
    bins = max(8, min(HIST_BINS, int(math.sqrt(t.numel))))
    counts = np.zeros(bins, np.int64)
    for chunk in t.chunks():
        values = chunk.astype(np.float64)
        counts += np.histogram(values[np.isfinite(values)], bins=bins, range=(low, high))[0]
    return counts, np.linspace(low, high, bins + 1)


def pick_histograms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """All of TENSORS if few; else the shallowest of each kind (the first layer's c_attn.weight,
    ...), then the tensors outside the layers, up to MAX_HISTOGRAMS."""
    if len(tensors) <= MAX_HISTOGRAMS:
        return list(tensors)
    seen: set[str] = set()
    chosen = []
    part = depth_part([t.name for t in tensors])
    for t in tensors:
        _, kind = depth_of(t.name, part)
        if kind not in seen:
            seen.add(kind)
            chosen.append(t)
    return chosen[:MAX_HISTOGRAMS]


def short(name: str, width: int = 38) -> str:
    from paramctl.output import escape

    name = escape(name)
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def stats_figure(tensors: Sequence[Tensor], rows: Sequence[dict[str, Any]], title: str) -> tuple[Figure, int]:
    """The figure for `stats --plot` and how many tensors got a histogram."""
    from matplotlib.figure import Figure

    by_name = {r["name"]: r for r in rows}
    chosen = [t for t in pick_histograms(tensors) if by_name[t.name]["min"] is not None]
    hist_rows = math.ceil(len(chosen) / COLUMNS)
    fig = Figure(figsize=(4 * COLUMNS, 3.6 + 2.3 * hist_rows), layout="constrained")
    fig.suptitle(short(title, 100), fontsize=12)
    parts = fig.subfigures(2, 1, squeeze=False, height_ratios=[3.6, 2.3 * max(hist_rows, 1)])
    top, bottom = parts[0, 0], parts[1, 0]
    depth_chart(top, rows)
    axes = bottom.subplots(max(hist_rows, 1), COLUMNS, squeeze=False).ravel()
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    for ax, t in zip(axes, chosen):
        row = by_name[t.name]
        counts, edges = histogram(t, row["min"], row["max"])
        ax.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.85)
        ax.set_title(short(t.name), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.text(
            0.98,
            0.95,
            f"std {row['std']:.3g}\nmean {row['mean']:.2g}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="#333",
            bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1},
        )
    if chosen:
        bottom.suptitle(f"histograms of the values ({len(chosen)} of {len(tensors)} tensors)", fontsize=10)
    return fig, len(chosen)


def depth_chart(fig: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Norm and std by layer for every kind of tensor found in two layers or more; without
    layers, the norm of each tensor in order."""
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    part = depth_part([r["name"] for r in rows])
    for r in rows:
        depth, kind = depth_of(r["name"], part)
        if depth is not None and r["std"] is not None:
            series.setdefault(kind, []).append((depth, r))
    series = {k: v for k, v in series.items() if len({d for d, _ in v}) >= 2}
    left, right = fig.subplots(1, 2)
    if not series:
        shown = [r for r in rows if r["std"] is not None][:40]
        for ax, key in ((left, "norm"), (right, "std")):
            ax.barh(range(len(shown)), [r[key] for r in shown], color="#4c72b0")
            ax.set_yticks(range(len(shown)), [short(r["name"], 30) for r in shown], fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{key} by tensor", fontsize=10)
        return
    from matplotlib import cm
    from matplotlib.ticker import MaxNLocator

    kinds = sorted(series, key=lambda k: -max(r["numel"] for _, r in series[k]))[:12]
    # the legend names what follows the layer number when every kind shares what precedes it
    prefixes = {kind[: kind.index("*") + 1] for kind in kinds}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    colors = [cm.tab20(i / 20) for i in range(20)][::2] + [cm.tab20(i / 20) for i in range(20)][1::2]
    for ax, key in ((left, "norm"), (right, "std")):
        ax.set_prop_cycle(color=colors)
        for kind in kinds:
            points = sorted(series[kind], key=lambda p: p[0])
            depths, values = [d for d, _ in points], [r[key] for _, r in points]
            label = kind[len(prefix) :].lstrip("./") if prefix else kind
            ax.plot(depths, values, marker="o", markersize=3, label=short(label, 30))
        ax.set_xlabel("layer (the number in the name that varies most)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{key} (L2)" if key == "norm" else "std", fontsize=10)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    title = f"{short(prefix, 30)} …" if prefix else "layer * is"
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title=title, title_fontsize=7)


def trend_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """norm, std and change from the previous checkpoint, against the step, one line per tensor."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["name"] for r in rows))[:MAX_LINES]
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    fig.suptitle(short(title, 100), fontsize=12)
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(
        axes, ("norm", "std", "rel_change"), ("norm (L2)", "std", "change from the previous: ||x - prev|| / ||prev||")
    ):
        for name in names:
            points = [(r["step"], r[key]) for r in rows if r["name"] == name and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=short(name, 34))
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
        if key == "rel_change" and any(r[key] for r in rows):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    return fig


def save_figure(fig: Figure, path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    """FIG written to PATH atomically: PNG, SVG, or an HTML page with the SVG and ROWS as a table."""
    from paramctl.formats import atomic_path

    kind = check_target(path)
    with atomic_path(path) as tmp:
        if kind == ".html":
            svg = io.StringIO()
            fig.savefig(svg, format="svg")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(html_page(svg.getvalue(), rows, columns, title))
        else:
            fig.savefig(tmp, format=kind[1:], dpi=90)


def html_page(svg: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return "" if value is None else str(value)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(r.get(c)))}</td>" for c in columns) + "</tr>\n" for r in rows
    )
    svg = svg[svg.find("<svg") :]  # the figure without its XML prologue
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body><h2>{html.escape(title)}</h2>\n{svg}\n<table><tr>{head}</tr>\n{body}</table></body></html>\n"
    )


def plot_stats(
    tensors: Sequence[Tensor], rows: Sequence[dict[str, Any]], path: str, title: str, columns: Sequence[str]
) -> int:
    """Write the `stats --plot` picture; returns how many tensors got a histogram."""
    check_target(path)
    fig, shown = stats_figure(tensors, rows, title)
    save_figure(fig, path, rows, columns, title)
    return shown


def plot_trend(rows: Sequence[dict[str, Any]], path: str, title: str, columns: Sequence[str]) -> None:
    check_target(path)
    save_figure(trend_figure(rows, title), path, rows, columns, title)
