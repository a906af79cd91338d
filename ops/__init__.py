"""Multi-scale deformable attention (MSDA) operator.

Public API:
    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, spatial_shapes_list=None) -> (bs, Lq, heads*C)
        compiled CUDA op for CUDA tensors when available, PyTorch path otherwise.
    ms_deform_attn_pytorch(...)   same signature, grid_sample based, always available.
    ms_deform_attn_cuda(...)      the compiled op only (no spatial_shapes_list).
    ms_deform_attn_registered(...)  torch.ops.msda.ms_deform_attn, the op registered with
                                  torch.library (compiled kernels on CUDA, PyTorch path elsewhere);
                                  what the dispatcher calls on CUDA, so torch.compile / torch.export
                                  see one node.
    set_impl / get_impl / active_impl / cuda_available / load_extension / load_error.
    through_registered_op()       context: every device through torch.ops.msda (torch.export on CPU).

Environment: MSDA_IMPL=auto|cuda|pytorch forces a path; MSDA_JIT=0 disables the
just-in-time build. Building the CUDA op: see ``ops/_ext.py``.
"""
from ._ext import load_error, load_extension
from .dispatch import active_impl, cuda_available, get_impl, ms_deform_attn, set_impl, through_registered_op
from .ms_deform_attn_cuda import ms_deform_attn_cuda, ms_deform_attn_registered
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = [
    "ms_deform_attn", "ms_deform_attn_pytorch", "ms_deform_attn_cuda", "ms_deform_attn_registered",
    "set_impl", "get_impl", "active_impl", "cuda_available", "load_extension", "load_error", "through_registered_op",
]
