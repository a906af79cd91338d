"""The detector and the registered operator on a fake CUDA device (``tests/fake_cuda.py``).

Device bugs (a tensor created without ``device=``, an op that moves data to the host, a
data-dependent host sync) would otherwise only show on a user's first GPU step. Every variant
of ``configs/variants.yaml`` x one-to-many form x denoising runs its forward in train and eval
mode with fake CUDA parameters and inputs, and the postprocessor on the eval outputs. Any such
bug fails the test with the project file and line where it happened.

The deformable attention runs two ways, as on a GPU: ``MSDA_IMPL=pytorch`` (the PyTorch path,
what a GPU without the compiled op runs) and the compiled-op route (``torch.ops.msda.*``, whose
fake implementations stand in for the kernels). Neither may try to load or build the compiled
op here. The full matrix (62 combinations, 2-6 s each on 2 busy cores) is slow-marked; a subset
covering each guidance mode, each form and denoising on and off runs always.
"""
import importlib
import linecache
import os
import re

import pytest
import torch
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

import ops.dispatch as dispatch
from models import build_model, sparse_rows
from models.enc_reference import GuidanceState
from models.guidance import guidance_inputs, top_per_token
from ops import ms_deform_attn_registered
from ops.ms_deform_attn_cuda import _backward_op, _forward_op
from tests.fake_cuda import ROOT, assert_all_on, fake_like, fake_state, located_failures
from tests.helpers import simple_targets, tiny_args, two_padded_images
from tests.test_ops import make_inputs

# the module, not the function of the same name that ``ops`` exports
msda_cuda = importlib.import_module("ops.ms_deform_attn_cuda")
with open(os.path.join(ROOT, "configs", "variants.yaml")) as f:
    VARIANTS = sorted(yaml.safe_load(f))
FORMS = {
    # one-to-one only: two-stage proposals, no refinement (the fixed-reference decoder path)
    "stock": ["--two_stage"],
    # MS-DETR: learned queries with box refinement, a one-to-many prediction per query
    "mixed": ["--with_box_refine", "--look_forward_twice", "--use_ms_detr"],
    # H-DETR: two-stage, mixed selection, refinement, an extra one-to-many query group
    "hybrid": ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
               "--num_queries_one2many", "24", "--k_one2many", "2"],
}
DENOISING = {"dn_off": [], "dn_on": ["--use_dn", "--dn_number", "8"]}
# always run: each guidance mode (none, per_level, per_point, o2o, keep_self with upstream eval),
# each form, denoising on and off
# and the controls whose guidance reads the forward's ``guidance`` argument (the ground truth, the seed)
FAST = {("baseline", "stock", "dn_on"), ("v3.0.1", "hybrid", "dn_on"), ("v3.0.2", "mixed", "dn_on"),
        ("v3.0.3", "mixed", "dn_off"), ("v3.0.4_upstream_eval", "hybrid", "dn_off"),
        ("v3.0.4_gt", "mixed", "dn_on"), ("v3.0.4_random", "hybrid", "dn_off")}


def matrix():
    """(variant, form, denoising) for every valid combination; the non-FAST ones marked slow."""
    cases = []
    for variant in VARIANTS:
        for form in FORMS:
            if variant.endswith("_upstream_eval") and form == "stock":
                continue  # dropping one-to-many candidates at inference needs a one-to-many form
            for dn in DENOISING:
                marks = () if (variant, form, dn) in FAST else (pytest.mark.slow,)
                cases.append(pytest.param(variant, form, dn, marks=marks, id=f"{variant}-{form}-{dn}"))
    return cases


@pytest.fixture
def no_compiled_op(monkeypatch):
    """Loading (or JIT-building) the compiled op fails the test: fake tensors never need it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled MSDA op was loaded for fake CUDA tensors")
    monkeypatch.setattr(dispatch, "load_extension", refuse)
    monkeypatch.setattr(msda_cuda, "load_extension", refuse)


@pytest.fixture
def pytorch_path(monkeypatch, no_compiled_op):
    monkeypatch.setenv("MSDA_IMPL", "pytorch")


@pytest.fixture
def compiled_op_route(monkeypatch, no_compiled_op):
    """CUDA inputs take the registered-op route, as on a GPU where the compiled op is built."""
    monkeypatch.setattr(dispatch, "_impl_for_device_type",
                        lambda device_type: "cuda" if device_type == "cuda" else "pytorch")
    return monkeypatch


def model_for(*flags):
    torch.manual_seed(0)
    return build_model(tiny_args(*flags))


def check_detector_on_fake_cuda(model, postprocessors, what: str, settings=None) -> None:
    """Train-mode forward (with targets for denoising), eval-mode forward under no_grad and the
    postprocessor, all on fake CUDA tensors. ``settings`` (the parsed flags) gives the forward the
    ``guidance`` argument its guidance reads (the fake ground truth, a seed), as the engine does.

    No backward: autograd's engine asks the CUDA runtime about the device of every fake CUDA
    gradient, which a torch build without CUDA cannot answer. The operator's backward is checked
    below on its own.
    """
    with FakeTensorMode(), located_failures(what):
        state = fake_state(model)
        images = [fake_like(image) for image in two_padded_images()]
        targets = [{key: fake_like(value) for key, value in target.items()} for target in simple_targets()]
        guidance = guidance_inputs(settings, targets, (0, 1, 2))
        model.train()
        train_outputs = functional_call(model, state, (images, targets), {"guidance": guidance})
        model.eval()
        with torch.no_grad():
            eval_outputs = functional_call(model, state, (images,), {"guidance": guidance})
            target_sizes = torch.tensor([list(image.shape[-2:]) for image in images], device="cuda")
            detections = postprocessors["bbox"](eval_outputs, target_sizes)
    assert_all_on(train_outputs, what=f"{what}, train outputs")
    assert_all_on(eval_outputs, what=f"{what}, eval outputs")
    assert_all_on(detections, what=f"{what}, detections")
    assert len(detections) == 2 and detections[0]["boxes"].shape[-1] == 4


@pytest.fixture
def host_random_generator(monkeypatch):
    """A CUDA ``torch.Generator`` asks the CUDA driver for its state, which this machine lacks: the
    random ranking draws from a CPU generator here (under fake tensors the draw's device is checked,
    not its values); the GPU check (scripts/gpu_check.sh) runs the real one."""
    def generator(state):
        if state._random is None:
            state._random = torch.Generator().manual_seed(state.inputs.seed)
        return state._random
    monkeypatch.setattr(GuidanceState, "random_generator", generator)


@pytest.mark.parametrize("variant,form,dn", matrix())
def test_detector_on_fake_cuda(variant, form, dn, pytorch_path, host_random_generator):
    flags = ("--variant", variant, *FORMS[form], *DENOISING[dn])
    model, _, postprocessors = model_for(*flags)
    check_detector_on_fake_cuda(model, postprocessors, f"{variant} {form} {dn}", tiny_args(*flags))


@pytest.mark.parametrize("flags", [
    ["--variant", "v3.0.2", *FORMS["mixed"], "--use_dn", "--dn_number", "8"],
    ["--variant", "v3.0.4", *FORMS["hybrid"], "--attn_map_accum", "max", "--ref_rank", "attn_cls", "--ref_grad"],
], ids=["v3.0.2-mixed-dn", "v3.0.4-hybrid-accum_max-attn_cls-ref_grad"])
def test_detector_through_registered_op_on_fake_cuda(flags, compiled_op_route):
    """The compiled-op route: every attention call is torch.ops.msda (its fake kernels)."""
    model, _, postprocessors = model_for(*flags)
    calls = []

    def counted(*args):
        calls.append(args[0].device.type)
        return ms_deform_attn_registered(*args)

    compiled_op_route.setattr(dispatch, "ms_deform_attn_registered", counted)
    check_detector_on_fake_cuda(model, postprocessors, " ".join(flags))
    # 2 encoder + 2 decoder layers, train and eval forward
    assert calls == ["cuda"] * 8


@pytest.mark.parametrize("flags", [
    pytest.param(["--variant", "v3.0.2", *FORMS["hybrid"], "--attn_map_accum", "sum", "--ref_grad"],
                 marks=pytest.mark.slow),
    ["--variant", "cascade", *FORMS["mixed"], "--enc_ref_progressive"],
], ids=["v3.0.2-hybrid-accum_sum-ref_grad", "cascade-mixed-progressive"])
def test_research_options_on_fake_cuda(flags, pytorch_path):
    model, _, postprocessors = model_for(*flags)
    check_detector_on_fake_cuda(model, postprocessors, " ".join(flags))


# ----------------------------------------------------------------------------------------------
# The registered ops' fake implementations on fake CUDA inputs


class SavedInputs:
    """The part of an autograd context the op's backward formula reads."""

    def __init__(self, inputs, needs_input_grad):
        self.saved_tensors = inputs
        self.needs_input_grad = needs_input_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_registered_ops_on_fake_cuda(dtype, no_compiled_op):
    """torch.ops.msda.* and the autograd formula on fake CUDA tensors: outputs and gradients on CUDA
    with the contract's shapes and dtypes; integer level tensors given on the CPU are moved, as on a GPU.

    The backward formula is called directly (see ``check_detector_on_fake_cuda`` for why not
    through autograd's engine).
    """
    value, shapes, starts, locations, weights = make_inputs(2, 5, 2, 4, [(6, 8), (3, 4)], 3, dtype=torch.float32)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    with FakeTensorMode(), located_failures(f"msda {dtype}"):
        value = fake_like(value).to(dtype)
        out = ms_deform_attn_registered(value, fake_like(shapes, "cpu"), fake_like(starts, "cpu"),
                                        fake_like(locations).to(dtype), fake_like(weights))
        assert out.device.type == "cuda" and out.dtype == dtype and tuple(out.shape) == (2, 5, 8)

        inputs = (value, fake_like(shapes), fake_like(starts), fake_like(locations).to(coord),
                  fake_like(weights).to(coord))
        direct = _forward_op(*inputs)
        assert direct.device.type == "cuda" and direct.dtype == dtype and tuple(direct.shape) == (2, 5, 8)
        grad_out = torch.empty(2, 5, 8, dtype=dtype, device="cuda")
        for need_value in (True, False):
            ctx = SavedInputs(inputs, (need_value, False, False, True, True))
            grads = msda_cuda._backward(ctx, grad_out)
            assert grads[1] is None and grads[2] is None and (grads[0] is None) == (not need_value)
            for grad, given in zip(grads, inputs):
                if grad is not None:
                    assert grad.device.type == "cuda" and grad.dtype == given.dtype and grad.shape == given.shape
            grad_value, _, _ = _backward_op(*inputs, grad_out, need_value)
            assert grad_value.device.type == "cuda"
            assert tuple(grad_value.shape) == (tuple(value.shape) if need_value else (0,))


# ----------------------------------------------------------------------------------------------
# The check itself finds device bugs and says where


class ArangeWithoutDevice:
    """``torch`` as seen by a module whose ``torch.arange`` calls lost their ``device=``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def arange(*args, device=None, **kwargs):
        return torch.arange(*args, **kwargs)


# the per-token ranking and the map's row merge (models/sparse_rows.py) build tensors with torch.arange
@pytest.mark.parametrize("module", [top_per_token, sparse_rows], ids=["top_per_token", "sparse_rows"])
def test_a_tensor_made_on_the_cpu_fails_with_its_file_and_line(module, monkeypatch, pytorch_path):
    monkeypatch.setattr(module, "torch", ArangeWithoutDevice())
    model, _, postprocessors = model_for("--variant", "v3.0.2", *FORMS["mixed"])
    with pytest.raises(pytest.fail.Exception) as failure:
        check_detector_on_fake_cuda(model, postprocessors, "v3.0.2 mixed")
    report = str(failure.value)
    path = os.path.relpath(module.__file__, ROOT)
    found = re.search(rf"\n  at {re.escape(path)}:(\d+) in \w+: (.*)", report)
    assert "FakeTensorDeviceMismatchError" in report and found, report
    # the reported line is the one in the file (the op that met the CPU tensor)
    assert linecache.getline(module.__file__, int(found.group(1))).strip() == found.group(2)


def test_a_host_sync_is_named_as_one():
    with pytest.raises(pytest.fail.Exception) as failure:
        with FakeTensorMode(), located_failures("sync"):
            bool(torch.empty(3, device="cuda").sum() > 0)
    assert "DataDependentOutputException" in str(failure.value) and "host sync" in str(failure.value)
