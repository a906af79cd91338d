"""The reference diagnostics (docs/design.md §9, docs/research.md "Reference diagnostics") of checkpoints.

usage: python scripts/diagnose.py --resume CKPT [CKPT ...] --out DIR [--diag_images N] [--config FILE]
           [--unsafe_trust_checkpoint CKPT] [any main.py flag, e.g. --coco_path DATA --device cpu]

Each checkpoint (a file, or a run directory: its latest checkpoint) is measured as itself, loaded
as every script loads a run (``cli/run_loading.py``): with ``--config`` when given, else the
config.yaml of its run directory, else the configuration it records (``args``); an upstream-style
checkpoint (``args`` is upstream's argparse.Namespace) or a bare state dict needs ``--config``, and
a configuration whose model flags disagree with the checkpoint's record is refused. main.py flags
after it override either. The probe set is the first N validation images by image id
(``--diag_images``; unset: the first checkpoint's own value, else 32), evaluation transforms. With
several checkpoints (in the order given, e.g. epochs 3, 7, 11 of one run) the across-evaluation D3
instabilities are measured between consecutive ones of the same configuration; a checkpoint of
another configuration (say a baseline, then a v3.0.2 run) gets its own model and starts afresh.

Writes DIR/diagnostics.json ({"config" (the first checkpoint's), "N", "describe", "evaluations":
[{"checkpoint", "epoch", "variant", "config", "metrics"}]}) and DIR/diagnostics.png: one panel per
diagnostic against the layer (or stage) it was measured at, one line per feature level (one
checkpoint) or per checkpoint (several).
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.diagnostics_plot import Panel, Series  # noqa: E402
from util.errors import InputError  # noqa: E402

# probe images when neither --diag_images nor the run's configuration names a number
FALLBACK_IMAGES = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="+", required=True, help="checkpoints, in training order")
    parser.add_argument("--out", required=True, help="folder for diagnostics.json and diagnostics.png")
    parser.add_argument("--diag_images", type=int, default=None,
                        help=f"probe images (unset: the first checkpoint's --diag_images, else {FALLBACK_IMAGES})")
    parser.add_argument("--config", default=None,
                        help="the YAML config of every checkpoint (default: the flags each checkpoint records)")
    parser.add_argument("--unsafe_trust_checkpoint", default="", metavar="FILE",
                        help="load FILE (one of the checkpoints) with full pickle, which can run code in it; only "
                             "for a legacy checkpoint you trust that the safe loader refuses")


# ----------------------------------------------------------------------------- configuration

def run_configuration(checkpoint: Dict, path: str, config_file: Optional[str], main_flags: Sequence[str],
                      images: Optional[int]):
    """The configuration checkpoint ``path`` (read: ``checkpoint``) is measured with, as every script
    loads a run (``cli.run_loading``: ``config_file`` or the run's config.yaml, else its record;
    ``main_flags`` over it), its validation data checked, with ``--diag_images`` set for the probe
    (``images``; None: the configuration's own, else 32)."""
    from cli.run_loading import checkpoint_configuration, checkpoint_files

    config_file = config_file or checkpoint_files(path, "--resume")[1]
    config = checkpoint_configuration(checkpoint, path, "--resume", config_file, main_flags, check_paths=True)
    if images is None:
        images = config.diag_images or FALLBACK_IMAGES
    if images < 1:
        raise ValueError(f"--diag_images {images} must be >= 1 here (0 would measure nothing)")
    return config.replace(diag_images=images)


# ----------------------------------------------------------------------------- measuring

@dataclass
class Probe:
    """One configuration's model, its diagnostics recorder and the probe images: shared by
    consecutive checkpoints of that configuration (the across-evaluation D3 compares them)."""

    config: Any
    model: torch.nn.Module
    diagnostics: Any  # models.diagnostics.ReferenceDiagnostics of ``model``
    dataset: Any
    indices: List[int]


def build_probe(config) -> Probe:
    """The model of ``config`` on its device, a fresh recorder, and the first N validation images."""
    import datasets
    import models
    from datasets.probe import probe_indices
    from models.diagnostics import ReferenceDiagnostics

    dataset = datasets.build_dataset("val", config)
    indices, message = probe_indices(dataset, config.diag_images)
    if message:
        print(message, flush=True)
    model, _, _ = models.build_model(config)
    model.to(torch.device(config.device))
    return Probe(config, model, ReferenceDiagnostics(model, seed=config.seed), dataset, indices)


def configuration_change(before, after) -> str:
    """'' when two checkpoints' configurations build the same model and probe, else the flags that
    differ ('; flags that differ ...', as the resume check words them)."""
    from cli.checkpoint_config import differences_from_checkpoint
    from cli.config import config_dict

    return differences_from_checkpoint(config_dict(before), after)


def diagnose(paths: Sequence[str], config_file: Optional[str], main_flags: Sequence[str], images: Optional[int],
             trusted: str = "") -> Tuple[int, List[Dict], Any]:
    """(probe images used, [{"checkpoint", "epoch", "variant", "config", "metrics"}] per checkpoint in
    order, the first checkpoint's configuration). Checkpoints are read one at a time, each with
    its own configuration; ``trusted``: the file --unsafe_trust_checkpoint names."""
    from cli.config import config_dict
    from datasets.probe import probe_batches
    from cli.run_loading import checkpoint_files, load_model_weights, read_checkpoint
    from util.checkpoint import saved_config

    probe, first, evaluations = None, None, []
    for given in paths:
        path = checkpoint_files(given, "--resume")[0]  # a run directory: its latest checkpoint
        checkpoint = read_checkpoint(path, "--resume", trusted)
        config = run_configuration(checkpoint, path, config_file, main_flags, images)
        images = config.diag_images  # every checkpoint on the same number of probe images
        if first is None:
            first = config
        change = configuration_change(probe.config, config) if probe is not None else ""
        if probe is None or change:
            if probe is not None:
                print(f"{path}: another configuration than the checkpoint before it{change}: measured with its own "
                      "model (no across-evaluation D3 against the one before)", flush=True)
            probe = build_probe(config)
        load_model_weights(probe.model, path, strict=True, flag="--resume", saved=saved_config(checkpoint),
                           config=config, loaded=checkpoint)
        epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
        del checkpoint
        batches = probe_batches(probe.dataset, probe.indices, config.batch_size)
        metrics = probe.diagnostics.measure(batches)
        evaluations.append({"checkpoint": path, "epoch": epoch, "variant": config.variant,
                            "config": config_dict(config), "metrics": metrics})
        print(f"{path}: {len(metrics)} diagnostics on {len(probe.indices)} images", flush=True)
    return len(probe.indices), evaluations, first


# ----------------------------------------------------------------------------- the picture

def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def split_key(key: str) -> Tuple[str, Tuple[str, ...]]:
    """'D4/fg_in_img/enc0/lvl1' -> ('D4/fg_in_img', ('enc0', 'lvl1')); 'D4/fg_in_img' -> ('D4/fg_in_img', ())."""
    parts = key.split("/")
    return "/".join(parts[:2]), tuple(parts[2:])


def panels(metrics: Dict[str, float]) -> Dict[str, Dict[Tuple[str, ...], float]]:
    """{metric name: {scopes: value}} in family order, e.g. {'D4/fg_in_img': {(): 0.4, ('enc0',): ...}}."""
    grouped: Dict[str, Dict[Tuple[str, ...], float]] = {}
    for key in sorted(metrics, key=_natural):
        name, scopes = split_key(key)
        grouped.setdefault(name, {})[scopes] = metrics[key]
    return grouped


# what the scope prefixes of the keys mean, as axis labels
SCOPE_NAMES = {"enc": "encoder layer", "dec": "references made after decoder layer", "lvl": "feature level",
               "slot": "reference slot"}


def _scope_label(scope: str) -> str:
    prefix = re.sub(r"\d+$", "", scope)
    return SCOPE_NAMES.get(prefix, prefix or "scope")


def panel_series(values_per_checkpoint: List[Dict[Tuple[str, ...], float]], labels: List[str]
                 ) -> Tuple[List[str], List[Tuple[str, List[float]]]]:
    """(x scopes, [(series label, values at x)]) of one diagnostic.

    One checkpoint: x = the first scope (layer / update); a series per second scope (level, slot)
    and their pooled 'mean' (the key with the first scope only). Several: a series per checkpoint
    of those pooled means. A diagnostic with only second-level splits (slotN without a layer mean
    in several checkpoints) uses the single-scope keys as x; one with no scope at all has x = [''].
    """
    nan = float("nan")
    scoped = [scopes for values in values_per_checkpoint for scopes in values]
    layered = sorted({scopes[0] for scopes in scoped if len(scopes) == 2}, key=_natural)
    single = sorted({scopes[0] for scopes in scoped if len(scopes) == 1}, key=_natural)
    if len(values_per_checkpoint) == 1:
        values = values_per_checkpoint[0]
        if layered:
            seconds = sorted({scopes[1] for scopes in values if len(scopes) == 2}, key=_natural)
            series = [(second, [values.get((first, second), nan) for first in layered]) for second in seconds]
            means = [values.get((first,), nan) for first in layered]
            return layered, series + ([("mean", means)] if any(v == v for v in means) else [])
        x = single or [""]
        return x, [(labels[0], [values.get((first,) if first else (), nan) for first in x])]
    x = [first for first in layered if all((first,) in values for values in values_per_checkpoint)] or single
    x = x or [""]
    return x, [(label, [values.get((first,) if first else (), nan) for first in x])
               for label, values in zip(labels, values_per_checkpoint)]


def diagnostic_panels(evaluations: List[Dict], describe: Dict[str, str]) -> List[Panel]:
    """One panel per diagnostic (see ``panel_series``) against the layer, titled with what it measures."""
    per_checkpoint = [panels(e["metrics"]) for e in evaluations]
    names = sorted({name for grouped in per_checkpoint for name in grouped}, key=_natural)
    labels = [f"epoch {e['epoch']}" if e.get("epoch") is not None else os.path.basename(e["checkpoint"])
              for e in evaluations]
    if len({e.get("variant") for e in evaluations}) > 1:  # checkpoints of several variants: say which is which
        labels = [f"{e.get('variant') or 'stock'} {label}" for e, label in zip(evaluations, labels)]
    out = []
    for name in names:
        x, series = panel_series([grouped.get(name, {}) for grouped in per_checkpoint], labels)
        out.append(Panel(title=name, x=list(range(len(x))), ticks=x, xlabel=_scope_label(x[0]) if x[0] else "",
                         ylabel=name.split("/")[1], subtitle=describe.get(name, ""),
                         series=[Series(label, values, emphasised=label == "mean") for label, values in series]))
    return out


def plot_diagnostics(evaluations: List[Dict], describe: Dict[str, str], path: str, title: str) -> None:
    """diagnostics.png: the diagnostics picture (``util.diagnostics_plot``), one panel per diagnostic."""
    from util.diagnostics_plot import plot_diagnostics as plot

    plot(diagnostic_panels(evaluations, describe), path, title=title, ordered=len(evaluations) > 1)


# ----------------------------------------------------------------------------- command line

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    own, main_flags = parser.parse_known_args(argv)
    try:
        if os.path.exists(own.out) and not os.path.isdir(own.out):
            raise InputError(f"--out {own.out} exists and is not a folder")
        images, evaluations, config = diagnose(own.resume, own.config, main_flags, own.diag_images,
                                               own.unsafe_trust_checkpoint)
    except (ValueError, FileNotFoundError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    from models.diagnostics import ReferenceDiagnostics
    from cli.config import config_dict

    describe = ReferenceDiagnostics.describe()
    os.makedirs(own.out, exist_ok=True)
    with open(os.path.join(own.out, "diagnostics.json"), "w") as f:
        json.dump({"config": config_dict(config), "N": images, "describe": describe, "evaluations": evaluations},
                  f, indent=1)
    variants = list(dict.fromkeys(e["variant"] or "stock" for e in evaluations))
    measured = f"{variants[0]} ({config.stages})" if len(variants) == 1 else ", ".join(variants)
    title = (f"reference diagnostics of {measured}, {images} probe images, "
             f"{len(evaluations)} checkpoint{'s' if len(evaluations) > 1 else ''}")
    plot_diagnostics(evaluations, describe, os.path.join(own.out, "diagnostics.png"), title)
    print(os.path.join(own.out, "diagnostics.json"))
    print(os.path.join(own.out, "diagnostics.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
