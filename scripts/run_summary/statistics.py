"""Statistics over runs: grouping by variant and form, means and sample spreads over seeds, the
paired differences to a control, curves over epochs."""
import statistics
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from .runs import Run


@dataclass
class Group:
    """The runs of one variant in one form (single- or two-stage), one per seed."""
    label: str
    variant: str
    two_stage: bool
    runs: List[Run] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def by_seed(self) -> Dict[int, Run]:
        """Runs with a known seed, keyed by it (a group holds each seed once, see ``group_runs``)."""
        return {run.seed: run for run in self.runs if run.seed is not None}

    def values(self, metric: str) -> List[float]:
        """``metric`` of every run that has it, in the group's (seed) order, as fractions."""
        return [v for v in (run.final_value(metric) for run in self.runs) if v is not None]


def group_runs(runs: List[Run]) -> List[Group]:
    """Runs -> one group per (variant, form), in order of first appearance, runs sorted by seed.

    A second run of a seed already in its group is left out of the group (with a note naming
    both directories): a paired comparison needs one value per seed.
    """
    groups: Dict[Tuple[str, bool], Group] = {}
    for run in runs:
        key = (run.variant, run.two_stage)
        group = groups.setdefault(key, Group(label=run.label, variant=run.variant, two_stage=run.two_stage))
        twin = group.by_seed().get(run.seed) if run.seed is not None else None
        if twin is not None:
            group.notes.append(f"seed {run.seed} twice: `{run.path}` left out, `{twin.path}` used")
            continue
        group.runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
    return list(groups.values())


def mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation with ddof=1); std is None below two values, both None for none."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def paired_differences(group: Group, control: Group, metric: str) -> Dict[int, float]:
    """seed -> ``metric`` of the group's run minus the control's run, on the seeds both evaluated."""
    ours, theirs = group.by_seed(), control.by_seed()
    differences: Dict[int, float] = {}
    for seed in sorted(set(ours) & set(theirs)):
        a, b = ours[seed].final_value(metric), theirs[seed].final_value(metric)
        if a is not None and b is not None:
            differences[seed] = a - b
    return differences


def find_control(groups: List[Group], control: str, two_stage: bool) -> Optional[Group]:
    """The control variant's group in the same form (single- or two-stage), if it was run."""
    for group in groups:
        if group.variant == control and group.two_stage == two_stage:
            return group
    return None


def mean_curve(group: Group) -> Tuple[List[float], List[float], List[float], List[float], List[int]]:
    """(epochs, mean AP, min AP, max AP, seeds counted) per epoch over the group's evaluated runs.

    AP as fractions; every epoch some seed evaluated is included, over the seeds that reached it
    (the count says how many: fewer than all where a seed is behind or stopped).
    """
    curves = [{point["epoch"]: point["AP"] for point in run.curve} for run in group.runs if run.curve]
    epochs = sorted(set().union(*(set(curve) for curve in curves))) if curves else []
    per_epoch = [[curve[epoch] for curve in curves if epoch in curve] for epoch in epochs]
    return (epochs, [statistics.fmean(v) for v in per_epoch], [min(v) for v in per_epoch],
            [max(v) for v in per_epoch], [len(v) for v in per_epoch])


def mean_std_curve(curves: List[Dict[float, float]]) -> Tuple[List[float], List[float], List[Optional[float]]]:
    """(epochs, mean, sample std or None below two values) per epoch over the given {epoch: value}
    curves, each epoch over the curves that have it."""
    epochs = sorted(set().union(*(set(curve) for curve in curves))) if curves else []
    per_epoch = [[curve[epoch] for curve in curves if epoch in curve] for epoch in epochs]
    spread = [mean_std(values) for values in per_epoch]
    return epochs, [m for m, _ in spread], [s for _, s in spread]


def diagnosed_groups(groups: Iterable[Group]) -> List[Group]:
    """The groups with at least one run that logged reference diagnostics."""
    return [group for group in groups if any(run.diag_curve for run in group.runs)]


def diagnostic_curves(group: Group, key: str) -> List[Dict[float, float]]:
    """Per run of the group that logged it: {epoch: overall diagnostic ``key``}."""
    curves = [{point["epoch"]: point[key] for point in run.diag_curve if key in point} for run in group.runs]
    return [curve for curve in curves if curve]


def diagnostic_keys(runs: Iterable[Run]) -> List[str]:
    """Every overall diagnostic some run logged, by family then name ('D1/...' first)."""
    return sorted({key for run in runs for point in run.diag_curve for key in point if key != "epoch"})
