"""Ablation runs -> markdown tables (printed and written) and a plot of AP against epoch.

usage: python scripts/summarize.py OUTPUT_DIR [OUTPUT_DIR ...] [--control cascade] [--out results.md]
           [--plot ap.png] [--diag_plot ap_diag.png]

Each OUTPUT_DIR is what ``main.py --output_dir`` wrote: ``log.jsonl`` (one JSON record per
print window and per epoch) and ``config.yaml`` (the resolved flags). A directory holding no run
itself but run directories one level down (``outputs/v3.0.4`` with ``seed0/``, ``seed1/``, ... as
``scripts/ablation.sh SEEDS="0 1 2"`` writes them) stands for those runs.

Runs are grouped by variant (config.yaml ``variant``, else the directory name; the parent's name
for a ``seedN`` directory) and form (single- or two-stage), seeds told apart by config.yaml
``seed`` (else a ``seedN`` directory name). Three tables come out:

  runs                one row per run: the last evaluated epoch's COCO numbers, epochs, s/iter
  variants            per variant: mean +- sample std (ddof=1) over seeds and the per-seed values
  paired difference   per variant: on each seed that the control (``--control``, same form) ran
                      too, variant minus control; mean +- sample std of those differences

The plot draws, per variant, the mean AP over seeds against epoch with a min-max band (dashed
where some seed has not reached that epoch).

Runs that logged reference diagnostics (``diag`` records, ``--diag_images N``, or computed afterwards
into ``RUN/diagnostics/`` by ``scripts/diagnose.py``) add a fourth
table, "Reference diagnostics over seeds": one row per overall diagnostic (the short keys,
``D4/fg_in_img``), one column per variant, the last diagnosed epoch's value as mean +- sample std
over seeds, under the final AP (D2 also per guidance update, ``D2/same_obj/dec0``, and a
diagnostic logged per level over the layers, ``D6/coverage/lvl0``, per level); a fifth,
"Reference diagnostics per epoch", the same per diagnosed epoch for the keys ``--diag_epochs``
selects (default D1-D3, D5, D4/off_image, D4/fg_in_img, D4/fg_in_chance, D4/own_in_img, D6/coverage);
and a second plot (``--diag_plot``) of AP and every diagnostic of the first of these tables against
epoch, per variant the mean over seeds with a +-std band. The record a run logs before its first
training step (epoch -1, the model at initialisation) is the first point of both, labelled "init":
read every diagnostic as a change from it.

Runs still in progress, runs without any evaluation yet and half-written last lines are
reported, not fatal: a summary is most useful exactly while the table is still being filled in.
A resumed run may log an epoch (or a print window) more than once (the trainer is meant not to,
but logs written before that, or by other trainers, do): the last record of each epoch (each
window) counts, the earlier ones are dropped. ``main.py --eval`` writes ``eval`` and ``eval_diag``
records: a directory holding only those (an evaluation's own ``--output_dir``) is summarised from
them; in a training run's log (an ``--eval`` into the run's directory by an older main.py) they are
ignored with a note, so an evaluation made another way never replaces the training's numbers.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.jsonl import read_jsonl  # noqa: E402  (main.py's reader: unreadable lines are skipped, as it skips them)

# COCO's 12 summary numbers come in this order (pycocotools COCOeval.stats); we report the first six.
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# the numbers compared across seeds (APl is often undefined on small-image data)
SEED_METRICS = ["AP", "AP50", "AP75", "APs", "APm"]
# keys under which a per-iteration time may be logged, most specific first
TIME_KEYS = ["sec_per_iter", "s_per_iter", "iter_time", "time_per_iter"]
SEED_DIR = re.compile(r"^seed(\d+)$")
# the reference diagnostics a summary reads: the overall means (family and name only, 'D4/fg_in_img';
# per-layer keys have more parts), D2 per guidance update ('D2/same_obj/dec0'), because worry 2
# (early decoder stages are unreliable) is read from exactly that split, and the per-level means over
# the layers ('D6/coverage/lvl0': coverage is decided on the finest level)
OVERALL_DIAG = re.compile(r"^D\d/[^/]+$|^D2/[^/]+/dec\d+$|^D\d/[^/]+/lvl\d+$")
# diagnostics tabulated per epoch by default: the guided families, the concentration (read against its
# value at initialisation), the foreground sampling that compares guidance with stock references, coverage
EPOCH_DIAG_PREFIXES = ["D1/", "D2/", "D3/", "D4/off_image", "D4/fg_in_img", "D4/fg_in_chance", "D4/own_in_img",
                       "D5/", "D6/coverage"]
# the epoch of the diag record main.py writes before the first training step (the model at initialisation)
INIT_EPOCH = -1


@dataclass
class Run:
    """What one output directory tells about its run."""
    path: str
    label: str
    config: Dict[str, Any]
    epochs_planned: Optional[int]
    variant: str = ""
    two_stage: bool = False
    seed: Optional[int] = None
    curve: List[Dict[str, float]] = field(default_factory=list)   # per evaluated epoch: epoch + METRICS
    diag_curve: List[Dict[str, float]] = field(default_factory=list)  # per diagnosed epoch: epoch + overall diags
    iter_times: List[float] = field(default_factory=list)
    epochs_logged: int = 0          # epochs completed (an epoch record was written)
    epoch_training: int = -1        # highest epoch a training window was logged for
    notes: List[str] = field(default_factory=list)

    @property
    def final(self) -> Optional[Dict[str, float]]:
        return self.curve[-1] if self.curve else None

    @property
    def sec_per_iter(self) -> Optional[float]:
        # the median ignores the slow first window (data loader start-up, cudnn autotuning)
        return statistics.median(self.iter_times) if self.iter_times else None

    @property
    def final_diag(self) -> Dict[str, float]:
        """The overall reference diagnostics of the last diagnosed epoch ({} when none)."""
        return {k: v for k, v in self.diag_curve[-1].items() if k != "epoch"} if self.diag_curve else {}

    def final_value(self, metric: str) -> Optional[float]:
        """The last evaluation's ``metric`` as a fraction; None when not evaluated or -1 (undefined)."""
        value = (self.final or {}).get(metric)
        return None if value is None or value < 0 else value


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


# ----------------------------------------------------------------------------- reading

def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts become 'outer/inner' keys so metrics logged under e.g. {'eval': {...}} are found."""
    flat: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def coco_metrics(record: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """The six COCO box numbers of an epoch record, as fractions, or None when it has no evaluation.

    Understands the upstream list form (``test_coco_eval_bbox``: the 12 COCOeval stats) and
    named keys (``AP``, ``test_AP50``, ``eval/bbox_AP75``, ...).
    """
    flat = _flatten(record)
    for key, value in flat.items():
        if key.endswith("coco_eval_bbox") and isinstance(value, list) and len(value) >= 6:
            numbers = [_as_number(v) for v in value[:6]]
            if all(n is not None for n in numbers):
                return dict(zip(METRICS, numbers))
    found: Dict[str, float] = {}
    for metric in METRICS:
        for key, value in flat.items():
            leaf = key.rsplit("/", 1)[-1]
            # accept 'AP50', 'test_AP50', 'bbox_AP50', 'test_bbox_AP50' but never 'AP50_ms' or 'mAP'
            if leaf == metric or leaf.endswith("_" + metric):
                number = _as_number(value)
                if number is not None:
                    found[metric] = number
                    break
    if "AP" not in found:
        return None
    # pycocotools reports fractions; a logger that wrote percentages is brought back to fractions
    if any(v > 1.0 for v in found.values()):
        found = {k: v / 100.0 for k, v in found.items()}
    return found


def iteration_time(record: Dict[str, Any]) -> Optional[float]:
    """Seconds per training iteration of a print-window record, when it logs one."""
    flat = _flatten(record)
    for key in TIME_KEYS:
        for name, value in flat.items():
            if name.rsplit("/", 1)[-1] == key:
                number = _as_number(value)
                if number is not None and number > 0:
                    return number
    return None


def load_config(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_identity(run_dir: str, config: Dict[str, Any]) -> Tuple[str, Optional[int]]:
    """(variant, seed) of a run: config.yaml's ``variant`` and ``seed``, else the directory layout.

    ``outputs/v3.0.4/seed2`` -> ('v3.0.4', 2); ``outputs/v3.0.4`` -> ('v3.0.4', None).
    """
    name = os.path.basename(os.path.normpath(run_dir))
    seed_dir = SEED_DIR.match(name)
    variant = config.get("variant")
    if not variant:
        variant = os.path.basename(os.path.dirname(os.path.normpath(run_dir))) if seed_dir else name
    seed = config.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        seed = int(seed_dir.group(1)) if seed_dir else None
    return str(variant), seed


def form_label(variant: str, two_stage: bool) -> str:
    """'v3.0.4' or 'v3.0.4 +two-stage'."""
    return f"{variant} +two-stage" if two_stage else variant


def run_label(run_dir: str, config: Dict[str, Any]) -> str:
    """'v3.0.4' or 'v3.0.4 +two-stage'; the directory name when the config names no variant; a control
    (config.yaml's derived ``control``: the oracle reads the ground truth) says so:
    'v3.0.4_gt (oracle control)'."""
    label = form_label(run_identity(run_dir, config)[0], bool(config.get("two_stage")))
    return f"{label} ({config['control']} control)" if config.get("control") else label


def diagnose_output(run_dir: str) -> List[Tuple[float, Dict[str, float]]]:
    """(epoch, overall diagnostics) of each checkpoint in ``RUN/diagnostics/diagnostics.json``, which
    ``scripts/diagnose.py --resume RUN/ckpt... --out RUN/diagnostics`` writes for a run that did not
    log them while training; [] when there is none."""
    path = os.path.join(run_dir, "diagnostics", "diagnostics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        evaluations = json.load(f).get("evaluations", [])
    return [(float(e["epoch"]), overall_diagnostics(e["metrics"])) for e in evaluations
            if _as_number(e.get("epoch")) is not None and isinstance(e.get("metrics"), dict)]


def overall_diagnostics(record: Dict[str, Any]) -> Dict[str, float]:
    """The overall reference diagnostics ('D4/fg_in_img', ...), D2 per update ('D2/in_box/dec0') and the
    per-level means over the layers ('D6/coverage/lvl0') of a ``diag`` record, finite numbers only."""
    found = {}
    for key, value in record.items():
        number = _as_number(value)
        if OVERALL_DIAG.match(key) and number is not None:
            found[key] = number
    return found


def _is_epoch_record(record: Dict[str, Any]) -> bool:
    kind = record.get("type") or record.get("kind")
    if kind is not None:
        return str(kind).lower() in ("epoch", "eval", "test")
    # upstream-style logs: epoch records carry the epoch number but no iteration counter
    return "epoch" in record and not any(k in record for k in ("iter", "iteration", "step"))


def _is_training_record(record: Dict[str, Any]) -> bool:
    """A record only training writes: a print window or an epoch (upstream logs: no type, an epoch)."""
    kind = record.get("type") or record.get("kind")
    return str(kind).lower() in ("train", "epoch") if kind is not None else "epoch" in record


def evaluation_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records ``main.py --eval`` wrote: ``eval`` and ``eval_diag``, and (logs written before
    --eval had its own diagnostics type) a ``diag`` record directly after an ``eval`` record."""
    found = []
    for index, record in enumerate(records):
        kind = record.get("type")
        if kind in ("eval", "eval_diag") or (kind == "diag" and index > 0 and records[index - 1].get("type") == "eval"):
            found.append(record)
    return found


def load_run(run_dir: str) -> Run:
    """Read one output directory; missing files become notes rather than errors.

    Repeated records (a resumed run logs the epochs after its checkpoint again) are tolerated:
    per epoch the last evaluation counts, per (epoch, iteration) the last training window.
    """
    config = load_config(os.path.join(run_dir, "config.yaml"))
    variant, seed = run_identity(run_dir, config)
    run = Run(path=run_dir, label=run_label(run_dir, config), config=config,
              epochs_planned=config.get("epochs") if isinstance(config.get("epochs"), int) else None,
              variant=variant, two_stage=bool(config.get("two_stage")), seed=seed)
    if not config:
        run.notes.append("no config.yaml")
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        run.notes.append("no log.jsonl")
        return run
    evaluations: Dict[float, Dict[str, float]] = {}      # epoch -> metrics, the last record wins
    windows: Dict[Tuple[float, float], float] = {}        # (epoch, iteration) -> seconds per iteration
    diagnosed: Dict[float, Dict[str, float]] = {}          # epoch -> overall diagnostics, the last record wins
    records = list(read_jsonl(log_path))
    if any(map(_is_training_record, records)):
        # an --eval into the training run's own directory (main.py now writes it to eval/) measured
        # the model in its own way: its records are not the training's evaluations
        evaluated = {id(record) for record in evaluation_records(records)}
        records = [record for record in records if id(record) not in evaluated]
        if evaluated:
            run.notes.append(f"{len(evaluated)} --eval records ignored")
    for record in records:
        if record.get("type") in ("diag", "eval_diag"):
            epoch = _as_number(record.get("epoch"))
            diagnosed[epoch if epoch is not None else float(len(diagnosed))] = overall_diagnostics(record)
            continue
        metrics = coco_metrics(record)
        if metrics is not None:
            epoch = _as_number(record.get("epoch"))
            epoch = epoch if epoch is not None else float(len(evaluations))
            evaluations[epoch] = metrics
        if _is_epoch_record(record):
            epoch = _as_number(record.get("epoch"))
            if epoch is not None:
                run.epochs_logged = max(run.epochs_logged, int(epoch) + 1)
            continue
        epoch = _as_number(record.get("epoch"))
        seconds = iteration_time(record)
        if seconds is not None:
            iteration = _as_number(record.get("iter", record.get("iteration", record.get("step"))))
            key = (epoch, iteration) if epoch is not None and iteration is not None else (len(windows), None)
            windows[key] = seconds
        if epoch is not None:
            run.epoch_training = max(run.epoch_training, int(epoch))
    run.curve = [{"epoch": epoch, **metrics} for epoch, metrics in sorted(evaluations.items())]
    run.iter_times = list(windows.values())
    for epoch, values in diagnose_output(run_dir):  # fills epochs the log has no diag record of
        diagnosed.setdefault(epoch, values)
    run.diag_curve = [{"epoch": epoch, **values} for epoch, values in sorted(diagnosed.items())]
    if run.epoch_training >= run.epochs_logged:
        run.notes.append(f"training epoch {run.epoch_training + 1}")
    if not run.curve:
        run.notes.append("no evaluation yet")
    return run


def expand_run_dirs(paths: List[str]) -> List[str]:
    """Each path, or, for a directory that holds no run but runs one level down, those runs (sorted)."""
    expanded: List[str] = []
    for path in paths:
        is_run = any(os.path.exists(os.path.join(path, name)) for name in ("log.jsonl", "config.yaml"))
        children = []
        if os.path.isdir(path) and not is_run:
            children = [os.path.join(path, name) for name in sorted(os.listdir(path), key=_natural_key)
                        if os.path.isfile(os.path.join(path, name, "log.jsonl"))
                        or os.path.isfile(os.path.join(path, name, "config.yaml"))]
        expanded.extend(children or [path])
    return expanded


def _natural_key(name: str):
    """'seed10' after 'seed9'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- grouping and statistics

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


# ----------------------------------------------------------------------------- output

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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="output directories of main.py runs (or their parents)")
    parser.add_argument("--control", default="cascade",
                        help="variant the others are compared with, seed by seed ('' for no comparison)")
    parser.add_argument("--out", default="results.md", help="markdown file to write")
    parser.add_argument("--plot", default="ap.png", help="PNG of AP against epoch ('' to skip)")
    parser.add_argument("--diag_plot", default=None,
                        help="PNG of AP and the reference diagnostics against epoch, written when some run "
                             "logged them (unset: next to --plot as NAME_diag.png; '' to skip)")
    parser.add_argument("--diag_epochs", nargs="*", default=None, metavar="PREFIX",
                        help="reference diagnostics tabulated per epoch: keys starting with these "
                             f"(default: {' '.join(EPOCH_DIAG_PREFIXES)}; the flag alone: no such table)")
    args = parser.parse_args(argv)

    runs = [load_run(path) for path in expand_run_dirs(args.runs)]
    text = report(runs, args.control, args.diag_epochs)
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        plot_curves(runs, args.plot)
    diag_plot = args.diag_plot
    if diag_plot is None:
        diag_plot = os.path.splitext(args.plot)[0] + "_diag.png" if args.plot else ""
    if diag_plot and plot_diagnostics(runs, diag_plot):
        print(f"reference diagnostics plot: {diag_plot}", file=sys.stderr)
    missing = [run.path for run in runs if not os.path.isdir(run.path)]
    for path in missing:
        print(f"warning: {path} does not exist", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
