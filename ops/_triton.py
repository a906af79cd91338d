"""Finding the Triton operator: Triton installed, a device it can run on, kernels of the right kind.

Nothing here imports Triton when ``ops`` is imported. ``ops/triton_op.py`` (which imports Triton
and defines the kernels) is imported the first time the Triton operator is asked for and can
run, so a test or script can still set ``TRITON_INTERPRET=1`` after ``import ops``: Triton
decides at kernel definition whether a kernel is compiled (CUDA tensors) or interpreted (CPU
tensors, executed in numpy; slow, meant for tests).
"""
import importlib
import importlib.util
import os
import threading
from types import ModuleType
from typing import Optional

import torch

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_import_error: Optional[str] = None
_tried = False


def _import_op() -> Optional[ModuleType]:
    """ops.triton_op, imported (and its kernels defined) once per process; None if that failed."""
    global _module, _import_error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = importlib.import_module("ops.triton_op")
            except Exception as exc:  # a broken or incompatible Triton: report, do not crash
                _import_error = f"importing the Triton operator failed: {type(exc).__name__}: {exc}"
            _tried = True
    return _module


_LATE_INTERPRETER = ("its kernels were defined before TRITON_INTERPRET=1 was set (set it before the first "
                     "use of the Triton operator)")


def triton_error(device) -> Optional[str]:
    """Why the Triton operator cannot run on tensors of ``device``, or None when it can."""
    device = torch.device(device)
    if _module is None and importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cpu":
        if _module is not None and not _module.INTERPRETED:
            return _LATE_INTERPRETER
        if _module is None and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1)"
    elif device.type != "cuda":
        return f"its kernels run on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not {device.type}"
    elif not torch.cuda.is_available():
        return "no CUDA device is visible"
    if _import_op() is None:
        return _import_error
    return None


def triton_available(device) -> bool:
    """True when the Triton operator can run on ``device`` (imports Triton and defines the kernels)."""
    return triton_error(device) is None


def ms_deform_attn_triton(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                          spatial_shapes_list=None) -> torch.Tensor:
    """The Triton operator only; RuntimeError naming the reason when it cannot run on value's device.

    value (bs, Lin, heads, C), sampling_locations (bs, Lq, heads, levels, points, 2),
    attention_weights (bs, Lq, heads, levels, points) -> (bs, Lq, heads * C) in value's dtype.
    See ``ops/triton_op.py``.
    """
    module = _module
    if module is None or (value.device.type == "cpu" and not module.INTERPRETED):
        reason = triton_error(value.device)
        if reason is not None:
            raise RuntimeError(f"the Triton deformable attention op cannot run on {value.device}: {reason}")
        module = _module
    return module.ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, spatial_shapes_list)
