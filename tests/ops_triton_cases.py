"""The Triton operator's kernels executed on CPU by Triton's interpreter (collected by test_ops_triton.py).

These tests need ``TRITON_INTERPRET=1`` in the environment before the kernels are defined;
``tests/test_ops_triton.py`` runs them in a fresh process with it set (or directly when it is
already set). The interpreter executes every program in numpy, about 0.1 s per program on a
busy CPU, so shapes stay tiny; its BLOCK_Q is 4 (one autotuning config), so Lq = 7 or 9 already
covers full and partial query blocks.

Reference: the float64 loop of tests/test_ops.py (``reference``) on the very same (already
rounded) inputs, differentiated by autograd for the three gradients; errors are measured as
max |got - ref| / max |ref| per tensor (``rel_err`` of test_ops_cuda.py).
"""
import logging
import os
import subprocess
import sys

import pytest
import torch

import ops
import ops._triton as triton_loader
import ops.dispatch as dispatch
from tests.test_ops import make_inputs, reference
from tests.test_ops_cuda import TOLERANCES, rel_err, run_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT64_TOLERANCE = 1e-12


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_ops_triton.py"
    assert ops.triton_error("cpu") is None, ops.triton_error("cpu")
    from ops import triton_op
    assert triton_op.INTERPRETED


def triton_fn(value, shapes, starts, loc, attn, **kw):
    return ops.ms_deform_attn_triton(value, shapes, starts, loc, attn, **kw)


def reference_fn(value, shapes, starts, loc, attn, **kw):
    return reference(value, shapes, starts, loc, attn)


def compare(value, shapes, starts, loc, attn, tolerance, seed=1):
    """Output and the gradients of value, locations, weights: Triton vs the float64 loop reference."""
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           generator=torch.Generator().manual_seed(seed), dtype=value.dtype)
    got = run_op(triton_fn, value, shapes, starts, loc, attn, grad_out)
    ref = run_op(reference_fn, value.double(), shapes, starts, loc.double(), attn.double(), grad_out.double())
    assert got[0].dtype == value.dtype and got[1].dtype == value.dtype
    assert got[2].dtype == loc.dtype and got[3].dtype == attn.dtype
    errors = {k: rel_err(g, r) for k, g, r in zip(("out", "value", "loc", "attn"), got, ref)}
    assert all(e <= tolerance for e in errors.values()), f"errors {errors} exceed {tolerance}"
    return got


# name: bs, Lq, heads, C, levels (H, W), points, dtype
CASES = {
    "C6_tail_two_query_blocks": (2, 7, 2, 6, [(3, 5), (2, 3)], 2, torch.float32),
    "C8_one_block": (1, 4, 2, 8, [(2, 7), (4, 1)], 1, torch.float32),
    "C5_float64": (1, 5, 1, 5, [(3, 4), (1, 2)], 2, torch.float64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_loop_reference(name):
    bs, len_q, heads, channels, levels, points, dtype = CASES[name]
    value, ss, starts, loc, attn = make_inputs(bs, len_q, heads, channels, levels, points, dtype=dtype,
                                               spread=(-0.3, 1.3))
    assert ((loc < 0) | (loc > 1)).any() and ((loc > 0.2) & (loc < 0.8)).any()
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else TOLERANCES[dtype]["out"]
    compare(value, ss, starts, loc, attn, tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_locations_on_pixel_edges_centres_and_border(dtype):
    """Every location a multiple of 1 / (2W): pixel edges, pixel centres (the kinks), 0, 1 and just outside.

    Level sizes are powers of two, so x * W - 0.5 is exact in float32 too and both sides pick
    the same corner with ``floor``: gradients agree even on the kinks (one-sided derivatives).
    """
    levels = [(2, 4), (4, 2)]
    value, ss, starts, _, attn = make_inputs(1, 6, 1, 3, levels, 2, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    coords = []
    for h, w in levels:  # (Lq, points, 2) per level: steps of half a pixel from -1 to size + 1 pixels
        xs = torch.randint(-2, 2 * w + 3, (6, 2), generator=g) / (2 * w)
        ys = torch.randint(-2, 2 * h + 3, (6, 2), generator=g) / (2 * h)
        coords.append(torch.stack([xs, ys], -1))
    loc = torch.stack(coords, 1)[None, :, None].to(dtype)  # (1, Lq, 1, levels, points, 2)
    assert ((loc == 0) | (loc == 1)).any() and ((loc < 0) | (loc > 1)).any()
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else TOLERANCES[dtype]["out"]
    compare(value, ss, starts, loc, attn, tolerance)


def test_every_query_at_one_location():
    """All 9 queries (three query blocks) and both points sample pixel (1.25, 1.25): the atomic adds collide.

    The location is a quarter pixel from the centres of its four neighbours (away from the
    kinks); the value gradient lands on those four tokens of the 3 x 4 map and nowhere else.
    """
    value, ss, starts, loc, attn = make_inputs(1, 9, 2, 4, [(3, 4)], 2, dtype=torch.float32)
    loc[..., 0] = (1.25 + 0.5) / 4
    loc[..., 1] = (1.25 + 0.5) / 3
    grad_value = compare(value, ss, starts, loc, attn, TOLERANCES[torch.float32]["out"])[1]
    touched = torch.zeros(12, dtype=torch.bool)
    touched[[1 * 4 + 1, 1 * 4 + 2, 2 * 4 + 1, 2 * 4 + 2]] = True
    assert torch.count_nonzero(grad_value[:, touched]) == grad_value[:, touched].numel()
    assert torch.count_nonzero(grad_value[:, ~touched]) == 0


def test_non_contiguous_inputs_and_int32_levels():
    value, ss, starts, loc, attn = make_inputs(2, 3, 2, 3, [(3, 3), (2, 2)], 2, dtype=torch.float32)
    grad_out = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    expected = run_op(triton_fn, value, ss, starts, loc, attn, grad_out)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(*loc.shape[:4], 2 * loc.shape[4], 2)
    wide[:, :, :, :, 0::2] = loc
    loc_t = wide[:, :, :, :, 0::2]  # every other point of a wider tensor
    attn_t = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    grad_out_t = grad_out.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in (value_t, loc_t, attn_t, grad_out_t))
    assert torch.equal(loc_t, loc)
    got = run_op(triton_fn, value_t, ss.int(), starts.int(), loc_t, attn_t, grad_out_t)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_no_queries_and_no_channels():
    """Q = 0 and heads * C = 0: empty outputs, zero gradients, no kernel launched."""
    value, ss, starts, loc, attn = make_inputs(2, 0, 2, 3, [(3, 3)], 2, dtype=torch.float32)
    out, grad_value, grad_loc, grad_attn = run_op(triton_fn, value, ss, starts, loc, attn, torch.ones(2, 0, 6))
    assert out.shape == (2, 0, 6) and grad_loc.shape == loc.shape and grad_attn.shape == attn.shape
    assert grad_value.shape == value.shape and torch.count_nonzero(grad_value) == 0

    value, ss, starts, loc, attn = make_inputs(1, 4, 2, 3, [(3, 3)], 2, dtype=torch.float32)
    out, grad_value, grad_loc, grad_attn = run_op(triton_fn, value[..., :0], ss, starts, loc, attn,
                                                  torch.ones(1, 4, 0))
    assert out.shape == (1, 4, 0) and grad_value.shape == (1, 9, 2, 0)
    assert torch.count_nonzero(grad_loc) == 0 and torch.count_nonzero(grad_attn) == 0


def test_gradcheck_float64():
    """Locations drawn inside (0.05, 0.95) in float64: almost surely away from the kinks."""
    value, ss, starts, loc, attn = make_inputs(1, 2, 1, 3, [(2, 2), (1, 2)], 1, spread=(0.05, 0.95), seed=3)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    fn = lambda v, l, a: ops.ms_deform_attn_triton(v, ss, starts, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_types_smoke(dtype):
    """Half values with float32 locations: output and value gradient in the half type, fp32 for the rest.

    Only a smoke test: the interpreter's half arithmetic is numpy's, not the GPU's; the error
    bounds of tests/test_ops_cuda.py are checked on a GPU (scripts/gpu_check.sh).
    """
    value, ss, starts, loc, attn = make_inputs(1, 5, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32)
    value = value.to(dtype)
    got = compare(value, ss, starts, loc, attn, 4 * TOLERANCES[dtype]["out"])
    assert all(torch.isfinite(g.float()).all() for g in got)


# ----------------------------------------------------------------------------------------------
# Determinism alert, registration


def test_deterministic_mode_alerts_on_value_gradient_only():
    value, ss, starts, loc, attn = make_inputs(1, 3, 1, 2, [(2, 2)], 1, dtype=torch.float32)
    loc.requires_grad_(True)
    try:
        torch.use_deterministic_algorithms(True)
        ops.ms_deform_attn_triton(value, ss, starts, loc, attn).sum().backward()  # no value gradient: no alert
        value.requires_grad_(True)
        out = ops.ms_deform_attn_triton(value, ss, starts, loc, attn)
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_triton"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        out = ops.ms_deform_attn_triton(value, ss, starts, loc, attn)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward_triton"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert value.grad is not None


def fake_cuda_inputs(mode, dtype):
    with mode:
        return (torch.empty(2, 13, 2, 6, device="cuda", dtype=dtype),
                torch.empty(2, 2, device="cuda", dtype=torch.int64), torch.empty(2, device="cuda", dtype=torch.int64),
                torch.empty(2, 7, 2, 2, 3, 2, device="cuda"), torch.empty(2, 7, 2, 2, 3, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_implementation_with_fake_cuda_inputs(dtype):
    """Shapes, dtypes and device of both ops from metadata alone (what torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    value, ss, starts, loc, attn = fake_cuda_inputs(mode, dtype)
    with mode:
        out = torch.ops.msda.ms_deform_attn_triton(value, ss, starts, loc, attn)
        grads = torch.ops.msda.ms_deform_attn_triton_backward(value, ss, starts, loc, attn, out, True)
        no_value = torch.ops.msda.ms_deform_attn_triton_backward(value, ss, starts, loc, attn, out, False)
    assert isinstance(out, FakeTensor) and out.device.type == "cuda"
    assert (tuple(out.shape), out.dtype) == ((2, 7, 12), dtype)
    assert [(tuple(g.shape), g.dtype) for g in grads] == [
        ((2, 13, 2, 6), dtype), ((2, 7, 2, 2, 3, 2), torch.float32), ((2, 7, 2, 2, 3), torch.float32)]
    assert tuple(no_value[0].shape) == (0,)


@pytest.mark.parametrize("need_grad_value", [True, False], ids=["value_grad", "no_value_grad"])
def test_opcheck_on_cpu(need_grad_value):
    """Schema, fake, autograd registration and AOT dispatch of both ops against the interpreted kernels."""
    value, ss, starts, loc, attn = make_inputs(1, 3, 1, 2, [(2, 3)], 1, dtype=torch.float32)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_triton.default,
                          (value.requires_grad_(need_grad_value), ss, starts, loc.requires_grad_(True),
                           attn.requires_grad_(True)))
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_triton_backward.default,
                          (value.detach(), ss, starts, loc.detach(), attn.detach(), torch.randn(1, 3, 2),
                           need_grad_value))


# ----------------------------------------------------------------------------------------------
# Dispatcher


@pytest.fixture
def clean_dispatch(monkeypatch):
    monkeypatch.delenv("MSDA_IMPL", raising=False)
    monkeypatch.setattr(dispatch, "_announced", set())
    yield monkeypatch
    ops.set_impl(None)


def test_forced_triton_runs_the_kernels_on_cpu(clean_dispatch, caplog):
    calls = []

    def spy(*args):
        calls.append(1)
        return ops.ms_deform_attn_triton(*args)

    clean_dispatch.setattr(dispatch, "ms_deform_attn_triton", spy)
    value, ss, starts, loc, attn = make_inputs(1, 5, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32)
    assert ops.active_impl("cpu") == "pytorch"  # auto never picks the interpreter
    clean_dispatch.setenv("MSDA_IMPL", "triton")
    assert ops.active_impl("cpu") == "triton"
    with caplog.at_level(logging.INFO, logger="ops"):
        first = ops.ms_deform_attn(value, ss, starts, loc, attn, spatial_shapes_list=[(3, 4), (2, 2)])
        second = ops.ms_deform_attn(value, ss, starts, loc, attn)
    assert len(calls) == 2 and torch.equal(first, second)
    torch.testing.assert_close(first.double(), reference(value, ss, starts, loc, attn), rtol=1e-5, atol=1e-5)
    announced = [r.getMessage() for r in caplog.records if "implementation" in r.getMessage()]
    assert announced == ["ops.ms_deform_attn: cpu tensors use the 'triton' implementation"]
    with pytest.raises(ValueError, match="add up to"):  # the python level list is checked like elsewhere
        ops.ms_deform_attn(value[:, :-1], ss, starts, loc, attn, spatial_shapes_list=[(3, 4), (2, 2)])


def test_forcing_triton_where_it_cannot_run_is_one_line(clean_dispatch):
    ops.set_impl("triton")
    with pytest.MonkeyPatch.context() as hide_triton:  # as in a process that has not loaded the op yet
        hide_triton.setattr(triton_loader, "_module", None)
        hide_triton.setattr(triton_loader, "_tried", False)
        hide_triton.setattr(triton_loader.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(RuntimeError, match="forced to 'triton' but it cannot run on cpu: Triton is not "
                                               "installed$"):
            ops.active_impl("cpu")

    class CompiledKernels:  # what ops.triton_op looks like when TRITON_INTERPRET was set too late
        INTERPRETED = False

    clean_dispatch.setattr(triton_loader, "_module", CompiledKernels)
    with pytest.raises(RuntimeError, match="defined before TRITON_INTERPRET=1 was set") as info:
        ops.active_impl("cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        ops.ms_deform_attn_triton(*make_inputs(1, 2, 1, 2, [(2, 2)], 1, dtype=torch.float32))
    clean_dispatch.setattr(triton_loader, "_module", None)
    clean_dispatch.setattr(triton_loader, "_tried", False)
    clean_dispatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensors need Triton's interpreter"):
        ops.active_impl("cpu")
    with pytest.raises(RuntimeError, match="not mps"):
        ops.active_impl("mps")


def test_auto_on_cuda_prefers_compiled_then_triton_then_pytorch(clean_dispatch, caplog):
    """The selection order for CUDA tensors, with the loaders' answers patched (no GPU needed)."""
    import ops._ext as ext

    clean_dispatch.setattr(ext, "_tried", True)
    clean_dispatch.setattr(ext, "_error", "test: pretend the build failed")
    clean_dispatch.setattr(dispatch, "_warned_triton_fallback", False)
    clean_dispatch.setattr(dispatch, "_warned_fallback", False)
    clean_dispatch.setattr(ext, "_module", object())
    assert ops.active_impl("cuda") == "cuda"
    clean_dispatch.setattr(ext, "_module", None)
    clean_dispatch.setattr(dispatch, "triton_error", lambda device: None)
    with caplog.at_level(logging.WARNING, logger="ops"):
        assert ops.active_impl("cuda") == "triton" and ops.active_impl("cuda") == "triton"
        clean_dispatch.setattr(dispatch, "triton_error", lambda device: "test: no triton")
        assert ops.active_impl("cuda") == "pytorch" and ops.active_impl("cuda") == "pytorch"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "using the Triton operator" in messages[0] and "pretend the build failed" in messages[0]
    assert "PyTorch path" in messages[1] and "test: no triton" in messages[1]


# ----------------------------------------------------------------------------------------------
# Fresh processes without the interpreter


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MSDA_IMPL")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def test_importing_ops_needs_no_triton():
    """Only ops/triton_op.py and ops/triton_kernels.py import Triton; ops imports them on first use."""
    import ast

    ops_dir = os.path.join(ROOT, "ops")
    for name in sorted(os.listdir(ops_dir)):
        if not name.endswith(".py") or name in ("triton_op.py", "triton_kernels.py"):
            continue
        with open(os.path.join(ops_dir, name)) as f:
            tree = ast.parse(f.read())
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] == "triton" or m.endswith("triton_op")
                    or m.endswith("triton_kernels")], name


def compile_for_gpu(kernel, value_dtype: str, arch: int = 90) -> str:
    """PTX of an ops.triton_kernels kernel compiled for sm_<arch> without a GPU (Triton's bundled ptxas).

    ``value_dtype`` is a Triton type name (fp32, bf16, fp16, fp64); the encoder's 4 levels x 4
    points and 32 channels, one of the autotuned launch configurations.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    coord = "fp64" if value_dtype == "fp64" else "fp32"
    pointee = {"value_ptr": value_dtype, "out_ptr": value_dtype, "grad_out_ptr": value_dtype, "shapes_ptr": "i64",
               "starts_ptr": "i64"}
    constants = {"LEVELS": 4, "POINTS": 4, "BLOCK_C": 32, "ACC_FP64": coord == "fp64", "NEED_VALUE": True,
                 "BLOCK_Q": 32}
    signature = {name: "constexpr" if name in constants else "*" + pointee.get(name, coord)
                 if name.endswith("_ptr") else "i32" for name in kernel.fn.arg_names}
    source = ASTSource(fn=kernel.fn, signature=signature,
                       constexprs={k: v for k, v in constants.items() if k in signature})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]


def test_compiled_triton_in_a_fresh_process_without_interpreter(tmp_path):
    """What the interpreter does not run: the GPU registration and Triton's compiler.

    Without TRITON_INTERPRET, ``import ops`` defines no kernel; the op registered through
    torch.library.triton_op runs its fake implementation on fake CUDA tensors (the wrapped
    kernel launches do nothing); and both kernels compile to sm_90 PTX with no GPU present
    (an empty Triton cache, so they are really compiled).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MSDA_IMPL")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    code = ("import sys, torch, ops\n"
            "assert 'ops.triton_kernels' not in sys.modules\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "import ops.triton_op as op\n"
            "import ops.triton_kernels as kernels\n"
            "from tests.ops_triton_cases import compile_for_gpu, fake_cuda_inputs\n"
            "assert op.USES_TRITON_OP == hasattr(torch.library, 'triton_op') and not op.INTERPRETED\n"
            "mode = FakeTensorMode()\n"
            "args = fake_cuda_inputs(mode, torch.float16)\n"
            "with mode:\n"
            "    out = torch.ops.msda.ms_deform_attn_triton(*args)\n"
            "    grads = torch.ops.msda.ms_deform_attn_triton_backward(*args, out, True)\n"
            "print(tuple(out.shape), out.dtype, out.device.type, [tuple(g.shape) for g in grads])\n"
            "ptx = [compile_for_gpu(kernels.msda_forward_kernel, 'bf16'), "
            "compile_for_gpu(kernels.msda_backward_kernel, 'fp32')]\n"
            "print([('.target sm_90' in p, 'atom.global' in p or 'red.global' in p) for p in ptx])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [
        "(2, 7, 12) torch.float16 cuda [(2, 13, 2, 6), (2, 7, 2, 2, 3, 2), (2, 7, 2, 2, 3)]",
        "[(True, False), (True, True)]"]  # only the backward has atomics
