"""The pictures of a summary: AP against epoch, and the reference diagnostics against epoch."""
import math
import os
from typing import List

from .runs import Run
from .statistics import diagnosed_groups, diagnostic_curves, diagnostic_keys, group_runs, mean_curve, mean_std_curve


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


def plot_diagnostics(runs: List[Run], path: str) -> bool:
    """AP and every overall reference diagnostic against epoch, one panel each; per variant the mean
    over seeds with a ±std band. Returns False (nothing written) when no run logged diagnostics."""
    keys = diagnostic_keys(runs)
    if not keys:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, MaxNLocator

    groups = diagnosed_groups(group_runs(runs))
    panels = ["AP (%)"] + keys
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        for index, group in enumerate(groups):
            if panel == "AP (%)":
                curves = [{p["epoch"]: p["AP"] * 100 for p in run.curve} for run in group.runs if run.curve]
            else:
                curves = diagnostic_curves(group, panel)
            epochs, mean, std = mean_std_curve(curves)
            if not epochs:
                continue
            x = [epoch + 1 for epoch in epochs]  # 1-based, as in the AP plot: the initialisation is 0
            colour = colours[index % len(colours)]
            ax.plot(x, mean, marker="o", markersize=3, color=colour, label=f"{group.label} (n={len(curves)})")
            if any(s is not None for s in std):
                ax.fill_between(x, [m - (s or 0.0) for m, s in zip(mean, std)],
                                [m + (s or 0.0) for m, s in zip(mean, std)], color=colour, alpha=0.2, lw=0)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: "init" if x == 0 else f"{x:g}"))
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4) or 1, fontsize=8,
               title="variant: mean over seeds, band ±1 std", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.8 * rows)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
