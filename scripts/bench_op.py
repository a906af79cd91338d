"""Benchmark of the multi-scale deformable attention operator: compiled CUDA op, Triton op, PyTorch path.

    python scripts/benchmark.py op [--impl cuda|triton|pytorch|deformops|all] [--dtype float32|bfloat16|float16|all]
                                   [--shape encoder|decoder300|decoder1800|tiny|all] [--repeats N] [--warmup N]
    python scripts/bench_op.py ...   (same flags)

Prints one JSON object per line and measurement:
    impl, dtype, shape, device, fwd_ms, fwdbwd_ms, peak_mem_mb, bandwidth_gbs, rel_err (+ sizes).
- fwd_ms / fwdbwd_ms: medians over --repeats runs, each timed with its own pair of CUDA events
  (time.perf_counter on CPU). Forward runs with autograd recording, as in training.
- peak_mem_mb: torch.cuda.max_memory_allocated during one forward+backward minus what was
  allocated before it (inputs and the output gradient are allocated before; the output, saved
  tensors, scratch and the three input gradients count). null on CPU.
- bandwidth_gbs: achieved forward bandwidth counting the minimum bytes a forward must move:
  value, locations and weights read once, output written once, divided by fwd_ms.
Inputs are what the model produces under autocast: value in --dtype, sampling locations and
attention weights in float32. Shapes: batch 2, 8 heads x 32 channels, 4 levels
(100x167, 50x84, 25x42, 13x21), 4 points; encoder queries = all 22223 tokens, decoder 300/1800
queries. ``tiny`` is a CPU smoke shape and is not part of ``all``.
- rel_err: max |out - ref| / max |ref| of the forward against the PyTorch path in float64 on
  the same inputs (a wrong call convention shows here, not only in the tests).
Implementations: ``cuda`` the compiled op (ops/src), ``triton`` the Triton op (its first calls
autotune and compile; the warm-up runs absorb that), ``pytorch`` the grid_sample path, and
``deformops`` the multi-scale deformable attention of the ``deformops`` package from PyPI when it
is installed (imported only; this script never installs anything).
A measurement that cannot run (no GPU for cuda, op not built, Triton or deformops missing)
prints a line with "skipped".
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

if __package__ in (None, ""):  # standalone: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ops  # noqa: E402

ENCODER_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SHAPES: Dict[str, dict] = {
    "encoder": dict(bs=2, len_q=None, heads=8, channels=32, levels=ENCODER_LEVELS, points=4),
    "decoder300": dict(bs=2, len_q=300, heads=8, channels=32, levels=ENCODER_LEVELS, points=4),
    "decoder1800": dict(bs=2, len_q=1800, heads=8, channels=32, levels=ENCODER_LEVELS, points=4),
    "tiny": dict(bs=1, len_q=None, heads=2, channels=8, levels=[(8, 10), (4, 5)], points=2),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLS = ("cuda", "triton", "pytorch", "deformops")
# deformops' public multi-scale deformable attention function, taking (value, spatial_shapes,
# level_start_index, sampling_locations, attention_weights) like Deformable-DETR's op. Only
# these documented-looking names are tried; a missing one is reported, not guessed further.
DEFORMOPS_FUNCTIONS = ("multi_scale_deformable_attention", "ms_deform_attn",
                       "functional.multi_scale_deformable_attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impl", default="all", choices=[*IMPLS, "all"])
    parser.add_argument("--dtype", default="all", choices=[*DTYPES, "all"])
    parser.add_argument("--shape", default="all", choices=[*SHAPES, "all"],
                        help="'all' = encoder, decoder300, decoder1800 (tiny is for CPU smoke runs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (50 GPU / 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (10 GPU / 1 CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--seed", type=int, default=0)


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """value (bs, Lin, heads, C) in dtype; shapes/starts int64; loc (bs, Lq, heads, L, P, 2), attn fp32."""
    g = torch.Generator(device=device).manual_seed(seed)
    levels = shape["levels"]
    ss = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = ss.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    len_in = sum(h * w for h, w in levels)
    len_q = shape["len_q"] or len_in
    bs, heads, ch, n_lvl, pts = shape["bs"], shape["heads"], shape["channels"], len(levels), shape["points"]
    value = torch.randn(bs, len_in, heads, ch, device=device, generator=g).to(dtype)
    loc = torch.rand(bs, len_q, heads, n_lvl, pts, 2, device=device, generator=g)
    attn = torch.randn(bs, len_q, heads, n_lvl * pts, device=device, generator=g).softmax(-1)
    attn = attn.view(bs, len_q, heads, n_lvl, pts)
    return value, ss, starts, loc, attn, levels


def _timer(device: torch.device) -> Callable[[Callable[[], None], int, int], List[float]]:
    if device.type == "cuda":
        def run(fn, repeats, warmup):
            for _ in range(warmup):
                fn()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            torch.cuda.synchronize(device)
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)  # one sync at the end: launches stay back to back
            return [start.elapsed_time(end) for start, end in events]
    else:
        def run(fn, repeats, warmup):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
    return run


def _deformops_function() -> Tuple[Optional[Callable], str]:
    """(function, name) of deformops' multi-scale deformable attention, or (None, why not)."""
    try:
        import deformops
    except ImportError as exc:
        return None, f"deformops is not installed ({exc})"
    for name in DEFORMOPS_FUNCTIONS:
        obj = deformops
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if callable(obj):
            return obj, f"deformops.{name}"
    public = sorted(n for n in dir(deformops) if not n.startswith("_"))
    return None, f"deformops {getattr(deformops, '__version__', '?')} has none of {DEFORMOPS_FUNCTIONS}: {public}"


def select_op(impl: str, device: torch.device) -> Tuple[Optional[Callable], str]:
    """(op(value, shapes, starts, loc, attn, levels) -> out, note) or (None, reason it cannot run here)."""
    if impl == "cuda":
        if device.type != "cuda":
            return None, "the cuda implementation needs a CUDA device"
        if ops.load_extension() is None:
            return None, f"compiled op unavailable: {ops.load_error()}"
        return (lambda v, s, st, l, a, lv: ops.ms_deform_attn_cuda(v, s, st, l, a)), ""  # noqa: E731
    if impl == "triton":
        reason = ops.triton_error(device)
        if reason is not None:
            return None, f"Triton op unavailable: {reason}"
        return (lambda v, s, st, l, a, lv: ops.ms_deform_attn_triton(v, s, st, l, a, lv)), ""  # noqa: E731
    if impl == "deformops":
        fn, note = _deformops_function()
        if fn is None:
            return None, note
        return (lambda v, s, st, l, a, lv: fn(v, s, st, l, a)), note  # noqa: E731
    return (lambda v, s, st, l, a, lv: ops.ms_deform_attn_pytorch(v, s, st, l, a, lv)), ""  # noqa: E731


def measure(impl: str, dtype_name: str, shape_name: str, device: torch.device, repeats: int, warmup: int,
            seed: int) -> dict:
    shape = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    record = {"impl": impl, "dtype": dtype_name, "shape": shape_name, "device": _device_name(device)}
    op, note = select_op(impl, device)
    if op is None:
        return {**record, "skipped": note}
    if note:
        record["function"] = note

    value, ss, starts, loc, attn, levels = make_inputs(shape, dtype, device, seed)
    if impl != "deformops":
        return {**record, **_timings(op, value, ss, starts, loc, attn, levels, device, repeats, warmup)}
    try:
        return {**record, **_timings(op, value, ss, starts, loc, attn, levels, device, repeats, warmup)}
    except Exception as exc:  # a foreign package's call convention may differ: report it, measure the rest
        return {**record, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}


def _timings(op, value, ss, starts, loc, attn, levels, device, repeats, warmup) -> dict:
    """fwd_ms, fwdbwd_ms, peak_mem_mb, bandwidth_gbs, rel_err and sizes of one implementation."""
    with torch.no_grad():
        ref = ops.ms_deform_attn_pytorch(value.double(), ss, starts, loc.double(), attn.double(), levels)
        got = op(value, ss, starts, loc, attn, levels).double()
        rel_err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        del ref, got
    for t in (value, loc, attn):
        t.requires_grad_(True)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device,
                           dtype=value.dtype)

    def clear_grads():
        value.grad = loc.grad = attn.grad = None

    def forward():
        op(value, ss, starts, loc, attn, levels)

    def forward_backward():
        clear_grads()
        op(value, ss, starts, loc, attn, levels).backward(grad_out)

    timer = _timer(device)
    fwd = timer(forward, repeats, warmup)
    fwdbwd = timer(forward_backward, repeats, warmup)

    peak_mb = None
    if device.type == "cuda":
        clear_grads()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward_backward()
        torch.cuda.synchronize(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    clear_grads()

    fwd_ms = statistics.median(fwd)
    out_bytes = grad_out.numel() * value.element_size()  # the output has grad_out's shape and value's dtype
    moved = (value.numel() * value.element_size() + loc.numel() * loc.element_size()
             + attn.numel() * attn.element_size() + out_bytes)
    return {"fwd_ms": round(fwd_ms, 4), "fwdbwd_ms": round(statistics.median(fwdbwd), 4),
            "peak_mem_mb": None if peak_mb is None else round(peak_mb, 2),
            "bandwidth_gbs": round(moved / (fwd_ms * 1e-3) / 1e9, 2),
            "rel_err": rel_err,
            "bs": value.shape[0], "len_in": value.shape[1], "len_q": loc.shape[1], "heads": value.shape[2],
            "channels": value.shape[3], "levels": len(levels), "points": loc.shape[4], "repeats": repeats}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("bench_op: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
    on_gpu = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    impls = IMPLS if args.impl == "all" else (args.impl,)
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    shapes = ["encoder", "decoder300", "decoder1800"] if args.shape == "all" else [args.shape]
    for shape in shapes:
        for dtype in dtypes:
            for impl in impls:
                print(json.dumps(measure(impl, dtype, shape, device, repeats, warmup, args.seed)), flush=True)
                if on_gpu:
                    torch.cuda.empty_cache()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
