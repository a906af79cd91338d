"""The Triton operator registered with ``torch.library``: ``torch.ops.msda.ms_deform_attn_triton``.

    msda::ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights) -> out
    msda::ms_deform_attn_triton_backward(value, spatial_shapes, level_start_index, locations, weights,
                                         grad_out, need_grad_value) -> (grad_value, grad_locations, grad_weights)

Same schema and input contract as the compiled op (``ops/ms_deform_attn_cuda.py``): contiguous
tensors on one device, int64 level tensors, locations and weights float32 (float64 with a
float64 value), output in value's dtype, ``grad_value`` empty (0,) when not requested. The
kernels are in ``ops/triton_kernels.py``; importing this module imports Triton and defines them,
which ``ops`` does only on first use (``ops/_triton.py``).

Registration. With ``torch.library.triton_op`` (torch >= 2.6) the launchers are the op's
implementation on every device and its fake implementation (run on fake tensors, where a
wrapped kernel launch does nothing), and torch.compile can see the kernels through
``wrap_triton``; torch.export keeps one node. Where ``triton_op`` does not exist (torch 2.4 /
2.5), and when the kernels are interpreted (``TRITON_INTERPRET=1``: an interpreted kernel
cannot run on fake tensors, and there is nothing to compile), the launchers are wrapped in
``torch.library.custom_op`` with an explicit fake implementation instead.

Determinism. The value gradient is accumulated with atomic adds, so, like the compiled op, the
backward calls torch's non-deterministic alert when it computes one: it raises under
``torch.use_deterministic_algorithms(True)`` and warns with ``warn_only=True``. The forward and
the location / weight gradients are deterministic.
"""
import warnings
from typing import Tuple

import torch
import triton
from torch import Tensor

from ._autograd import msda_autograd
from .ms_deform_attn_cuda import registered_op_inputs
from .ms_deform_attn_pytorch import check_level_sizes, check_shapes, shapes_as_list
from .triton_kernels import INTERPRETED, msda_backward_kernel, msda_forward_kernel

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6: launch the kernels directly inside custom_op
    def wrap_triton(kernel):
        return kernel

__all__ = ["ms_deform_attn_triton", "OP_NAME", "BACKWARD_OP_NAME", "USES_TRITON_OP", "INTERPRETED"]

OP_NAME = "msda::ms_deform_attn_triton"
BACKWARD_OP_NAME = "msda::ms_deform_attn_triton_backward"
USES_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRETED
DETERMINISM_NAME = "ms_deform_attn_backward_triton"


def _grid(len_q: int, heads: int, bs: int):
    return lambda meta: (triton.cdiv(len_q, meta["BLOCK_Q"]), heads, bs)


def _alert_not_deterministic(caller: str) -> None:
    """torch's alert for kernels without a deterministic implementation (raise, or warn with warn_only)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{caller} does not have a deterministic implementation (atomic adds), but you set "
               "'torch.use_deterministic_algorithms(True)'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


# ---------------------------------------------------------------------------------------------
# Launchers (the ops' implementations)


def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
             attention_weights: Tensor) -> Tensor:
    """value (bs, Lin, heads, C) -> (bs, Lq, heads * C) in value's dtype."""
    bs, len_in, heads, channels = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    out = value.new_empty(bs, len_q, heads * channels)
    if out.numel() > 0:
        wrap_triton(msda_forward_kernel)[_grid(len_q, heads, bs)](
            value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous(), out,
            len_in, len_q, heads, channels,
            LEVELS=levels, POINTS=points, BLOCK_C=triton.next_power_of_2(channels),
            ACC_FP64=value.dtype == torch.float64)
    return out


def _backward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
              attention_weights: Tensor, grad_output: Tensor,
              need_grad_value: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_output (bs, Lq, heads * C) -> grad_value (bs, Lin, heads, C) or (0,), grad_locations, grad_weights.

    The value gradient is summed in a zeroed float32 (float64) buffer and rounded once to
    value's dtype; location and weight gradients come in their inputs' dtype.
    """
    bs, len_in, heads, channels = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if need_grad_value:
        _alert_not_deterministic(DETERMINISM_NAME)
    grad_value = torch.zeros(value.shape if need_grad_value else (0,), dtype=acc_dtype, device=value.device)
    if bs * len_q * heads * channels * levels * points == 0:  # no kernel: the empty sums are zero
        grad_loc, grad_attn = torch.zeros_like(sampling_locations), torch.zeros_like(attention_weights)
    else:
        grad_loc, grad_attn = torch.empty_like(sampling_locations), torch.empty_like(attention_weights)
        wrap_triton(msda_backward_kernel)[_grid(len_q, heads, bs)](
            value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous(), grad_output.contiguous(),
            grad_value, grad_loc, grad_attn,
            len_in, len_q, heads, channels,
            LEVELS=levels, POINTS=points, BLOCK_C=triton.next_power_of_2(channels),
            ACC_FP64=value.dtype == torch.float64, NEED_VALUE=need_grad_value)
    return grad_value.to(value.dtype), grad_loc, grad_attn


def _forward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    bs, _, heads, channels = value.shape
    return value.new_empty(bs, sampling_locations.shape[1], heads * channels)


def _backward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor, grad_output: Tensor,
                   need_grad_value: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grad_value = value.new_empty(value.shape if need_grad_value else (0,))
    return grad_value, torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _register(name: str, launcher, fake):
    """``triton_op`` where it exists and the kernels are compiled, else ``custom_op`` plus ``fake``."""
    if USES_TRITON_OP:
        return torch.library.triton_op(name, launcher, mutates_args=())
    op = torch.library.custom_op(name, launcher, mutates_args=())
    op.register_fake(fake)
    return op


_forward_op = _register(OP_NAME, _forward, _forward_fake)
_backward_op = _register(BACKWARD_OP_NAME, _backward, _backward_fake)


_setup_context, _autograd_backward = msda_autograd(_backward_op)
_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor,
                          spatial_shapes_list=None) -> Tensor:
    """``torch.ops.msda.ms_deform_attn_triton`` after establishing its input contract.

    value (bs, Lin, heads, C); spatial_shapes (levels, 2); level_start_index (levels,);
    sampling_locations (bs, Lq, heads, levels, points, 2); attention_weights (bs, Lq, heads, levels, points).
    Returns (bs, Lq, heads * C) in value's dtype. ``spatial_shapes_list`` ([(H, W), ...]) only
    serves the host-side check that the levels tile ``value`` (no device sync); the kernels read
    the sizes from ``spatial_shapes`` and, like the compiled op, treat tokens past the end of
    ``value`` as zeros.
    """
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if spatial_shapes_list is not None:
        check_level_sizes(value.shape[1], shapes_as_list(spatial_shapes, spatial_shapes_list))
    return _forward_op(*registered_op_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights))
