"""Choosing between the compiled CUDA operator, the Triton operator and the PyTorch path.

Selection, highest priority first:
  1. ``ops.set_impl('auto' | 'cuda' | 'triton' | 'pytorch')`` (``set_impl(None)`` hands control back to 2);
  2. the environment variable ``MSDA_IMPL=auto|cuda|triton|pytorch`` (read at call time);
  3. ``auto``.

``auto`` runs CUDA tensors through the compiled op when it loads (prebuilt or built just in
time, ``ops/_ext.py``), else through the Triton operator when Triton can run (no build step,
``ops/triton_op.py``), else through the PyTorch path; each fallback logs one warning per
process naming the reason. Non-CUDA tensors take the PyTorch path. ``cuda`` and ``triton``
never fall back: an implementation that cannot run raises a one-line RuntimeError naming why
(``triton`` runs CPU tensors only through Triton's interpreter, ``TRITON_INTERPRET=1``: how CI
executes the kernels). ``pytorch`` always uses the PyTorch path. The implementation a device
type runs is logged once per process (logger ``ops``, level INFO).
"""
import contextlib
import logging
import os
from typing import Optional, Sequence, Set

import torch

from ._ext import load_error, load_extension
from ._triton import ms_deform_attn_triton, triton_error
from .ms_deform_attn_cuda import ms_deform_attn_registered
from .ms_deform_attn_pytorch import check_level_sizes, check_shapes, ms_deform_attn_pytorch, shapes_as_list

logger = logging.getLogger("ops")

IMPLS = ("auto", "cuda", "triton", "pytorch")
_forced: Optional[str] = None
_warned_fallback = False
_warned_triton_fallback = False
_announced: Set[str] = set()  # device types whose implementation was logged
_all_through_registered_op = False


def _validate(name: str, source: str) -> str:
    key = name.strip().lower()
    if key not in IMPLS:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(IMPLS)}")
    return key


def set_impl(name: Optional[str]) -> None:
    """Force 'auto', 'cuda', 'triton' or 'pytorch' for this process; None returns to ``MSDA_IMPL``/auto."""
    global _forced
    _forced = None if name is None else _validate(name, "ops.set_impl")


def get_impl() -> str:
    """The requested mode: 'auto', 'cuda', 'triton' or 'pytorch' (setter, else env var, else auto)."""
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
    impl = active_impl(torch.device(device_type))
    if device_type not in _announced:
        _announced.add(device_type)
        logger.info("ops.ms_deform_attn: %s tensors use the '%s' implementation", device_type, impl)
    return impl


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
    """Which implementation a call with inputs on ``device`` would run: 'cuda', 'triton' or 'pytorch'.

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
    if mode == "triton":
        reason = triton_error(device)
        if reason is not None:
            raise RuntimeError(f"MSDA implementation forced to 'triton' but it cannot run on {device}: {reason}")
        return "triton"
    if device.type != "cuda":
        return "pytorch"
    if load_extension() is not None:
        return "cuda"
    triton_reason = triton_error(device)
    if triton_reason is None:
        _warn_triton_fallback_once()
        return "triton"
    _warn_fallback_once(triton_reason)
    return "pytorch"


def check_impl(device) -> None:
    """Start-up check of the implementation asked for (``set_impl``, else ``MSDA_IMPL``) against the
    run's ``device``: ValueError, one line, when the name is unknown or when 'cuda' / 'triton' cannot
    run there -- before a run writes anything, rather than at the first attention call. 'auto' and
    'pytorch' always run (auto falls back with a warning)."""
    source = f"ops.set_impl({_forced!r})" if _forced is not None else f"MSDA_IMPL={os.environ.get('MSDA_IMPL')}"
    mode = get_impl()  # ValueError naming the variable and the valid values
    device = torch.device(device)
    reason = None
    if mode == "cuda":
        if device.type != "cuda":
            reason = f"the compiled CUDA operator runs CUDA tensors only, and the run's device is {device}"
        elif load_extension() is None:
            reason = f"the compiled CUDA operator is unavailable: {load_error()}"
    elif mode == "triton":
        triton_reason = triton_error(device)
        if triton_reason is not None:
            reason = f"the Triton operator cannot run on {device}: {triton_reason}"
    if reason is not None:
        raise ValueError(f"{source}: {reason}; unset MSDA_IMPL, or set it to auto or pytorch")


def _warn_triton_fallback_once() -> None:
    global _warned_triton_fallback
    if not _warned_triton_fallback:
        _warned_triton_fallback = True
        logger.warning("ops.ms_deform_attn: compiled CUDA op unavailable, using the Triton operator "
                       "(build the compiled op with `python ops/setup.py build_ext --inplace`; "
                       "MSDA_IMPL=triton silences this). Reason: %s", load_error())


def _warn_fallback_once(triton_reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        logger.warning("ops.ms_deform_attn: compiled CUDA op and Triton operator unavailable, using the slower "
                       "PyTorch path (build the compiled op with `python ops/setup.py build_ext --inplace`; "
                       "MSDA_IMPL=pytorch silences this). Reason: %s; Triton: %s", load_error(), triton_reason)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Multi-scale deformable attention: compiled op, else Triton on CUDA tensors; PyTorch path otherwise.

    Args:
        value: (bs, Lin, heads, C).
        spatial_shapes: (levels, 2) int64, (H, W) per level.
        level_start_index: (levels,) int64, start of each level in ``Lin``.
        sampling_locations: (bs, Lq, heads, levels, points, 2), normalised (x, y), may leave [0, 1].
        attention_weights: (bs, Lq, heads, levels, points).
        spatial_shapes_list: optional python [(H, W), ...]: lets the PyTorch path split levels
            and every path check that the levels tile ``value`` (Σ H·W = Lin, else ValueError)
            without a device sync. Without it the PyTorch path reads ``spatial_shapes`` (a sync
            on GPUs) and the compiled and Triton ops skip the check: their kernels treat tokens
            past the end of ``value`` as zero padding, so a bad layout cannot read or write out
            of bounds.

    Returns:
        (bs, Lq, heads * C) in value's dtype.
    """
    impl = _impl_for_device_type(value.device.type)
    if impl == "triton":
        return ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights, spatial_shapes_list)
    if impl in ("cuda", "registered"):
        check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        if spatial_shapes_list is not None:
            check_level_sizes(value.shape[1], shapes_as_list(spatial_shapes, spatial_shapes_list))
        return ms_deform_attn_registered(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, spatial_shapes_list)
