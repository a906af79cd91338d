"""Choosing between the compiled CUDA operator and the PyTorch path.

Selection, highest priority first:
  1. ``ops.set_impl('auto' | 'cuda' | 'pytorch')`` (``set_impl(None)`` hands control back to 2);
  2. the environment variable ``MSDA_IMPL=auto|cuda|pytorch`` (read at call time);
  3. ``auto``.

``auto`` runs CUDA tensors through the compiled op when it loads and everything else through
the PyTorch path; when the compiled op is missing for CUDA tensors it logs one warning per
process and falls back. ``cuda`` never falls back: unavailable op or non-CUDA inputs raise.
``pytorch`` always uses the PyTorch path.
"""
import contextlib
import logging
import os
from typing import Optional, Sequence

import torch

from ._ext import load_error, load_extension
from .ms_deform_attn_cuda import ms_deform_attn_registered
from .ms_deform_attn_pytorch import check_level_sizes, check_shapes, ms_deform_attn_pytorch, shapes_as_list

logger = logging.getLogger("ops")

IMPLS = ("auto", "cuda", "pytorch")
_forced: Optional[str] = None
_warned_fallback = False
_all_through_registered_op = False


def _validate(name: str, source: str) -> str:
    key = name.strip().lower()
    if key not in IMPLS:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(IMPLS)}")
    return key


def set_impl(name: Optional[str]) -> None:
    """Force 'auto', 'cuda' or 'pytorch' for this process; None returns to ``MSDA_IMPL``/auto."""
    global _forced
    _forced = None if name is None else _validate(name, "ops.set_impl")


def get_impl() -> str:
    """The requested mode: 'auto', 'cuda' or 'pytorch' (setter, else env var, else auto)."""
    if _forced is not None:
        return _forced
    env = os.environ.get("MSDA_IMPL")
    return _validate(env, "MSDA_IMPL") if env else "auto"


def cuda_available() -> bool:
    """True when a CUDA device is visible and the compiled op loads (may build it, see ops._ext)."""
    return torch.cuda.is_available() and load_extension() is not None


@torch.compiler.assume_constant_result
def _impl_for_device_type(device_type: str) -> str:
    """active_impl for a device type, evaluated once per compiled graph.

    torch.compile runs this eagerly while tracing and bakes the answer into the graph (the
    extension loader's lock and file system probing cannot be traced), so the choice is made
    when a model is compiled; change it with set_impl / MSDA_IMPL before compiling.
    'registered' inside ``through_registered_op``.
    """
    if _all_through_registered_op:
        return "registered"
    return active_impl(torch.device(device_type))


@contextlib.contextmanager
def through_registered_op():
    """Within the block, inputs on every device go through ``torch.ops.msda.ms_deform_attn`` (whose
    kernel off CUDA is the PyTorch path), so that ``torch.export`` on the CPU records the attention
    as one operator node, as it does on CUDA. Outputs are those of the PyTorch path."""
    global _all_through_registered_op
    before, _all_through_registered_op = _all_through_registered_op, True
    try:
        yield
    finally:
        _all_through_registered_op = before


def active_impl(device: Optional[torch.device] = None) -> str:
    """Which implementation a call with inputs on ``device`` would run: 'cuda' or 'pytorch'.

    ``device`` defaults to the current CUDA device when one exists, else CPU.
    Raises like the call itself would when 'cuda' is forced but unusable.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    mode = get_impl()
    if mode == "pytorch":
        return "pytorch"
    if mode == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"MSDA implementation forced to 'cuda' but the inputs are on {device}")
        if load_extension() is None:
            raise RuntimeError("MSDA implementation forced to 'cuda' but the compiled op is unavailable: "
                               f"{load_error()}")
        return "cuda"
    if device.type == "cuda" and load_extension() is not None:
        return "cuda"
    if device.type == "cuda":
        _warn_fallback_once()
    return "pytorch"


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        logger.warning("ops.ms_deform_attn: compiled CUDA op unavailable, using the slower PyTorch path "
                       "(build it with `python ops/setup.py build_ext --inplace`; MSDA_IMPL=pytorch "
                       "silences this). Reason: %s", load_error())


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Multi-scale deformable attention, compiled on CUDA when possible.

    Args:
        value: (bs, Lin, heads, C).
        spatial_shapes: (levels, 2) int64, (H, W) per level.
        level_start_index: (levels,) int64, start of each level in ``Lin``.
        sampling_locations: (bs, Lq, heads, levels, points, 2), normalised (x, y), may leave [0, 1].
        attention_weights: (bs, Lq, heads, levels, points).
        spatial_shapes_list: optional python [(H, W), ...]: lets the PyTorch path split levels
            and both paths check that the levels tile ``value`` (Σ H·W = Lin, else ValueError)
            without a device sync. Without it the PyTorch path reads ``spatial_shapes`` (a sync
            on GPUs) and the compiled op skips the check: its kernels treat tokens past the end
            of ``value`` as zero padding, so a bad layout cannot read or write out of bounds.

    Returns:
        (bs, Lq, heads * C) in value's dtype.
    """
    if _impl_for_device_type(value.device.type) in ("cuda", "registered"):
        check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        if spatial_shapes_list is not None:
            check_level_sizes(value.shape[1], shapes_as_list(spatial_shapes, spatial_shapes_list))
        return ms_deform_attn_registered(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, spatial_shapes_list)
