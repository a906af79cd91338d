"""Finding (or building) the compiled CUDA operator.

Two ways to get it, tried in this order on first use:

1. Ahead of time, from the repository root::

       python ops/setup.py build_ext --inplace        # leaves ops/_msda_C*.so
       # or: pip install --no-build-isolation -e ops  (pip must see the installed torch)

   ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (e.g. ``"8.0;9.0"``); by default
   torch builds for the GPUs it can see.

2. Just in time: when no prebuilt module imports, ``torch.utils.cpp_extension.load`` compiles
   ``ops/src`` (needs nvcc and ninja; about a minute) into ``$TORCH_EXTENSIONS_DIR/msda_C``
   (default ``~/.cache/torch_extensions/<python>_<cuda>/msda_C``). Later runs reuse that build
   and only recompile when the sources change; torch's file lock serialises concurrent builds
   from several processes. ``MSDA_JIT=0`` disables this step.

Nothing here runs at import time of ``ops``: loading starts the first time a CUDA tensor
reaches ``ops.ms_deform_attn`` (or when ``ops.cuda_available()`` / ``ops.load_extension()``
is called).
"""
import logging
import os
import threading
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger("ops")

SRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
SOURCES = [os.path.join(SRC_DIR, "msda_binding.cpp"), os.path.join(SRC_DIR, "msda_kernels.cu")]
JIT_NAME = "msda_C"
# Shared with setup.py so both builds behave the same. The C++ standard is left to torch
# (C++17 or C++20 depending on its version). No --use_fast_math: its approximate division
# and flush-to-zero buy nothing here and would blur the fp32 tolerance.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def _import_prebuilt() -> ModuleType:
    from . import _msda_C  # built by ops/setup.py next to this file
    return _msda_C


def _jit_build(verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load
    return load(name=JIT_NAME, sources=SOURCES, extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                extra_include_paths=[SRC_DIR], verbose=verbose)


def load_extension(verbose: bool = False) -> Optional[ModuleType]:
    """The compiled module, loading or building it on the first call; None when unavailable.

    The reason for a failure is kept and returned by ``load_error()``. The result is cached
    for the process, so a failed build is not retried on every call.
    """
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        reasons = []
        try:
            _module = _import_prebuilt()
        except ImportError as exc:
            reasons.append(f"no prebuilt ops._msda_C ({exc})")
        if _module is None:
            if torch.version.cuda is None:
                reasons.append("this torch build has no CUDA support")
            elif os.environ.get("MSDA_JIT", "1") == "0":
                reasons.append("JIT build disabled by MSDA_JIT=0")
            elif not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                # torch infers the target architecture from the visible GPUs; with none it fails obscurely.
                reasons.append("no CUDA device visible to build for (set TORCH_CUDA_ARCH_LIST to build anyway)")
            else:
                try:
                    _module = _jit_build(verbose)
                except Exception as exc:  # compiler missing, build error, ...: report, do not crash
                    reasons.append(f"JIT build failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}")
        _error = None if _module is not None else "; ".join(reasons)
        _tried = True
        return _module


def load_error() -> Optional[str]:
    """Why the compiled operator could not be loaded (None if it loaded or was never tried)."""
    return _error
