"""What the reference diagnostics add to an evaluation: evaluation with and without them, side by side.

usage: python scripts/bench_diagnostics.py [--config configs/demo.yaml] [--variants stock v3.0.4]
           [--images 4 8 16 32] [--repeats 3] [--resume CKPT] [any main.py flag]

For each variant (``stock``: the config as it is; else ``--variant NAME`` on top of it), every
repeat times one evaluation ("off") and right after it the diagnostics of the first N validation
images for each N, so each diagnostics pass sees the machine load of the evaluation it is
compared with; "on" = that evaluation + the pass, which is what main.py does once per evaluation.
Prints one JSON object per line: each measurement, then per variant and N the medians over
repeats, ``ratio`` = the median of the repeats' on / off (docs/design.md §8 budget: <= 1.10). Medians, because a shared
machine's load changes from one run to the next. pycocotools' tables go to stderr. Random init
unless ``--resume``.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"), help="run configuration")
    parser.add_argument("--variants", nargs="+", default=["stock", "v3.0.4"],
                        help="'stock' (the config as is) or variant presets added on top of it")
    parser.add_argument("--images", type=int, nargs="+", default=[4, 8, 16, 32], help="probe sizes N")
    parser.add_argument("--repeats", type=int, default=3, help="evaluations (each followed by every N) per variant")
    parser.add_argument("--resume", default="", help="weights to evaluate (default: random init)")


def build(config_file: str, variant: str, main_flags: Sequence[str], resume: str):
    """(config, model on its device, validation dataset, loader, COCO api, postprocessors) of one variant."""
    from torch.utils.data import DataLoader, SequentialSampler

    import datasets
    from cli.run_loading import build_loaded_run, random_init_configuration, read_checkpoint

    extra = [] if variant == "stock" else ["--variant", variant]
    # the validation split only is read (and checked), and nothing is written
    config = random_init_configuration(["--config", config_file, *extra, "--output_dir", "", *main_flags],
                                       check_paths=True, evaluating=True)
    weights = read_checkpoint(resume, "--resume") if resume else None
    run = build_loaded_run(config, weights, resume, "--resume", seed=config.seed)
    model, postprocessors = run.model, run.postprocessors
    dataset = datasets.build_dataset("val", config)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=SequentialSampler(dataset),
                        collate_fn=datasets.collate_fn, num_workers=config.num_workers)
    return config, model, dataset, loader, datasets.get_coco_api(dataset), postprocessors


def time_evaluation(config, model, loader, base_ds, postprocessors) -> float:
    """Seconds of one ``engine.evaluate`` pass (its printed tables go to stderr)."""
    from engine import evaluate

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        evaluate(model, postprocessors, loader, base_ds, torch.device(config.device), amp=config.amp,
                 print_freq=config.print_freq, guidance=config)
    return time.perf_counter() - start


def time_diagnostics(config, diagnostics, dataset, images: int) -> float:
    """Seconds of one diagnostics pass over the first ``images`` validation images."""
    from datasets.probe import probe_batches, probe_indices

    start = time.perf_counter()
    indices, _ = probe_indices(dataset, images)
    diagnostics.measure(probe_batches(dataset, indices, config.batch_size))
    return time.perf_counter() - start


def bench_variant(variant: str, own, main_flags: Sequence[str]) -> List[Dict]:
    """Interleaved off/on measurements of one variant; prints each; returns the per-N summaries."""
    from models.diagnostics import ReferenceDiagnostics

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries JSON lines only
        config, model, dataset, loader, base_ds, postprocessors = build(own.config, variant, main_flags, own.resume)
    diagnostics = ReferenceDiagnostics(model, seed=config.seed)
    time_diagnostics(config, diagnostics, dataset, min(own.images))  # warm-up (first-call costs)
    samples: Dict[int, Dict[str, List[float]]] = {n: {"off": [], "on": [], "diag": [], "ratio": []}
                                                  for n in own.images}
    for repeat in range(own.repeats):
        off = time_evaluation(config, model, loader, base_ds, postprocessors)
        for images in own.images:
            diag = time_diagnostics(config, diagnostics, dataset, images)
            for key, value in (("off", off), ("on", off + diag), ("diag", diag), ("ratio", (off + diag) / off)):
                samples[images][key].append(value)
            print(json.dumps({"variant": variant, "N": images, "repeat": repeat, "eval_off_s": off,
                              "eval_on_s": off + diag, "diag_s": diag}), flush=True)
    summaries = []
    for images, values in samples.items():
        off, on, diag, ratio = (statistics.median(values[key]) for key in ("off", "on", "diag", "ratio"))
        summaries.append({"variant": variant, "N": min(images, len(dataset)), "val_images": len(dataset),
                          "repeats": own.repeats, "eval_off_s": off, "eval_on_s": on, "diag_s": diag,
                          "ratio": ratio, "diag_s_per_image": diag / min(images, len(dataset)),
                          "device": config.device, "threads": torch.get_num_threads(),
                          "note": "medians over repeats; each pass timed right after its evaluation"})
    return summaries


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    own, main_flags = parser.parse_known_args(argv)
    if own.repeats < 1 or min(own.images) < 1:
        print("error: --repeats and every --images value must be >= 1", file=sys.stderr)
        return 2
    summaries = []
    for variant in own.variants:
        summaries += bench_variant(variant, own, main_flags)
    for summary in summaries:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
