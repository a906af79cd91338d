"""Running code on a fake ``cuda`` device (no GPU needed) and saying where it went wrong.

Under ``FakeTensorMode`` every op runs on metadata only (shape, dtype, device), so CUDA tensors
can be made on a machine without a GPU. The mode enforces what a real GPU run would:

  * an op mixing a CUDA tensor with a CPU tensor (one created without ``device=``, or moved to
    the host) raises ``FakeTensorDeviceMismatchError`` (0-dim CPU tensors may mix, as on a GPU);
  * reading device data on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``,
    boolean-mask indexing) raises ``DataDependentOutputException`` /
    ``DynamicOutputShapeException``: on a GPU each is a host synchronisation;
  * a real (non-fake) tensor reaching an op, e.g. one kept as a plain module attribute that
    ``model.to('cuda')`` would not move, is refused.

``located_failures`` turns any such error into a one-paragraph test failure naming the project
file and line where it happened, with the project's call chain above it.
"""
import dataclasses
import os
import traceback
from contextlib import contextmanager
from typing import Dict, Iterator, List

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PACKAGES = ("models", "ops", "util", "datasets")
DEVICE = "cuda"
# what each of FakeTensorMode's errors means on a real GPU
MEANING = {
    "FakeTensorDeviceMismatchError": "an op mixes CUDA and CPU tensors",
    "DataDependentOutputException": "device data read on the host (.item(), bool(t), .tolist()): a host sync",
    "DynamicOutputShapeException": "an output shape depends on device data (nonzero, boolean mask): a host sync",
}


def fake_like(tensor: torch.Tensor, device: str = DEVICE) -> torch.Tensor:
    """A tensor with ``tensor``'s shape, strides, dtype and requires_grad on ``device``.

    Call inside a FakeTensorMode: the result is then fake (no memory, no values), which is all
    a device check needs.
    """
    fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
    return fake.requires_grad_(tensor.requires_grad)


def fake_state(module: nn.Module, device: str = DEVICE) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` as a fake tensor on ``device``, for
    ``torch.func.functional_call`` (the module itself keeps its real CPU tensors)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name: fake_like(tensor, device) for name, tensor in named}


def tensors_in(obj) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists, tuples and dataclasses (model outputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name))


def project_frames(exc: BaseException) -> List[str]:
    """The traceback frames of ``exc`` (and the exceptions it was raised from) that lie in the
    project's packages, outermost first, each as 'path:line in function: source'."""
    frames = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame in traceback.extract_tb(exc.__traceback__):
            path = os.path.relpath(os.path.abspath(frame.filename), ROOT)
            if path.split(os.sep)[0] in PROJECT_PACKAGES:
                frames.append(f"{path}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}")
        exc = exc.__cause__ or exc.__context__
    return frames


def describe_failure(exc: BaseException, what: str) -> str:
    """One paragraph: the error, what it means on a GPU, the project line it happened at and the
    project's call chain above it."""
    frames = project_frames(exc)
    where = frames[-1] if frames else "(no frame in models/, ops/, util/, datasets/)"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    meaning = MEANING.get(type(exc).__name__)
    message = f"{message} ({meaning})" if meaning else message
    chain = "".join(f"\n    {frame}" for frame in frames[:-1])
    return (f"{what}: {type(exc).__name__}: {message}\n  at {where}"
            + (f"\n  called from (outermost first):{chain}" if chain else ""))


@contextmanager
def located_failures(what: str):
    """Fail the test with the project file and line of any error raised inside the block."""
    try:
        yield
    except Exception as exc:  # every error here is a finding; say where it happened
        # "from None": the report replaces torch's traceback, which would end inside FakeTensorMode
        raise pytest.fail.Exception(describe_failure(exc, what), pytrace=False) from None


def assert_all_on(obj, device: str = DEVICE, what: str = "output") -> None:
    """Every tensor in ``obj`` lives on ``device`` (a CPU tensor in an output is a device bug too)."""
    wrong = [tuple(t.shape) for t in tensors_in(obj) if t.device.type != device]
    assert not wrong, f"{what}: tensors of shapes {wrong} are not on {device}"
