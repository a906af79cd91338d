"""The one picture of reference diagnostics: a grid of panels, one per diagnostic, each a few lines.

scripts/diagnose.py draws each diagnostic against the layer it was measured at (a line per feature
level, or per checkpoint), scripts/summarize.py against the epoch (a line per variant, with a band
over seeds); both hand their lines to ``plot_diagnostics``. A panel with a single x position shows
bars with their values written instead. matplotlib only (no torch), imported when drawing.
"""
import math
import textwrap
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

COLUMNS = 4  # panels per row


@dataclass
class Series:
    """One line of a panel: ``values`` at the panel's x positions, or at its own ``x`` (a variant
    that reached fewer epochs); nan: not measured there."""

    label: str
    values: List[float]
    band: Optional[Tuple[List[float], List[float]]] = None  # (low, high) at each x, e.g. mean -+ std
    emphasised: bool = False                                # drawn black and thicker (a pooled mean)
    x: Optional[List[float]] = None
    colour: Optional[int] = None  # its colour's index, the same in every panel (default: its position)


@dataclass
class Panel:
    """One diagnostic: its lines over x positions; ``ticks`` names the positions (layers), else the
    axis is numeric (epochs) and the figure's ``format_x`` writes its tick labels."""

    title: str
    x: List[float]
    series: List[Series] = field(default_factory=list)
    ticks: Optional[List[str]] = None
    xlabel: str = ""
    ylabel: str = ""
    subtitle: str = ""  # what the diagnostic measures (wrapped under the title)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    return plt


def _colour_of(plt, count: int, ordered: bool) -> Callable[[int], object]:
    """Series colours: along viridis for an ordered sequence (checkpoints in training order), else
    the categorical tab10 (levels, variants)."""
    if ordered:
        cmap = plt.get_cmap("viridis")
        return lambda index: cmap(index / max(count - 1, 1) * 0.85)
    cmap = plt.get_cmap("tab10")
    return lambda index: cmap(index % 10)


def _is_missing(value: float) -> bool:
    return value is None or value != value


def _tint(series: Series, index: int, colour):
    if series.emphasised:
        return "black"
    return colour(index if series.colour is None else series.colour)


def _draw_lines(ax, panel: Panel, colour) -> None:
    for index, series in enumerate(panel.series):
        x, tint, black = series.x if series.x is not None else panel.x, _tint(series, index, colour), series.emphasised
        ax.plot(x, series.values, marker="s" if black else "o", markersize=4 if black else 3,
                lw=2 if black else 1.2, color=tint, label=series.label)
        if series.band is not None:
            ax.fill_between(x, series.band[0], series.band[1], color=tint, alpha=0.2, lw=0)


def _draw_bars(ax, panel: Panel, colour) -> None:
    """One x position: a bar per series with its value written (an error bar for a band)."""
    width = 0.8 / max(len(panel.series), 1)
    for index, series in enumerate(panel.series):
        value = series.values[0]
        height = 0.0 if _is_missing(value) else value
        position = index * width - 0.4 + width / 2
        error = None
        if series.band is not None and not _is_missing(value):
            error = [[value - series.band[0][0]], [series.band[1][0] - value]]
        ax.bar(position, height, width * 0.9, label=series.label, yerr=error, color=_tint(series, index, colour))
        ax.annotate("n/a" if _is_missing(value) else f"{value:.3g}", (position, height), ha="center",
                    va="bottom", fontsize=6)
    ax.set_xlim(-0.6, 0.6)


def _set_x_axis(ax, panel: Panel, format_x: Optional[Callable[[float], str]]) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if len(panel.x) == 1:
        label = panel.ticks[0] if panel.ticks else (format_x(panel.x[0]) if format_x else f"{panel.x[0]:g}")
        ax.set_xticks([0], [label or "all probe images"], fontsize=7)
    elif panel.ticks is not None:
        ax.set_xticks(panel.x, panel.ticks, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if format_x is not None:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_x(value)))
    ax.set_xlabel(panel.xlabel, fontsize=8)


def _keep_flat_lines_flat(ax) -> None:
    """A y range at least a tenth of the values' size: differences far below it stay flat instead of
    being blown up to the whole panel (and no offset notation)."""
    ax.yaxis.get_major_formatter().set_useOffset(False)
    low, high = ax.get_ylim()
    least = 0.1 * max(abs(low), abs(high), 1e-6)
    if high - low < least:
        middle = (high + low) / 2
        ax.set_ylim(middle - least / 2, middle + least / 2)


def _draw_panel(ax, panel: Panel, colour, format_x: Optional[Callable[[float], str]], legend: bool) -> None:
    if len(panel.x) == 1:
        _draw_bars(ax, panel, colour)
    else:
        _draw_lines(ax, panel, colour)
    _set_x_axis(ax, panel, format_x)
    meaning = "\n".join(textwrap.wrap(panel.subtitle, 62)[:3])
    ax.set_title(f"{panel.title}\n{meaning}" if meaning else panel.title, fontsize=7 if meaning else 9, loc="left")
    ax.set_ylabel(panel.ylabel, fontsize=8)
    _keep_flat_lines_flat(ax)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if legend and panel.series:
        ax.legend(fontsize=6, ncol=2)


def draw_diagnostics(panels: Sequence[Panel], title: str = "", ordered: bool = False,
                     legend_title: Optional[str] = None, format_x: Optional[Callable[[float], str]] = None,
                     panel_size: Tuple[float, float] = (4.4, 3.4)):
    """The figure of ``panels``, one per grid cell (``COLUMNS`` a row); see ``plot_diagnostics``."""
    if title and legend_title is not None:
        raise ValueError("plot_diagnostics: a title or a legend above the grid, not both")
    plt = _pyplot()
    columns = min(COLUMNS, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / columns))
    top = 0.6 if title or legend_title else 0.0  # room for the title, or the legend above the grid
    fig, axes = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows + top),
                             squeeze=False)
    count = max((len(panel.series) for panel in panels), default=0)  # ordered: the colour map's length
    colour = _colour_of(plt, count, ordered)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel, colour, format_x, legend=legend_title is None)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no diagnostic could be computed", ha="center", va="center")
    if legend_title is not None and panels:
        # from the panel with the most lines (AP is missing where only diagnostics were logged)
        handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4) or 1, fontsize=8,
                   title=legend_title, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - top / (panel_size[1] * rows + top)) if legend_title is not None else None)
    return fig


def plot_diagnostics(panels: Sequence[Panel], path: str, title: str = "", ordered: bool = False,
                     legend_title: Optional[str] = None, format_x: Optional[Callable[[float], str]] = None,
                     panel_size: Tuple[float, float] = (4.4, 3.4), dpi: int = 100) -> None:
    """Write the grid of ``panels`` to ``path`` (PNG).

    ``ordered``: the series are a sequence (checkpoints in order: one colour map) rather than
    categories. ``legend_title``: every panel has the same series, so one legend (with this title)
    is drawn above the grid; None: a legend in each panel. ``format_x``: tick labels of numeric x.
    A figure has a ``title`` or a legend above its grid, not both. ``panel_size``: inches per panel.
    """
    fig = draw_diagnostics(panels, title, ordered, legend_title, format_x, panel_size)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
