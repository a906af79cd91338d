"""Autograd wrapper around the compiled CUDA operator (``ops/src``).

Dtypes. ``value`` may be float32, float16, bfloat16 or float64; the output has value's
dtype. Sampling locations and attention weights are always handed to the kernel in float32
(float64 when value is float64), whatever dtype they arrive in: a bf16 location in [0, 1]
is only good to ~2e-3, i.e. a third of a pixel on a 167-pixel-wide level, so the kernel
never reads them in a half type. Casting a half tensor up is exact, and under autocast
they already arrive in float32 (the model adds fp32 reference points to the offsets, and
softmax autocasts to fp32), so the cast is normally a no-op. Their gradients are returned
in the dtype they arrived in. All arithmetic accumulates in float32 (float64 for float64).

Autocast. ``custom_fwd``/``custom_bwd`` run backward under the same autocast state as the
forward; no input is recast to an autocast dtype, because the op is as fast in the value's
own dtype and the casting policy above already handles mixed inputs.
"""
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._ext import load_extension, load_error

try:  # torch >= 2.4
    from torch.amp import custom_bwd as _custom_bwd, custom_fwd as _custom_fwd

    _fwd_decorator = _custom_fwd(device_type="cuda")
    _bwd_decorator = _custom_bwd(device_type="cuda")
except ImportError:  # pragma: no cover - older torch
    from torch.cuda.amp import custom_bwd as _bwd_decorator, custom_fwd as _fwd_decorator

__all__ = ["MSDeformAttnFunction", "ms_deform_attn_cuda"]


def _coord_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _extension():
    module = load_extension()
    if module is None:
        raise RuntimeError(f"the compiled multi-scale deformable attention op is unavailable: {load_error()}")
    return module


class MSDeformAttnFunction(torch.autograd.Function):
    """Forward/backward through the compiled kernels. Shapes as in ``ms_deform_attn_cuda``."""

    @staticmethod
    @_fwd_decorator
    def forward(ctx, value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
        ext = _extension()
        coord = _coord_dtype(value)
        value_c = value.contiguous()
        shapes_c = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        starts_c = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        loc_c = sampling_locations.to(coord).contiguous()
        attn_c = attention_weights.to(coord).contiguous()
        output = ext.forward(value_c, shapes_c, starts_c, loc_c, attn_c)
        ctx.save_for_backward(value_c, shapes_c, starts_c, loc_c, attn_c)
        ctx.loc_dtype = sampling_locations.dtype
        ctx.attn_dtype = attention_weights.dtype
        return output

    @staticmethod
    @_bwd_decorator
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        value, shapes, starts, loc, attn = ctx.saved_tensors
        need_value = ctx.needs_input_grad[0]
        grad_value, grad_loc, grad_attn = _extension().backward(
            value, shapes, starts, loc, attn, grad_output.to(value.dtype).contiguous(), need_value)
        return (grad_value if need_value else None, None, None,
                grad_loc.to(ctx.loc_dtype) if ctx.needs_input_grad[3] else None,
                grad_attn.to(ctx.attn_dtype) if ctx.needs_input_grad[4] else None)


def ms_deform_attn_cuda(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Compiled deformable attention; raises RuntimeError if the extension is unavailable.

    value (bs, Lin, heads, C) on a CUDA device; spatial_shapes (levels, 2) and
    level_start_index (levels,) integer tensors (moved to value's device if needed);
    sampling_locations (bs, Lq, heads, levels, points, 2); attention_weights
    (bs, Lq, heads, levels, points). Returns (bs, Lq, heads*C) in value's dtype.
    Unlike the PyTorch path it honours ``level_start_index`` as given.
    """
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
