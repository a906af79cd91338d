"""The operator registered with ``torch.library``: ``torch.ops.msda.ms_deform_attn``.

Two custom operators, so that ``torch.compile`` and ``torch.export`` see the sampling as one
opaque node with a known output shape instead of a Python call they cannot trace:

    msda::ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights) -> out
    msda::ms_deform_attn_backward(value, spatial_shapes, level_start_index, locations, weights,
                                  grad_out, need_grad_value) -> (grad_value, grad_locations, grad_weights)

Kernels: CUDA tensors run the compiled kernels (``ops/src``, loaded or built on first use);
every other device runs the PyTorch path (``ms_deform_attn_pytorch`` and its explicit
backward), which is also what ``torch.library.opcheck`` checks the registrations against on
CPU. Each op has a fake (meta) implementation giving the output's shape, dtype and strides
from metadata alone, and the forward has an autograd registration whose backward calls the
backward op. The backward is not itself differentiable (no double backward).

Contract of the registered ops (``ms_deform_attn_registered`` below establishes it): all
tensors contiguous and on one device; spatial_shapes / level_start_index int64; sampling
locations and attention weights float32 (float64 when value is float64). ``grad_value`` is an
empty (0,) tensor when ``need_grad_value`` is false, because an operator cannot return None.

Dtypes. ``value`` may be float32, float16, bfloat16 or float64; the output has value's dtype.
Locations and weights are handed to the op in float32 whatever dtype they arrive in: a bf16
location in [0, 1] is only good to ~2e-3, i.e. a third of a pixel on a 167-pixel-wide level,
so the kernel never reads them in a half type. Casting a half tensor up is exact, and under
autocast they already arrive in float32 (the model adds fp32 reference points to the offsets,
and softmax autocasts to fp32), so the cast is normally a no-op. The cast is an ordinary
autograd op, so their gradients come back in the dtype they arrived in. All arithmetic
accumulates in float32 (float64 for float64).

Autocast. The ops have no autocast rule: under autocast they receive the dtypes they are
given (no recast), because the kernel is as fast in the value's own dtype and the casting
policy above already handles mixed inputs.

Determinism. The CUDA backward scatters the value gradient with atomicAdd, so its last bits
depend on thread order; the binding calls torch's non-deterministic alert, so under
``torch.use_deterministic_algorithms(True)`` it raises (or warns with ``warn_only=True``),
like torch's own atomic kernels. The forward and the location / weight gradients are
deterministic. The CPU path is deterministic.
"""
from typing import Tuple

import torch
from torch import Tensor

from ._autograd import msda_autograd
from ._ext import load_error, load_extension
from .ms_deform_attn_pytorch import check_shapes, ms_deform_attn_pytorch, ms_deform_attn_pytorch_backward

__all__ = ["ms_deform_attn_registered", "ms_deform_attn_cuda", "registered_op_inputs", "OP_NAME", "BACKWARD_OP_NAME"]

OP_NAME = "msda::ms_deform_attn"
BACKWARD_OP_NAME = "msda::ms_deform_attn_backward"


def _coord_dtype(value: Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _extension():
    module = load_extension()
    if module is None:
        raise RuntimeError(f"the compiled multi-scale deformable attention op is unavailable: {load_error()}")
    return module


# ---------------------------------------------------------------------------------------------
# Forward op


@torch.library.custom_op(OP_NAME, mutates_args=())
def _forward_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    """Every device but CUDA: the PyTorch path. value (bs, Lin, heads, C) -> (bs, Lq, heads * C)."""
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_forward_op.register_kernel("cuda")
def _forward_cuda(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    return _extension().forward(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                                sampling_locations.contiguous(), attention_weights.contiguous())


@_forward_op.register_fake
def _forward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    bs, _, heads, channels = value.shape
    return value.new_empty(bs, sampling_locations.shape[1], heads * channels)


# ---------------------------------------------------------------------------------------------
# Backward op


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _backward_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor, grad_output: Tensor,
                 need_grad_value: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Every device but CUDA: grid_sample's backward, level by level (see ms_deform_attn_pytorch_backward)."""
    grad_value, grad_loc, grad_attn = ms_deform_attn_pytorch_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
        need_grad_value)
    return (grad_value if grad_value is not None else value.new_empty(0)), grad_loc, grad_attn


@_backward_op.register_kernel("cuda")
def _backward_cuda(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor, grad_output: Tensor,
                   need_grad_value: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grad_value, grad_loc, grad_attn = _extension().backward(
        value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.contiguous(), attention_weights.contiguous(), grad_output.contiguous(), need_grad_value)
    return (grad_value if grad_value is not None else value.new_empty(0)), grad_loc, grad_attn


@_backward_op.register_fake
def _backward_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor, grad_output: Tensor,
                   need_grad_value: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grad_value = value.new_empty(value.shape) if need_grad_value else value.new_empty(0)
    return (grad_value, sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


# ---------------------------------------------------------------------------------------------
# Autograd


_setup_context, _backward = msda_autograd(_backward_op)
_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Callers


def registered_op_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                         sampling_locations: Tensor, attention_weights: Tensor) -> Tuple[Tensor, ...]:
    """The five inputs in the registered ops' contract (shared with the Triton op, ``ops/triton_op.py``).

    All contiguous on value's device; the level tensors int64; locations (bs, Lq, heads, levels, points, 2)
    and weights (bs, Lq, heads, levels, points) float32, or float64 when value is float64.
    """
    coord = _coord_dtype(value)
    return (value.contiguous(),
            spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous(),
            level_start_index.to(device=value.device, dtype=torch.int64).contiguous(),
            sampling_locations.to(coord).contiguous(), attention_weights.to(coord).contiguous())


def ms_deform_attn_registered(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                              sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """``torch.ops.msda.ms_deform_attn`` on any device, after establishing its input contract.

    value (bs, Lin, heads, C); spatial_shapes (levels, 2) and level_start_index (levels,) integer
    tensors (moved to value's device as int64); sampling_locations (bs, Lq, heads, levels, points, 2);
    attention_weights (bs, Lq, heads, levels, points), any float dtype. Returns (bs, Lq, heads*C)
    in value's dtype. Compiled kernels on CUDA, the PyTorch path elsewhere.
    """
    return _forward_op(*registered_op_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights))


def ms_deform_attn_cuda(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                        sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The compiled kernels only: raises RuntimeError for non-CUDA ``value`` or when the op is unavailable.

    Shapes as in ``ms_deform_attn_registered``. Unlike the PyTorch path the kernels honour
    ``level_start_index`` as given; tokens past the end of ``value`` read as zeros.
    """
    if value.device.type != "cuda":
        raise RuntimeError(f"ms_deform_attn_cuda: value must be a CUDA tensor, got one on {value.device}")
    return ms_deform_attn_registered(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)
