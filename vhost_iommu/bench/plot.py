"""The PNG of the guest benchmark: bars per workload, one per back-end (needs the ``bench`` extra).

Two panels, because the figures live on different scales: latencies per guest operation (microseconds)
on the left, totals of one MAP_DMA or UNMAP_DMA over N pages (milliseconds, logarithmic: they span three
orders of magnitude) on the right. Each bar other than the built-in's carries its ratio to the built-in
device. Per-size mixed figures stay in the table; the plot shows their mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vhost_iommu.bench.results import BACKEND_TITLES, BACKENDS, BUILTIN, MIXED, Row

_COLOURS = {
    "builtin": "#4c72b0",
    "vhost-iommu": "#dd8452",
    "empty": "#8c8c8c",
    "vhost-iommu-python": "#c44e52",
    "vhost-iommu-thread": "#55a868",
    "vhost-iommu-loop": "#8172b3",
    "empty-thread": "#b5d8a0",
    "empty-loop": "#c8c0e0",
}


def _short_label(row: Row) -> str:
    metric = row.metric
    if metric.workload == "pairs":
        return "pairs\n(per pair)"
    if metric.workload == "bulk-map":
        return f"N={metric.count} maps\n(per map)"
    if metric.workload == "bulk-unmap":
        return f"unmap N={metric.count}\nsingle pages"
    if metric.workload == "scatter-map":
        return f"map N={metric.count}\nscattered"
    if metric.workload == "scatter-unmap":
        return f"unmap N={metric.count}\nscattered"
    return "mixed 4K..2M\n(per pair)"


def plot_rows(rows: Sequence[Row], path: Path, title: str, backends: Sequence[str] = BACKENDS) -> None:
    """Write the bar chart of ``rows`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    # The per-size mixed rows are detail for the table; the plot keeps their all-sizes mean.
    shown = [row for row in rows if row.metric.workload != MIXED or row.metric.size == 0]
    panels = [
        ([row for row in shown if row.metric.per_operation], "per guest operation (us)", 1e3),
        ([row for row in shown if not row.metric.per_operation], "total of one operation (ms)", 1e6),
    ]
    panels = [panel for panel in panels if panel[0]]
    widths = [max(2, len(panel[0])) for panel in panels]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(3 + 1.2 * sum(widths), 5.5), width_ratios=widths, squeeze=False
    )
    bar_width = 0.8 / len(backends)
    for axis, (panel_rows, unit_label, scale) in zip(axes[0], panels, strict=True):
        for index, backend in enumerate(backends):
            offset = (index - (len(backends) - 1) / 2) * bar_width
            positions = [number + offset for number in range(len(panel_rows))]
            heights = [
                row.by_backend[backend].figure.mean_ns / scale if backend in row.by_backend else 0.0
                for row in panel_rows
            ]
            bars = axis.bar(
                positions,
                heights,
                bar_width,
                label=BACKEND_TITLES.get(backend, backend),
                color=_COLOURS.get(backend),
            )
            if backend == BUILTIN:
                continue
            for bar, row in zip(bars, panel_rows, strict=True):
                ratio = row.ratio(backend)
                if ratio is not None:
                    axis.annotate(
                        f"{ratio:.1f}x",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        axis.set_xticks(range(len(panel_rows)), [_short_label(row) for row in panel_rows], fontsize=8)
        axis.set_ylabel(f"mean, {unit_label}" if scale == 1e3 else unit_label)
        if scale != 1e3:
            axis.set_yscale("log")
        axis.grid(axis="y", alpha=0.3)
        axis.margins(y=0.12)  # room for the ratio labels above the tallest bars
    # One legend for both panels, between the title and the plots, where it covers no bar.
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="upper center", ncol=len(backends), fontsize=8, bbox_to_anchor=(0.5, 0.94)
    )
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.89))
    figure.savefig(path, dpi=110)
    plt.close(figure)
