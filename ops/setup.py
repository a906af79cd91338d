"""Ahead-of-time build of the multi-scale deformable attention CUDA op.

From the repository root:

    python ops/setup.py build_ext --inplace          # writes ops/_msda_C.<abi>.so
    pip install --no-build-isolation -e ops           # same, as an editable install

``--no-build-isolation`` lets the build see the torch that is already installed (the
extension must be compiled against the torch it will run with). Needs nvcc (``CUDA_HOME``
or nvcc on PATH) and a CUDA build of torch; ninja makes it faster. ``TORCH_CUDA_ARCH_LIST``
picks the architectures, e.g. ``TORCH_CUDA_ARCH_LIST="8.0;9.0"``; without it torch builds for
the visible GPUs (and needs ``TORCH_CUDA_ARCH_LIST`` when none is visible). Without this step
the op is compiled just in time on first use (see ops/_ext.py).
"""
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    # Relative paths and --inplace are resolved against the working directory; anchor both here
    # so the module lands next to ops/__init__.py wherever the command is run from.
    os.chdir(HERE)
    sys.path.insert(0, HERE)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    from _ext import CXX_FLAGS, NVCC_FLAGS  # noqa: E402  (ops/_ext.py, imported standalone)

    setup(
        name="msda-ops",
        version="1.0.0",
        description="Multi-scale deformable attention CUDA operator",
        py_modules=[],
        ext_modules=[
            CUDAExtension(
                name="_msda_C",
                sources=["src/msda_binding.cpp", "src/msda_kernels.cu"],
                include_dirs=[os.path.join(HERE, "src")],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        ],
        cmdclass={"build_ext": BuildExtension},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
