"""The autograd formula shared by the registered MSDA op pairs (compiled CUDA and Triton).

Both register a forward op ``(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights) -> output`` and a backward op taking the same inputs plus
``(grad_output, need_value)`` and returning ``(grad_value, grad_loc, grad_attn)``; the level
tensors get no gradient, and the value gradient (the expensive, atomic part) is only computed
when something asks for it.
"""
from typing import Callable, Optional, Tuple

from torch import Tensor


def msda_autograd(backward_op: Callable) -> Tuple[Callable, Callable]:
    """(setup_context, backward) for ``forward_op.register_autograd`` with ``backward_op``."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        need_value, need_loc, need_attn = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        grad_value, grad_loc, grad_attn = backward_op(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.to(value.dtype).contiguous(), need_value)
        return (grad_value if need_value else None, None, None, grad_loc if need_loc else None,
                grad_attn if need_attn else None)

    return setup_context, backward
