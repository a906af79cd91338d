"""Reading runs: what one output directory of main.py tells (config.yaml, log.jsonl and, when
scripts/diagnose.py computed them afterwards, diagnostics/diagnostics.json).

The log is read with ``util.jsonl.read_jsonl``, the reader the trainer itself uses: a line that is
not a UTF-8 JSON object (cut short by a kill) is skipped, as the trainer skips it.
"""
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from util.jsonl import read_jsonl

# COCO's 12 summary numbers come in this order (pycocotools COCOeval.stats); we report the first six.
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# keys under which a per-iteration time may be logged, most specific first
TIME_KEYS = ["sec_per_iter", "s_per_iter", "iter_time", "time_per_iter"]
SEED_DIR = re.compile(r"^seed(\d+)$")
# the reference diagnostics a summary reads: the overall means (family and name only, 'D4/fg_in_img';
# per-layer keys have more parts), D2 per guidance update ('D2/same_obj/dec0'), because worry 2
# (early decoder stages are unreliable) is read from exactly that split, and the per-level means over
# the layers ('D6/coverage/lvl0': coverage is decided on the finest level)
OVERALL_DIAG = re.compile(r"^D\d/[^/]+$|^D2/[^/]+/dec\d+$|^D\d/[^/]+/lvl\d+$")
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
