"""Ablation runs -> a markdown table (printed and written) and a plot of AP against epoch.

usage: python scripts/summarize.py OUTPUT_DIR [OUTPUT_DIR ...] [--out results.md] [--plot ap.png]

Each OUTPUT_DIR is what ``main.py --output_dir`` wrote: ``log.jsonl`` (one JSON record per
print window and per epoch) and ``config.yaml`` (the resolved flags). Runs still in progress,
runs without any evaluation yet and half-written last lines are reported, not fatal: a summary
is most useful exactly while the table is still being filled in.
"""
import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import yaml

# COCO's 12 summary numbers come in this order (pycocotools COCOeval.stats); we report the first six.
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# keys under which a per-iteration time may be logged, most specific first
TIME_KEYS = ["sec_per_iter", "s_per_iter", "iter_time", "time_per_iter"]


@dataclass
class Run:
    """What one output directory tells about its run."""
    path: str
    label: str
    config: Dict[str, Any]
    epochs_planned: Optional[int]
    curve: List[Dict[str, float]] = field(default_factory=list)   # per evaluated epoch: epoch + METRICS
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


# ----------------------------------------------------------------------------- reading

def read_jsonl(path: str) -> Iterable[Dict[str, Any]]:
    """Records of a log.jsonl; a truncated or garbled line (a run being written) is skipped."""
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


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


def run_label(run_dir: str, config: Dict[str, Any]) -> str:
    """'v3.0.4' or 'v3.0.4 +two-stage'; the directory name when the config names no variant."""
    variant = config.get("variant") or os.path.basename(os.path.normpath(run_dir))
    return f"{variant} +two-stage" if config.get("two_stage") else str(variant)


def _is_epoch_record(record: Dict[str, Any]) -> bool:
    kind = record.get("type") or record.get("kind")
    if kind is not None:
        return str(kind).lower() in ("epoch", "eval", "test")
    # upstream-style logs: epoch records carry the epoch number but no iteration counter
    return "epoch" in record and not any(k in record for k in ("iter", "iteration", "step"))


def load_run(run_dir: str) -> Run:
    """Read one output directory; missing files become notes rather than errors."""
    config = load_config(os.path.join(run_dir, "config.yaml"))
    run = Run(path=run_dir, label=run_label(run_dir, config), config=config,
              epochs_planned=config.get("epochs") if isinstance(config.get("epochs"), int) else None)
    if not config:
        run.notes.append("no config.yaml")
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        run.notes.append("no log.jsonl")
        return run
    for record in read_jsonl(log_path):
        metrics = coco_metrics(record)
        if metrics is not None:
            epoch = _as_number(record.get("epoch"))
            epoch = epoch if epoch is not None else float(len(run.curve))
            # an evaluation repeated for the same epoch (resume, --eval) replaces the older one
            run.curve = [point for point in run.curve if point["epoch"] != epoch]
            run.curve.append({"epoch": epoch, **metrics})
        if _is_epoch_record(record):
            epoch = _as_number(record.get("epoch"))
            if epoch is not None:
                run.epochs_logged = max(run.epochs_logged, int(epoch) + 1)
        else:
            seconds = iteration_time(record)
            if seconds is not None:
                run.iter_times.append(seconds)
            epoch = _as_number(record.get("epoch"))
            if epoch is not None:
                run.epoch_training = max(run.epoch_training, int(epoch))
    run.curve.sort(key=lambda point: point["epoch"])
    if run.epoch_training >= run.epochs_logged:
        run.notes.append(f"training epoch {run.epoch_training + 1}")
    if not run.curve:
        run.notes.append("no evaluation yet")
    return run


# ----------------------------------------------------------------------------- output

def _cell(value: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    """'–' when not logged; 'n/a' for pycocotools' -1 (no ground truth in that area range)."""
    if value is None:
        return "–"
    return "n/a" if value < 0 else f"{value * scale:.{digits}f}"


def markdown_table(runs: List[Run]) -> str:
    """One row per run: AP numbers (percent) of the last evaluated epoch, epochs, seconds/iteration."""
    header = ["variant"] + METRICS + ["epochs", "s/iter", "run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for run in runs:
        final = run.final or {}
        planned = f"/{run.epochs_planned}" if run.epochs_planned is not None else ""
        seconds = run.sec_per_iter
        note = f" ({'; '.join(run.notes)})" if run.notes else ""
        cells = [run.label] + [_cell(final.get(m)) for m in METRICS]
        cells += [f"{run.epochs_logged}{planned}", "–" if seconds is None else f"{seconds:.3f}",
                  f"`{run.path}`{note}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: List[Run], path: str) -> None:
    """AP (percent) against epoch, one line per run; runs without evaluation are left out of the legend."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for run in runs:
        if not run.curve:
            continue
        epochs = [point["epoch"] + 1 for point in run.curve]  # 1-based: "after epoch N"
        ax.plot(epochs, [point["AP"] * 100 for point in run.curve], marker="o", markersize=3, label=run.label)
        plotted += 1
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("box AP (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="output directories of main.py runs")
    parser.add_argument("--out", default="results.md", help="markdown file to write")
    parser.add_argument("--plot", default="ap.png", help="PNG of AP against epoch ('' to skip)")
    args = parser.parse_args(argv)

    runs = [load_run(path) for path in args.runs]
    table = markdown_table(runs)
    print(table, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    if args.plot:
        plot_curves(runs, args.plot)
    missing = [run.path for run in runs if not os.path.isdir(run.path)]
    for path in missing:
        print(f"warning: {path} does not exist", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
