"""The markdown tables of a summary: runs, variants over seeds, paired differences to a control,
and the reference diagnostics (last diagnosed epoch, and per epoch)."""
from typing import Iterable, List, Optional, Tuple

from .runs import INIT_EPOCH, METRICS, Run, form_label
from .statistics import (Group, diagnosed_groups, diagnostic_curves, diagnostic_keys, find_control,
                         group_runs, mean_std, mean_std_curve, paired_differences)

# the numbers compared across seeds (APl is often undefined on small-image data)
SEED_METRICS = ["AP", "AP50", "AP75", "APs", "APm"]
# diagnostics tabulated per epoch by default: the guided families, the concentration (read against its
# value at initialisation), the foreground sampling that compares guidance with stock references, coverage
EPOCH_DIAG_PREFIXES = ["D1/", "D2/", "D3/", "D4/off_image", "D4/fg_in_img", "D4/fg_in_chance", "D4/own_in_img",
                       "D5/", "D6/coverage"]


def epoch_label(epoch: float, prefix: str = "") -> str:
    """'init' for the record at initialisation, else the epoch number (with ``prefix``, 'epoch 3')."""
    return "init" if epoch == INIT_EPOCH else f"{prefix}{int(epoch)}"


def _cell(value: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    """'–' when not logged; 'n/a' for pycocotools' -1 (no ground truth in that area range)."""
    if value is None:
        return "–"
    return "n/a" if value < 0 else f"{value * scale:.{digits}f}"


def _table(header: List[str], rows: List[List[str]], left: int = 1, right_end: int = 0) -> List[str]:
    """Markdown table lines; the first ``left`` and last ``right_end`` columns left-aligned, the rest right."""
    align = ["---"] * left + ["---:"] * (len(header) - left - right_end) + ["---"] * right_end
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown_table(runs: List[Run]) -> str:
    """One row per run: AP numbers (percent) of the last evaluated epoch, epochs, seconds/iteration."""
    rows = []
    for run in runs:
        final = run.final or {}
        planned = f"/{run.epochs_planned}" if run.epochs_planned is not None else ""
        seconds = run.sec_per_iter
        note = f" ({'; '.join(run.notes)})" if run.notes else ""
        rows.append([run.label, "–" if run.seed is None else str(run.seed)]
                    + [_cell(final.get(m)) for m in METRICS]
                    + [f"{run.epochs_logged}{planned}", "–" if seconds is None else f"{seconds:.3f}",
                       f"`{run.path}`{note}"])
    header = ["variant", "seed"] + METRICS + ["epochs", "s/iter", "run"]
    return "\n".join(_table(header, rows, left=1, right_end=1)) + "\n"


def _spread_cell(values: List[Optional[float]], signed: bool = False) -> str:
    """'32.0 ± 2.00 [30.0, 32.0, 34.0]' in percent; std 'n/a' with one value; '–' with none.

    ``values`` are per seed in seed order; None (not evaluated, or pycocotools' -1) shows as n/a
    in the list and is left out of mean and std.
    """
    present = [v * 100 for v in values if v is not None]
    mean, std = mean_std(present)
    if mean is None:
        return "n/a" if values else "–"
    sign = "+" if signed else ""
    listed = ", ".join("n/a" if v is None else f"{v * 100:{sign}.1f}" for v in values)
    spread = "n/a" if std is None else f"{std:.2f}"
    return f"{mean:{sign}.1f} ± {spread} [{listed}]"


def _seed_list(seeds: Iterable[Optional[int]]) -> str:
    return ", ".join("–" if seed is None else str(seed) for seed in seeds) or "–"


def variants_table(groups: List[Group]) -> str:
    """Per variant and form: final numbers as mean ± sample std over seeds, with the per-seed values."""
    rows = []
    for group in groups:
        evaluated = [run for run in group.runs if run.final is not None]
        count = f"{len(evaluated)}" + (f" of {len(group.runs)}" if len(evaluated) < len(group.runs) else "")
        epochs = sorted({f"{run.epochs_logged}" + (f"/{run.epochs_planned}" if run.epochs_planned else "")
                         for run in group.runs})
        cells = [_spread_cell([run.final_value(m) for run in evaluated]) for m in SEED_METRICS]
        rows.append([group.label, count, _seed_list(run.seed for run in evaluated)] + cells
                    + [", ".join(epochs), "; ".join(group.notes)])
    header = ["variant", "n", "seeds"] + SEED_METRICS + ["epochs", "notes"]
    intro = ("Final box AP (%) over seeds: mean ± sample std (ddof=1; n/a when n=1), "
             "per-seed values in [ ] in seed order; n is the number of evaluated runs. "
             "A metric shown n/a is pycocotools' -1 (no ground truth of that size).")
    return "\n".join([intro, ""] + _table(header, rows, left=1, right_end=2)) + "\n"


def differences_table(groups: List[Group], control: str) -> str:
    """Per variant: variant minus the control (same form), paired by seed, mean ± sample std."""
    intro = (f"Paired difference to `{control}` (same form): for each seed both ran, variant minus "
             f"{control} (AP points); mean ± sample std (ddof=1; n/a when one pair) of those "
             "differences, per-seed differences in [ ] in seed order.")
    rows = []
    for group in groups:
        if group.variant == control:
            continue
        reference = find_control(groups, control, group.two_stage)
        if reference is None:
            rows.append([group.label, "0", "–"] + ["–"] * len(SEED_METRICS)
                        + [f"no {form_label(control, group.two_stage)} run"])
            continue
        per_metric = {m: paired_differences(group, reference, m) for m in SEED_METRICS}
        paired = sorted(set().union(*(set(d) for d in per_metric.values())))
        cells = [_spread_cell([per_metric[m].get(seed) for seed in paired], signed=True) if paired else "–"
                 for m in SEED_METRICS]
        rows.append([group.label, str(len(paired)), _seed_list(paired)] + cells
                    + ["; ".join(_pairing_notes(group, reference, paired))])
    header = ["variant", "pairs", "seeds"] + SEED_METRICS + ["notes"]
    return "\n".join([intro, ""] + _table(header, rows, left=1, right_end=1)) + "\n"


def _pairing_notes(group: Group, control: Group, paired: List[int]) -> List[str]:
    """Seeds left unpaired and pairs evaluated at different epochs: what the reader must know."""
    notes = []
    ours, theirs = group.by_seed(), control.by_seed()
    unpaired = sorted(seed for seed in ours if seed not in paired)
    if unpaired:
        notes.append(f"seeds not paired with {control.label}: {_seed_list(unpaired)}")
    if any(run.seed is None for run in group.runs):
        notes.append("runs without a seed are not paired")
    uneven = [seed for seed in paired if ours[seed].final["epoch"] != theirs[seed].final["epoch"]]
    if uneven:
        notes.append(f"seeds {_seed_list(uneven)} compared at different epochs")
    return notes


def _mean_std_cell(values: List[float], scale: float, digits: int, std_digits: int) -> str:
    """'0.412 ± 0.010 (n=3)'; std 'n/a' with one value; '–' with none."""
    mean, std = mean_std([v * scale for v in values])
    if mean is None:
        return "–"
    spread = "n/a" if std is None else f"{std:.{std_digits}f}"
    return f"{mean:.{digits}f} ± {spread} (n={len(values)})"


def diagnostics_table(groups: List[Group]) -> str:
    """Rows: final AP, the diagnosed epochs, then every overall reference diagnostic; columns: the
    variants that logged diagnostics. Each cell: the last diagnosed epoch's value, mean ± sample
    std over seeds. '' when no run logged diagnostics."""
    diagnosed = diagnosed_groups(groups)
    keys = diagnostic_keys(run for group in diagnosed for run in group.runs)
    if not keys:
        return ""
    rows = [["AP (%)"] + [_mean_std_cell(group.values("AP"), 100.0, 1, 2) for group in diagnosed],
            ["epochs diagnosed"] + [", ".join(epoch_label(epoch) for epoch in sorted({run.diag_curve[-1]["epoch"]
                                                                                    for run in group.runs
                                                                                    if run.diag_curve}))
                                    for group in diagnosed]]
    for key in keys:
        rows.append([key] + [_mean_std_cell([run.final_diag[key] for run in group.runs if key in run.final_diag],
                                            1.0, 3, 3) for group in diagnosed])
    intro = ("Reference diagnostics (docs/research.md, \"Reference diagnostics\") of the last diagnosed epoch, mean ± "
             "sample std (ddof=1; n/a when n=1) over seeds, n runs; AP is the final box AP of the same runs. "
             "A diagnostic a configuration cannot have (D1-D3, D6 without guidance) shows –.")
    return "\n".join([intro, ""] + _table(["metric"] + [group.label for group in diagnosed], rows)) + "\n"


def _epoch_cell(spread: Optional[Tuple[float, Optional[float]]], seeds: int, runs: int) -> str:
    """'0.412 ± 0.010', '0.412' with one seed, '–' with none; '(n=k)' when k of the runs got there."""
    if spread is None:
        return "–"
    mean, std = spread
    cell = f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")
    return cell + (f" (n={seeds})" if seeds < runs else "")


def diagnostics_epochs_table(groups: List[Group], prefixes: List[str]) -> str:
    """Rows: each logged diagnostic starting with one of ``prefixes``, one row per variant; columns:
    the diagnosed epochs. Each cell: mean ± sample std over the seeds diagnosed at that epoch (their
    number added when fewer than the variant's diagnosed runs). '' when nothing matches."""
    diagnosed = diagnosed_groups(groups)
    keys = [key for key in diagnostic_keys(run for group in diagnosed for run in group.runs)
            if any(key.startswith(prefix) for prefix in prefixes)]
    if not keys:
        return ""
    epochs = sorted({point["epoch"] for group in diagnosed for run in group.runs for point in run.diag_curve})
    rows = []
    for key in keys:
        for group in diagnosed:
            curves = diagnostic_curves(group, key)
            if not curves:
                continue
            spread = {epoch: (mean, std) for epoch, mean, std in zip(*mean_std_curve(curves))}
            rows.append([key, group.label] + [_epoch_cell(spread.get(epoch), sum(epoch in curve for curve in curves),
                                                          len(curves)) for epoch in epochs])
    intro = ("Reference diagnostics per diagnosed epoch (0-based, as logged; init: before the first training "
             "step), mean ± sample std (ddof=1) over the seeds of each variant; (n=k) where fewer seeds than the "
             "variant's runs reached that epoch.")
    header = ["metric", "variant"] + [epoch_label(epoch, "epoch ") for epoch in epochs]
    return "\n".join([intro, ""] + _table(header, rows, left=2)) + "\n"


def report(runs: List[Run], control: Optional[str], diag_epoch_prefixes: Optional[List[str]] = None) -> str:
    """The whole markdown summary: runs, variants over seeds, (with a control) paired differences, and
    for runs that logged them the reference diagnostics: last epoch, and per epoch for the keys
    starting with ``diag_epoch_prefixes`` (default ``EPOCH_DIAG_PREFIXES``; [] for none)."""
    groups = group_runs(runs)
    parts = ["## Runs\n", markdown_table(runs), "\n## Variants over seeds\n", variants_table(groups)]
    if control:
        parts += [f"\n## Paired difference to {control}\n", differences_table(groups, control)]
    diagnostics = diagnostics_table(groups)
    if diagnostics:
        parts += ["\n## Reference diagnostics over seeds\n", diagnostics]
    prefixes = EPOCH_DIAG_PREFIXES if diag_epoch_prefixes is None else diag_epoch_prefixes
    per_epoch = diagnostics_epochs_table(groups, prefixes)
    if per_epoch:
        parts += ["\n## Reference diagnostics per epoch\n", per_epoch]
    return "\n".join(parts)
