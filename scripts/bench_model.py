"""Training-step time and peak memory of the whole detector on a synthetic batch.

usage: python scripts/bench_model.py --config FILE [--image_size H W] [--warmup N] [--repeats N]
                                     [--compare VARIANT [VARIANT ...] | --compare_flags FLAGS [FLAGS ...]]
                                     [any main.py flag]
       (or: python scripts/benchmark.py model ...)

One step is ``engine.train_step``, what training does per iteration: forward, losses, backward,
gradient clipping and the optimiser step (CUDA is synchronised around it on GPUs). Data loading
is left out so the numbers compare model variants, not input pipelines. Prints one JSON object
per line; ``step_s`` is the median over the repeats.

Peak memory (``mem_kind`` says which): on a GPU torch.cuda.max_memory_allocated over the timed
steps; on CPU the peak of live tensor bytes (model footprint + what the step allocates),
counted op by op in one extra, untimed step.

``--compare A B ...`` builds one model per variant in this process and interleaves their steps
(A B A B ...) so drifting clocks, thermal state and background load hit every variant alike;
it then prints a ratio line of each later variant against the first. ``--compare_flags base use_dn``
does the same for sets of extra flags on one configuration (e.g. denoising on/off): each item is
space-separated flag names without dashes, ``name=value`` for valued flags, ``base`` for none. Under
``--compile`` each model is ``torch.compile``d as main.py does.
"""
import argparse
import contextlib
import gc
import json
import os
import shlex
import statistics
import sys
import weakref
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli.config import Config  # noqa: E402
from cli.run_loading import random_init_configuration  # noqa: E402
from util.errors import InputError  # noqa: E402
from util.nested_tensor import nested_tensor_from_tensor_list  # noqa: E402

DTYPE_NAMES = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own flags; everything else is handed to main.py's parser."""
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="padded batch size in pixels (default: eval_size x max_size of the config)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--objects", type=int, default=5, help="ground-truth boxes per synthetic image")
    parser.add_argument("--compare", nargs="+", default=None, metavar="VARIANT",
                        help="measure these presets side by side, interleaving their steps")
    parser.add_argument("--compare_flags", nargs="+", default=None, metavar="FLAGS",
                        help="measure the configuration with each of these flag sets side by side, "
                             "interleaving their steps: flag names without dashes, name=value for valued "
                             "flags, 'base' for none (e.g. base use_dn 'use_dn dn_number=20')")


# ----------------------------------------------------------------------------- set-up

def model_args(main_argv: Sequence[str], variant: Optional[str] = None, extra: str = "") -> Config:
    """main.py flags (+ an overriding --variant) -> the configuration (``cli.run_loading``: the class
    count from --num_classes or the dataset, the device after the CPU fallback).

    Backbone weights are irrelevant to speed, so random init is used unless the flags name a file.
    """
    argv = list(main_argv) + flag_set_tokens(extra)
    if "--backbone_weights" not in argv:
        argv += ["--backbone_weights", "none"]
    if variant is not None:
        argv += ["--variant", variant]
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON lines; a CPU fallback says so on stderr
        return random_init_configuration(argv)


def flag_set_tokens(flag_set: str) -> List[str]:
    """'use_dn dn_number=20' -> ['--use_dn', '--dn_number', '20']; 'base' or '' -> []."""
    tokens = []
    for item in shlex.split(flag_set):
        if item == "base":
            continue
        name, sep, value = item.partition("=")
        tokens += ["--" + name.lstrip("-")] + ([value] if sep else [])
    return tokens


def default_image_size(args) -> Tuple[int, int]:
    """Worst case of evaluation-size images: shorter side eval_size, longer side max_size."""
    short = args.eval_size or max(args.min_size)
    return short, max(short, args.max_size)


def synthetic_batch(args, size: Tuple[int, int], objects: int, device) -> Tuple[object, List[Dict]]:
    """Random images of one size (no padding) and random well-formed boxes, fixed by a seed."""
    g = torch.Generator().manual_seed(1234)
    h, w = size
    images = [torch.randn(3, h, w, generator=g) for _ in range(args.batch_size)]
    targets = []
    for _ in range(args.batch_size):
        centres = torch.rand(objects, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(objects, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, args.num_classes, (objects,), generator=g)
        targets.append({"boxes": torch.cat([centres, sizes], 1).to(device), "labels": labels.to(device)})
    return nested_tensor_from_tensor_list(images).to(device), targets


@dataclass
class Subject:
    """One variant being measured: its model, criterion and optimiser, and what was measured."""
    name: str
    args: argparse.Namespace
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[object]
    trainable: List[torch.nn.Parameter] = field(default_factory=list)   # what clipping walks over
    times: List[float] = field(default_factory=list)
    peaks: List[float] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_subject(name: str, args) -> Subject:
    """Model, criterion and the optimiser main.py builds (parameter groups, AdamW or SGD)."""
    from models import build_model
    from util.optim import build_optimizer
    torch.manual_seed(args.seed)
    model, criterion, _ = build_model(args)
    device = torch.device(args.device)
    model.to(device).train()
    criterion.to(device).train()
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, args)
    if args.compile:  # main.py's --compile: the step runs the compiled module, parameters are shared
        model = torch.compile(model)
    return Subject(name, args, model, criterion, optimizer, scaler, trainable)


# ----------------------------------------------------------------------------- one step

def train_step(subject: Subject, samples, targets) -> None:
    """One training iteration exactly as the engine runs it (forward, losses, backward, clip, step)."""
    from engine import train_step as engine_step
    args = subject.args
    engine_step(subject.model, subject.criterion, samples, targets, subject.optimizer, torch.device(args.device),
                args.amp, args.clip_max_norm or 0.0, subject.trainable, scaler=subject.scaler, guidance=args,
                step=(0, 0, 0))


class LiveTensorBytes(TorchDispatchMode):
    """Counts CPU tensor storage allocated by ops run inside the mode while it is alive; keeps the peak.

    PyTorch's CPU allocator keeps no peak counter and RSS mostly shows what glibc has not given
    back yet (interleaved variants then look smaller the later they run), so the live bytes are
    counted at the op level instead: every new output storage adds its size, and a weak
    reference subtracts it when the storage is released. ``watch`` are tensors that exist
    before the step but may be released inside it (the previous step's gradients).
    """

    def __init__(self, watch: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = 0
        self._finalizers: Dict[int, weakref.finalize] = {}
        for tensor in watch:
            self._track(tensor.untyped_storage(), counted=False)

    def _track(self, storage, counted: bool = True) -> None:
        key = storage._cdata
        if key in self._finalizers:
            return
        size = storage.nbytes()
        self._finalizers[key] = weakref.finalize(storage, self._released, key, size)
        if counted:
            self.live += size
            self.peak = max(self.peak, self.live)

    def _released(self, key: int, size: int) -> None:
        self._finalizers.pop(key, None)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            # views and in-place results share an input's storage: nothing new was allocated
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out


def footprint_bytes(subject: Subject) -> int:
    """What the model holds between steps: parameters, buffers, gradients and optimiser state."""
    tensors = list(subject.model.parameters()) + list(subject.model.buffers())
    tensors += [p.grad for p in subject.model.parameters() if p.grad is not None]
    for state in subject.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def time_step(subject: Subject, samples, targets, alone: bool) -> Tuple[float, Optional[float]]:
    """Seconds of one step; on a GPU also its peak memory in bytes (None on CPU: see ``cpu_peak``)."""
    device = torch.device(subject.args.device)
    if device.type != "cuda":
        start = time.perf_counter()
        train_step(subject, samples, targets)
        return time.perf_counter() - start, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before, own = torch.cuda.memory_allocated(device), footprint_bytes(subject)
    start = time.perf_counter()
    train_step(subject, samples, targets)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if alone:
        return seconds, torch.cuda.max_memory_allocated(device)
    # other models in the process hold constant memory through this step: the growth over the
    # allocation before it, plus this model's own footprint, is what it would peak at alone
    return seconds, torch.cuda.max_memory_allocated(device) - before + own


def cpu_peak(subject: Subject, samples, targets) -> float:
    """Peak bytes of one (untimed: dispatch tracking slows ops down) CPU step, footprint included."""
    gc.collect()
    own = footprint_bytes(subject)
    grads = [p.grad for p in subject.model.parameters() if p.grad is not None]
    with LiveTensorBytes(watch=grads) as tracker:
        del grads  # the tracker must see the old gradients go when the step drops them
        train_step(subject, samples, targets)
    return own + tracker.peak


# ----------------------------------------------------------------------------- reports

def result_line(subject: Subject, size: Tuple[int, int], mem_kind: str, warmup: int) -> Dict:
    args = subject.args
    return {
        "label": subject.name, "variant": args.variant or "custom", "stages": args.stages, "two_stage": bool(args.two_stage),
        "image_size": list(size), "batch_size": args.batch_size, "device": str(torch.device(args.device)),
        "dtype": DTYPE_NAMES[args.amp], "step_s": round(statistics.median(subject.times), 5),
        "step_s_min": round(min(subject.times), 5), "repeats": len(subject.times), "warmup": warmup,
        "peak_mem_mb": round(max(subject.peaks), 1), "mem_kind": mem_kind,
        "params": subject.params, "threads": torch.get_num_threads(),
    }


def ratio_line(num: Dict, den: Dict) -> Dict:
    """num / den of the medians, of the fastest steps (robust when other jobs share the machine) and of peaks."""
    return {"ratio": f"{num['label']}/{den['label']}", "step_s": round(num["step_s"] / den["step_s"], 4),
            "step_s_min": round(num["step_s_min"] / den["step_s_min"], 4),
            "peak_mem": round(num["peak_mem_mb"] / den["peak_mem_mb"], 4) if den["peak_mem_mb"] > 0 else None}


def run(bench: argparse.Namespace, main_argv: Sequence[str], emit=print) -> List[Dict]:
    """Measure one configuration, or each of ``bench.compare`` interleaved; returns the JSON records."""
    subjects = []
    if bench.compare_flags:
        for extra in bench.compare_flags:
            subjects.append(build_subject(extra.strip() or "base", model_args(main_argv, extra=extra)))
        if len(subjects) == 1:
            raise SystemExit("--compare_flags needs at least two flag sets (e.g. base use_dn)")
    for name in bench.compare or ([] if bench.compare_flags else [None]):
        args = model_args(main_argv, name)
        subjects.append(build_subject(name or args.variant or "custom", args))
    size = tuple(bench.image_size) if bench.image_size else default_image_size(subjects[0].args)
    device = torch.device(subjects[0].args.device)
    samples, targets = synthetic_batch(subjects[0].args, size, bench.objects, device)
    alone = len(subjects) == 1
    for subject in subjects:
        for _ in range(bench.warmup):
            train_step(subject, samples, targets)
    on_gpu = device.type == "cuda"
    for _ in range(bench.repeats):
        for subject in subjects:  # A B A B ...: every variant sees the same machine state
            seconds, peak = time_step(subject, samples, targets, alone)
            subject.times.append(seconds)
            if peak is not None:
                subject.peaks.append(peak / 2 ** 20)
    if not on_gpu:
        for subject in subjects:
            subject.peaks.append(cpu_peak(subject, samples, targets) / 2 ** 20)
    kind = "cpu_tensor_live_peak" if not on_gpu else ("cuda_max_allocated" if alone else "cuda_step_growth_plus_own")
    records = [result_line(s, size, kind, bench.warmup) for s in subjects]
    records += [ratio_line(r, records[0]) for r in records[1:]]
    for record in records:
        emit(json.dumps(record))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    bench, main_argv = parser.parse_known_args(argv)
    if bench.repeats < 1 or bench.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if bench.compare and bench.compare_flags:
        parser.error("give --compare (presets) or --compare_flags (flag sets), not both")
    try:
        run(bench, main_argv)
    except (InputError, ValueError, FileNotFoundError) as exc:  # bad input: one line (exit 2), as main.py
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
