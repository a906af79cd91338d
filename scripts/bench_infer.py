"""Inference throughput and latency of the detector (model + postprocessor) at the evaluation size.

usage: python scripts/bench_infer.py --config FILE [--batch_sizes 1 8] [--dtypes fp32 bf16]
                                     [--compare VARIANT [VARIANT ...]] [--warmup N] [--repeats N]
                                     [--image_size H W] [any main.py flag]
       (or: python scripts/benchmark.py infer ...)

One call is models.inference.InferenceModel on a fixed random batch of one padded size (default
eval_size x max_size, what evaluation pads to at most), in eval mode under no_grad, with the
postprocessor (top-k) included; CUDA is synchronised around each call. For every variant, dtype
and batch size it prints one JSON object: ``images_per_s`` (batch / median latency),
``latency_ms`` median and ``latency_ms_p90`` over the repeats. Variants, dtypes and batch sizes
are interleaved call by call (A B A B ...) so that background load hits all alike; ratio lines
compare each variant with the first at the same dtype and batch size, and bf16 with fp32, at the
median and at the fastest call (``images_per_s_best``: robust when other processes share the CPU).
Weights are random (speed does not depend on them). Data loading is not included.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(SCRIPTS), SCRIPTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_model import default_image_size, model_args  # noqa: E402

DTYPES = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="images per call")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32"],
                        help="fp32, or autocast to bf16 / fp16 (fp16: GPU only)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="VARIANT",
                        help="measure these presets side by side (interleaved)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="padded input size (default: eval_size x max_size of the config)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per measurement first")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")


@dataclass
class Subject:
    """One (variant, dtype, batch size) being measured."""
    label: str
    args: argparse.Namespace
    model: torch.nn.Module
    dtype: str
    batch_size: int
    inputs: tuple
    times: List[float] = field(default_factory=list)


def build_inference_model(args) -> torch.nn.Module:
    from models import build_model
    from models.inference import InferenceModel
    torch.manual_seed(args.seed)
    model, _, postprocessors = build_model(args)
    return InferenceModel(model, postprocessors["bbox"]).to(torch.device(args.device)).eval()


def batch(size, batch_size: int, device) -> tuple:
    """(images, mask, target_sizes) of ``batch_size`` unpadded random images of ``size``."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    images = torch.randn(batch_size, 3, h, w, generator=g).to(device)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool, device=device)
    return images, mask, torch.tensor([[h, w]] * batch_size, device=device)


@torch.no_grad()
def call_seconds(subject: Subject) -> float:
    """Wall seconds of one inference call (synchronised on CUDA)."""
    from engine import autocast
    device = torch.device(subject.args.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast(device, DTYPES[subject.dtype]):
        subject.model(*subject.inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def result_line(subject: Subject, size) -> Dict:
    times = np.asarray(subject.times)
    median = float(np.median(times))
    args = subject.args
    return {"bench": "infer", "label": subject.label, "variant": args.variant or "custom", "stages": args.stages,
            "image_size": list(size), "batch_size": subject.batch_size, "device": str(torch.device(args.device)),
            "dtype": subject.dtype, "images_per_s": round(subject.batch_size / median, 3),
            "latency_ms": round(1000 * median, 2), "latency_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
            "latency_ms_min": round(1000 * float(times.min()), 2), "repeats": len(times),
            "params": sum(p.numel() for p in subject.model.parameters()), "threads": torch.get_num_threads()}


def _ratio(name: str, num: Dict, den: Dict, **where) -> Dict:
    """num / den of the throughput at the median latency, and at the fastest call (the one least
    slowed by other processes: the robust figure on a shared machine)."""
    return {"ratio": name, **where, "batch_size": num["batch_size"],
            "images_per_s": round(num["images_per_s"] / den["images_per_s"], 4),
            "images_per_s_best": round(den["latency_ms_min"] / num["latency_ms_min"], 4)}


def ratio_lines(records: List[Dict]) -> List[Dict]:
    """Throughput of each variant over the first one (same dtype and batch), and bf16 over fp32."""
    lines = []
    first = records[0]["label"]
    key = {(r["label"], r["dtype"], r["batch_size"]): r for r in records}
    for r in records:
        base = key.get((first, r["dtype"], r["batch_size"]))
        if r["label"] != first and base is not None:
            lines.append(_ratio(f"{r['label']}/{first}", r, base, dtype=r["dtype"]))
        fp32 = key.get((r["label"], "fp32", r["batch_size"]))
        if r["dtype"] != "fp32" and fp32 is not None:
            lines.append(_ratio(f"{r['dtype']}/fp32", r, fp32, label=r["label"]))
    return lines


def run(bench: argparse.Namespace, main_argv: Sequence[str], emit=print) -> List[Dict]:
    """Measure every (variant, dtype, batch size), interleaved; returns the JSON records."""
    from cli.config import check_amp_device
    subjects = []
    for name in bench.compare or [None]:
        args = model_args(main_argv, name)
        model = build_inference_model(args)
        size = tuple(bench.image_size) if bench.image_size else default_image_size(args)
        for dtype in bench.dtypes:
            check_amp_device(DTYPES[dtype], args.device)
            for batch_size in bench.batch_sizes:
                subjects.append(Subject(name or args.variant or "custom", args, model, dtype, batch_size,
                                        batch(size, batch_size, args.device)))
    for subject in subjects:
        for _ in range(bench.warmup):
            call_seconds(subject)
    for _ in range(bench.repeats):
        for subject in subjects:
            subject.times.append(call_seconds(subject))
    records = [result_line(s, tuple(s.inputs[0].shape[-2:])) for s in subjects]
    records += ratio_lines(records)
    for record in records:
        emit(json.dumps(record))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    bench, main_argv = parser.parse_known_args(argv)
    if bench.repeats < 1 or bench.warmup < 0 or min(bench.batch_sizes) < 1:
        parser.error("--repeats and --batch_sizes must be >= 1 and --warmup >= 0")
    run(bench, main_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
