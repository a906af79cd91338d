"""The pictures of a summary: AP against epoch, and the reference diagnostics against epoch."""
import os
from typing import List

from util.diagnostics_plot import Panel, Series

from .runs import Run
from .statistics import (Group, diagnosed_groups, diagnostic_curves, diagnostic_keys, group_runs, mean_curve,
                         mean_std_curve)


def plot_curves(runs: List[Run], path: str) -> None:
    """AP (percent) against epoch: per variant and form the mean over seeds, with a min–max band."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for group in group_runs(runs):
        epochs, mean, low, high, counts = mean_curve(group)
        if not epochs:
            continue
        seeds = max(counts)
        x = [epoch + 1 for epoch in epochs]  # 1-based: "after epoch N"
        percent = [v * 100 for v in mean]
        # the whole mean dashed underneath; solid only where every seed is in (a lagging seed shifts it)
        line, = ax.plot(x, percent, ls="--", lw=1, label=None)
        full = [i for i, count in enumerate(counts) if count == seeds]
        ax.plot([x[i] for i in full], [percent[i] for i in full], marker="o", markersize=3, color=line.get_color(),
                label=f"{group.label} (n={seeds})")
        if seeds > 1:
            ax.fill_between(x, [v * 100 for v in low], [v * 100 for v in high], color=line.get_color(), alpha=0.2,
                            lw=0)
        plotted += 1
    if plotted:
        ax.legend(fontsize=8, title="mean over seeds, band min–max\n(dashed: not all seeds yet)", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("box AP (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _epoch_tick(x: float) -> str:
    """Tick label of the 1-based epoch axis: 0 is the record at initialisation."""
    return "init" if x == 0 else f"{x:g}"


def diagnostic_panel(groups: List[Group], key: str) -> Panel:
    """One panel of AP ('AP (%)') or an overall diagnostic against epoch: per variant the mean over
    seeds with a ±std band, each variant in the same colour in every panel."""
    panel = Panel(title=key, x=[], xlabel="epoch")
    for index, group in enumerate(groups):
        if key == "AP (%)":
            curves = [{p["epoch"]: p["AP"] * 100 for p in run.curve} for run in group.runs if run.curve]
        else:
            curves = diagnostic_curves(group, key)
        epochs, mean, std = mean_std_curve(curves)
        if not epochs:
            continue
        x = [epoch + 1 for epoch in epochs]  # 1-based, as in the AP plot: the initialisation is 0
        band = None
        if any(s is not None for s in std):
            band = ([m - (s or 0.0) for m, s in zip(mean, std)], [m + (s or 0.0) for m, s in zip(mean, std)])
        panel.series.append(Series(f"{group.label} (n={len(curves)})", mean, band=band, x=x, colour=index))
        panel.x = sorted(set(panel.x) | set(x))
    return panel


def plot_diagnostics(runs: List[Run], path: str) -> bool:
    """AP and every overall reference diagnostic against epoch, the diagnostics picture
    (``util.diagnostics_plot``) with one panel each. Returns False (nothing written) when no run
    logged diagnostics."""
    from util.diagnostics_plot import plot_diagnostics as plot

    keys = diagnostic_keys(runs)
    if not keys:
        return False
    groups = diagnosed_groups(group_runs(runs))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot([diagnostic_panel(groups, key) for key in ["AP (%)"] + keys], path, format_x=_epoch_tick,
         legend_title="variant: mean over seeds, band ±1 std", panel_size=(3.6, 2.8), dpi=110)
    return True
