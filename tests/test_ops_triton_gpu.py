"""The Triton operator compiled for a GPU: the compiled op's GPU checks (tests/test_ops_cuda.py) on Triton.

Needs a CUDA device and skips cleanly without one; with a device, Triton that cannot run is a
failure, not a skip. The kernels' logic is also executed on CPU by Triton's interpreter in
tests/test_ops_triton.py (every CI run); this file checks what the interpreter cannot: the
compiled kernels, GPU half arithmetic, atomics under real concurrency, autotuning, streams,
torch.compile / torch.export through torch.library.triton_op, and 64-bit offsets.
"""
import pytest
import torch

import ops
from ops import ms_deform_attn, ms_deform_attn_triton
from tests.test_ops_cuda import (CASES, FLOAT64_TOLERANCE, check_case, check_offsets_beyond_2_pow_31_elements,
                                 make_case, reference64, rel_err, run_op)


@pytest.fixture(scope="module")
def device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = ops.triton_error("cuda")
    assert reason is None, f"a CUDA device is present but Triton cannot run: {reason}"
    from ops import triton_op
    assert not triton_op.INTERPRETED, "unset TRITON_INTERPRET to test the compiled Triton kernels"
    return torch.device("cuda")


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(device, name):
    check_case(name, device, torch.float32, fn=ms_deform_attn_triton)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["encoder", "decoder300", "channels31", "channels12", "channels70", "outside"])
def test_half_types_match_reference(device, name, dtype):
    check_case(name, device, dtype, fn=ms_deform_attn_triton)


def test_float64_and_gradcheck(device):
    value, shapes, starts, loc, attn, levels = make_case("channels31", device)
    value, loc, attn = value.double(), loc.double(), attn.double()
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device,
                           dtype=torch.float64)
    got = run_op(ms_deform_attn_triton, value, shapes, starts, loc, attn, grad_out)
    ref = reference64(value, shapes, starts, loc, attn, grad_out, levels)
    assert max(rel_err(g, r) for g, r in zip(got, ref)) <= FLOAT64_TOLERANCE

    value, shapes, starts, loc, attn, _ = make_case("channels3", device)
    leaves = [value[:1].double().requires_grad_(True), loc[:1, :3].double().requires_grad_(True),
              attn[:1, :3].double().requires_grad_(True)]
    fn = lambda v, l, a: ms_deform_attn_triton(v, shapes, starts, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_matches_compiled_op_when_built(device):
    if ops.load_extension() is None:
        pytest.skip(f"compiled op unavailable: {ops.load_error()}")
    value, shapes, starts, loc, attn, _ = make_case("decoder300", device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    triton_result = run_op(ms_deform_attn_triton, value, shapes, starts, loc, attn, grad_out)
    cuda_result = run_op(ops.ms_deform_attn_cuda, value, shapes, starts, loc, attn, grad_out)
    assert max(rel_err(t, c) for t, c in zip(triton_result, cuda_result)) <= 2e-5


def test_dispatcher_forced_triton_without_host_sync(device, monkeypatch):
    monkeypatch.setenv("MSDA_IMPL", "triton")
    assert ops.active_impl(device) == "triton"
    value, shapes, starts, loc, attn, levels = make_case("decoder300", device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    expected = run_op(ms_deform_attn_triton, value, shapes, starts, loc, attn, grad_out)  # autotunes first
    value, loc, attn = (t.detach().requires_grad_(True) for t in (value, loc, attn))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(value, shapes, starts, loc, attn, spatial_shapes_list=levels)
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, expected[0])
    torch.testing.assert_close(value.grad, expected[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(loc.grad, expected[2]) and torch.equal(attn.grad, expected[3])


def test_samples_outside_nan_and_empty_inputs(device):
    value, shapes, starts, loc, attn, _ = make_case("channels31", device)
    far = torch.stack([loc[..., 0] + 3.0, loc[..., 1] - 4.0], -1)
    far[..., 0, :, :] = float("nan")
    value, far, attn = (t.requires_grad_(True) for t in (value, far, attn))
    out = ms_deform_attn_triton(value, shapes, starts, far, attn)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert all(torch.count_nonzero(g) == 0 for g in (value.grad, far.grad, attn.grad))
    empty = ms_deform_attn_triton(value.detach(), shapes, starts, loc[:, :0], attn.detach()[:, :0])
    assert empty.shape == (value.shape[0], 0, value.shape[2] * value.shape[3])


def test_deterministic_mode_alerts_on_value_gradient(device):
    value, shapes, starts, loc, attn, _ = make_case("channels6", device)
    value = value.requires_grad_(True)
    try:
        torch.use_deterministic_algorithms(True)
        out = ms_deform_attn_triton(value, shapes, starts, loc, attn)
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_triton"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_non_default_stream(device):
    value, shapes, starts, loc, attn, _ = make_case("decoder300", device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    expected = run_op(ms_deform_attn_triton, value, shapes, starts, loc, attn, grad_out)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        value_side = value * 1.0
        torch.cuda._sleep(50_000_000)
        got = run_op(ms_deform_attn_triton, value_side, shapes, starts, loc, attn, grad_out)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_offsets_beyond_2_pow_31_elements(device):
    check_offsets_beyond_2_pow_31_elements(device, ms_deform_attn_triton)


def test_opcheck_triton_op_registration(device):
    """Schema, fake (the launcher on fake tensors), autograd and AOT dispatch of the triton_op registration."""
    from ops import triton_op

    assert triton_op.USES_TRITON_OP == hasattr(torch.library, "triton_op")
    value, shapes, starts, loc, attn, _ = make_case("channels6", device)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_triton.default,
                          (value.requires_grad_(True), shapes, starts, loc.requires_grad_(True),
                           attn.requires_grad_(True)))
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_triton_backward.default,
                          (value.detach(), shapes, starts, loc.detach(), attn.detach(), grad_out, True))


def test_compile_and_export_see_one_op(device, monkeypatch):
    """MSDeformAttn with MSDA_IMPL=triton: torch.compile (inductor) matches eager; export shows one node."""
    from models.level_layout import LevelLayout
    from models.ms_deform_attn import MSDeformAttn

    monkeypatch.setenv("MSDA_IMPL", "triton")
    _, shapes, starts, _, _, levels = make_case("channels6", device)
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=len(levels), n_heads=2, n_points=2).to(device)
    len_in = sum(h * w for h, w in levels)
    layout = LevelLayout(shapes, levels, starts, torch.zeros(2, len_in, dtype=torch.bool, device=device))
    args = (torch.randn(2, 30, 16, device=device), torch.rand(2, 30, len(levels), 2, device=device),
            torch.randn(2, len_in, 16, device=device), layout)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-6)
        exported = torch.export.export(module, args)
    finally:
        torch._dynamo.reset()
    assert sum("msda.ms_deform_attn_triton" in str(n.target) for n in exported.graph.nodes) == 1
