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
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the parts, by role (scripts/run_summary/): reading runs, statistics, tables, plots
from run_summary.plots import plot_curves, plot_diagnostics  # noqa: E402
from run_summary.runs import Run, expand_run_dirs, load_run  # noqa: E402,F401
from run_summary.statistics import Group, group_runs, mean_curve  # noqa: E402,F401
from run_summary.tables import EPOCH_DIAG_PREFIXES, report  # noqa: E402


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
