"""Multi-scale deformable attention (MSDA) operator.

Public API:
    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, spatial_shapes_list=None) -> (bs, Lq, heads*C)
        CUDA tensors: the compiled CUDA op when available, else the Triton operator, else the
        PyTorch path; other tensors: the PyTorch path (see ops/dispatch.py).
    ms_deform_attn_pytorch(...)   same signature, grid_sample based, always available.
    ms_deform_attn_cuda(...)      the compiled op only (no spatial_shapes_list).
    ms_deform_attn_triton(...)    the Triton operator only, torch.ops.msda.ms_deform_attn_triton
                                  (ops/triton_op.py, kernels in ops/triton_kernels.py); CPU
                                  tensors need TRITON_INTERPRET=1. Triton is imported on first use.
    ms_deform_attn_registered(...)  torch.ops.msda.ms_deform_attn, the op registered with
                                  torch.library (compiled kernels on CUDA, PyTorch path elsewhere);
                                  what the dispatcher calls on CUDA, so torch.compile / torch.export
                                  see one node.
    set_impl / get_impl / active_impl / check_impl (start-up check of MSDA_IMPL against a device) /
    cuda_available / triton_available / triton_error /
    load_extension / load_error.
    through_registered_op()       context: every device through torch.ops.msda (torch.export on CPU).

Environment: MSDA_IMPL=auto|cuda|triton|pytorch forces a path; MSDA_JIT=0 disables the
just-in-time build. Building the CUDA op: see ``ops/_ext.py``.
"""
from ._ext import load_error, load_extension
from ._triton import ms_deform_attn_triton, triton_available, triton_error
from .dispatch import (active_impl, check_impl, cuda_available, get_impl, ms_deform_attn, set_impl,
                       through_registered_op)
from .ms_deform_attn_cuda import ms_deform_attn_cuda, ms_deform_attn_registered
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = [
    "ms_deform_attn", "ms_deform_attn_pytorch", "ms_deform_attn_cuda", "ms_deform_attn_registered",
    "ms_deform_attn_triton", "set_impl", "get_impl", "active_impl", "check_impl", "cuda_available", "triton_available",
    "triton_error", "load_extension", "load_error", "through_registered_op",
]
