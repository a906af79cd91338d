"""The compiled multi-scale deformable attention op: source compiles, and on a GPU matches the PyTorch path.

The compile tests need nvcc and a CUDA build of torch but no GPU. Everything else needs a CUDA
device and skips cleanly without one; with a device, a compiled op that fails to load is a
failure, not a skip.

Reference. The GPU tests compare against ``ms_deform_attn_pytorch`` evaluated in float64 on the
very same (already rounded) inputs. The float32 PyTorch path itself is not a good enough yardstick
for a 1e-5 bound: grid_sample rounds the pixel coordinate ((2x - 1 + 1) * W - 1) / 2 in float32,
an error of ~1e-5 px on the largest level, which alone moves outputs by ~1e-5 relative.
Errors are measured as max |got - ref| / max |ref| per tensor.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

import ops
from ops import ms_deform_attn, ms_deform_attn_cuda, ms_deform_attn_pytorch

OPS_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops", "src")
KERNELS = os.path.join(OPS_SRC, "msda_kernels.cu")
BINDING = os.path.join(OPS_SRC, "msda_binding.cpp")


# ----------------------------------------------------------------------------------------------
# Compilation (no GPU needed)

def _nvcc():
    for candidate in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def _skip_without_toolchain():
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    if _nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _cuda_include_dir():
    nvcc = os.path.realpath(_nvcc())
    root = os.path.dirname(os.path.dirname(nvcc))
    for inc in (os.path.join(root, "include"), os.path.join(root, "targets", "x86_64-linux", "include")):
        if os.path.isfile(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    pytest.skip(f"no cuda_runtime_api.h next to {nvcc}")


def test_cuda_source_compiles(tmp_path):
    """The kernels compile for sm_80 and sm_90 with nvcc alone (no torch headers involved).

    Measured: 11.2 s wall for both architectures on this project's shared
    2-core CPU machine, nvcc from CUDA 13.0 (pytest --durations, issue 13).
    """
    _skip_without_toolchain()
    obj = tmp_path / "msda_kernels.o"
    cmd = [_nvcc(), "-c", KERNELS, "-o", str(obj), "-O3", "-std=c++17", "-I", OPS_SRC,
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(f"nvcc took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert obj.stat().st_size > 0


@pytest.mark.slow
def test_cuda_binding_compiles():
    """The torch binding parses against this torch's headers (g++ -fsyntax-only, ~10-20 s on 2 cores)."""
    _skip_without_toolchain()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    # Recent torch headers refuse anything older than C++20; older ones are fine with C++17.
    with open(os.path.join(torch_inc, "ATen", "ATen.h")) as f:
        std = "-std=c++20" if "C++20" in f.read() else "-std=c++17"
    cmd = [cxx, "-fsyntax-only", std, "-DTORCH_EXTENSION_NAME=msda_C_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-I", OPS_SRC, "-I", torch_inc, "-I", os.path.join(torch_inc, "torch", "csrc", "api", "include"),
           "-I", sysconfig.get_paths()["include"], "-I", _cuda_include_dir(), BINDING]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"binding does not compile:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    print(f"binding syntax check took {time.perf_counter() - start:.1f} s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# GPU correctness

@pytest.fixture(scope="module")
def device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    module = ops.load_extension()
    assert module is not None, f"a CUDA device is present but the compiled op is unavailable: {ops.load_error()}"
    return torch.device("cuda")


ENCODER_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SMALL_LEVELS = [(12, 17), (6, 9), (3, 5), (2, 3)]

# name: (bs, len_q or None for "all tokens", heads, channels, levels, points, location spread)
CASES = {
    "encoder": (2, None, 8, 32, ENCODER_LEVELS, 4, (0.0, 1.0)),
    "decoder300": (2, 300, 8, 32, ENCODER_LEVELS, 4, (0.0, 1.0)),
    "decoder1800": (2, 1800, 8, 32, ENCODER_LEVELS, 4, (0.0, 1.0)),
    "channels31": (2, 97, 3, 31, SMALL_LEVELS, 3, (-0.1, 1.1)),
    "channels12": (2, 97, 3, 12, SMALL_LEVELS, 3, (-0.1, 1.1)),  # half types: 4-wide packs (12 % 8 != 0)
    "channels3": (2, 97, 5, 3, SMALL_LEVELS, 2, (-0.1, 1.1)),
    "channels6": (1, 64, 2, 6, SMALL_LEVELS, 4, (-0.1, 1.1)),  # 2-wide packs
    "channels70": (1, 50, 2, 70, SMALL_LEVELS, 2, (-0.1, 1.1)),  # more channels than one lane pass
    "channels256": (1, 40, 1, 256, SMALL_LEVELS, 2, (-0.1, 1.1)),
    "outside": (2, 200, 4, 16, SMALL_LEVELS, 4, (-0.6, 1.6)),  # many samples partly or fully off the map
    "one_level_one_point": (3, 33, 2, 8, [(7, 1)], 1, (-0.2, 1.2)),
}


def make_case(name, device, seed=0):
    """fp32 inputs for CASES[name]: value (bs, Lin, heads, C), shapes, starts, locations, weights."""
    bs, len_q, heads, channels, levels, points, (lo, hi) = CASES[name]
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    len_in = sum(h * w for h, w in levels)
    len_q = len_in if len_q is None else len_q
    value = torch.randn(bs, len_in, heads, channels, device=device, generator=g)
    loc = torch.rand(bs, len_q, heads, len(levels), points, 2, device=device, generator=g) * (hi - lo) + lo
    logits = torch.randn(bs, len_q, heads, len(levels) * points, device=device, generator=g)
    attn = logits.softmax(-1).view(bs, len_q, heads, len(levels), points)
    return value, shapes, starts, loc, attn, levels


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run_op(fn, value, shapes, starts, loc, attn, grad_out, **kw):
    """Forward + backward; returns output and the gradients of value, locations, weights."""
    value = value.detach().requires_grad_(True)
    loc = loc.detach().requires_grad_(True)
    attn = attn.detach().requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn, **kw)
    out.backward(grad_out)
    return out.detach(), value.grad, loc.grad, attn.grad


def reference64(value, shapes, starts, loc, attn, grad_out, levels):
    return run_op(ms_deform_attn_pytorch, value.double(), shapes, starts, loc.double(), attn.double(),
                  grad_out.double(), spatial_shapes_list=levels)


# Tolerances (max error relative to the tensor's max magnitude) against the float64 reference
# on the same rounded inputs:
# - float32: every product and sum is float32 and pixel fractions are exact to ~1e-7, so the
#   error is a few float32 roundings over <= 64 terms, ~1e-7; the required bound is 1e-5.
# - float16/bfloat16: the kernel accumulates in float32 and rounds the output (and the value
#   gradient, accumulated in float32) once to the half type, so the error is at most half an ulp
#   of the element, unit roundoff 2^-11 (fp16) / 2^-8 (bf16) relative; we allow twice that.
#   Location and weight gradients stay float32 (the locations/weights are float32 inputs) and
#   are computed in float32 from the same half values, so they keep the float32-level bound
#   (1e-4 leaves room for the larger dynamic range of bf16 values in cancelling differences).
TOLERANCES = {
    torch.float32: {"out": 1e-5, "value": 1e-5, "loc": 1e-5, "attn": 1e-5},
    torch.float16: {"out": 2 ** -10, "value": 2 ** -10, "loc": 1e-4, "attn": 1e-4},
    torch.bfloat16: {"out": 2 ** -7, "value": 2 ** -7, "loc": 1e-4, "attn": 1e-4},
}
# float64 locations and weights (the op computes in float64 then): a few double roundings.
FLOAT64_TOLERANCE = 1e-12


def check_case(name, device, dtype, mutate=None, fn=ms_deform_attn_cuda):
    """``fn`` (the compiled op, or the Triton op in test_ops_triton_gpu.py) on CASES[name] vs reference64."""
    value, shapes, starts, loc, attn, levels = make_case(name, device)
    if mutate is not None:
        value, loc = mutate(value, loc)
    value = value.to(dtype)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device,
                           dtype=dtype)
    got = run_op(fn, value, shapes, starts, loc, attn, grad_out)
    ref = reference64(value, shapes, starts, loc, attn, grad_out, levels)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    tol = TOLERANCES[dtype]
    errors = {k: rel_err(g, r) for k, g, r in zip(("out", "value", "loc", "attn"), got, ref)}
    bad = {k: e for k, e in errors.items() if not e <= tol[k]}
    assert not bad, f"{name} {dtype}: errors {errors} exceed {tol}"


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_pytorch_path(device, name):
    check_case(name, device, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["encoder", "decoder300", "channels31", "channels12", "channels70", "outside"])
def test_half_types_match_reference(device, name, dtype):
    check_case(name, device, dtype)


def test_padded_inputs(device):
    """Like the model with a padded batch: value zeroed on padded tokens, locations scaled by valid ratios."""

    def pad(value, loc):
        bs, _, _, _ = value.shape
        valid = torch.tensor([[1.0, 1.0], [0.6, 0.75]], device=value.device)[:bs]  # (w, h) ratios
        mask_parts = []
        for h, w in ENCODER_LEVELS:
            ys = (torch.arange(h, device=value.device) + 0.5) / h
            xs = (torch.arange(w, device=value.device) + 0.5) / w
            inside = (ys[None, :, None] < valid[:, None, None, 1]) & (xs[None, None, :] < valid[:, None, None, 0])
            mask_parts.append(~inside.flatten(1))
        padded = torch.cat(mask_parts, 1)  # (bs, Lin) True on padding
        value = value.masked_fill(padded[..., None, None], 0.0)
        loc = loc * valid[:, None, None, None, None, :]
        return value, loc

    check_case("decoder1800", device, torch.float32, mutate=pad)


def test_gradcheck_float64(device):
    value, shapes, starts, loc, attn, _ = make_case("one_level_one_point", device)
    value = value[:1, :, :, :3].double().requires_grad_(True)
    loc = loc[:1, :4].double().requires_grad_(True)
    attn = attn[:1, :4].double().requires_grad_(True)
    fn = lambda v, l, a: ms_deform_attn_cuda(v, shapes, starts, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6, rtol=1e-5)

    value, shapes, starts, loc, attn, _ = make_case("channels3", device)
    value = value[:1].double().requires_grad_(True)
    loc = loc[:1, :3].double().requires_grad_(True)
    attn = attn[:1, :3].double().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_dispatcher_uses_compiled_op_without_host_sync(device, monkeypatch):
    monkeypatch.delenv("MSDA_IMPL", raising=False)
    ops.set_impl(None)
    assert ops.cuda_available() and ops.active_impl(device) == "cuda"
    value, shapes, starts, loc, attn, levels = make_case("decoder300", device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    expected = run_op(ms_deform_attn_cuda, value, shapes, starts, loc, attn, grad_out)
    value, loc, attn = (t.detach().requires_grad_(True) for t in (value, loc, attn))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(value, shapes, starts, loc, attn, spatial_shapes_list=levels)
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Atomic accumulation order varies between runs, so the value gradient is close, not equal.
    assert torch.equal(out, expected[0])
    torch.testing.assert_close(value.grad, expected[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(loc.grad, expected[2]) and torch.equal(attn.grad, expected[3])


def test_forced_pytorch_on_cuda_tensors(device, monkeypatch):
    monkeypatch.setenv("MSDA_IMPL", "pytorch")
    value, shapes, starts, loc, attn, levels = make_case("channels31", device)
    assert ops.active_impl(device) == "pytorch"
    assert torch.equal(ms_deform_attn(value, shapes, starts, loc, attn),
                       ms_deform_attn_pytorch(value, shapes, starts, loc, attn, levels))


def test_autocast_mixed_dtypes(device):
    """Under bf16 autocast the model hands in bf16 values with fp32 locations and weights."""
    value, shapes, starts, loc, attn, levels = make_case("channels31", device)
    value = value.bfloat16().requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ms_deform_attn_cuda(value, shapes, starts, loc, attn)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert value.grad.dtype == torch.bfloat16 and loc.grad.dtype == torch.float32
    assert attn.grad.dtype == torch.float32
    ref = ms_deform_attn_pytorch(value.detach().double(), shapes, starts, loc.detach().double(),
                                 attn.detach().double(), levels)
    assert rel_err(out, ref) <= 2 ** -7
    # Half-precision locations are accepted too (cast up exactly); their gradient comes back in kind.
    loc16 = loc.detach().half().requires_grad_(True)
    out16 = ms_deform_attn_cuda(value.detach(), shapes, starts, loc16, attn.detach())
    out16.float().sum().backward()
    assert loc16.grad.dtype == torch.float16


def test_non_contiguous_int32_and_empty_inputs(device):
    value, shapes, starts, loc, attn, levels = make_case("channels6", device)
    # value as a view with a transposed memory layout, index tensors as int32
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_t.is_contiguous()
    got = ms_deform_attn_cuda(value_t, shapes.int(), starts.int(), loc, attn)
    torch.testing.assert_close(got, ms_deform_attn_cuda(value, shapes, starts, loc, attn), rtol=0, atol=0)
    # no queries at all
    empty_loc, empty_attn = loc[:, :0].requires_grad_(True), attn[:, :0].requires_grad_(True)
    v = value.detach().requires_grad_(True)
    out = ms_deform_attn_cuda(v, shapes, starts, empty_loc, empty_attn)
    assert out.shape == (value.shape[0], 0, value.shape[2] * value.shape[3])
    out.sum().backward()
    assert torch.count_nonzero(v.grad) == 0


def test_samples_fully_outside_give_zero(device):
    value, shapes, starts, loc, attn, _ = make_case("channels31", device)
    far = torch.stack([loc[..., 0] + 3.0, loc[..., 1] - 4.0], -1)
    far[..., 0, :, :] = float("nan")  # NaN locations are treated as off the map
    value, far, attn = (t.requires_grad_(True) for t in (value, far, attn))
    out = ms_deform_attn_cuda(value, shapes, starts, far, attn)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    for grad in (value.grad, far.grad, attn.grad):
        assert torch.count_nonzero(grad) == 0


# ----------------------------------------------------------------------------------------------
# Paths no test had run before (issue 13)


def test_float64_matches_reference(device):
    """float64 values with float64 locations and weights: the kernel computes in double throughout."""
    value, shapes, starts, loc, attn, levels = make_case("channels31", device)
    value, loc, attn = value.double(), loc.double(), attn.double()
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device,
                           dtype=torch.float64)
    got = run_op(ms_deform_attn_cuda, value, shapes, starts, loc, attn, grad_out)
    ref = reference64(value, shapes, starts, loc, attn, grad_out, levels)
    assert all(g.dtype == torch.float64 for g in got)
    errors = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= FLOAT64_TOLERANCE, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_value_takes_scalar_loads(device, dtype):
    """value one element past an aligned address (contiguous, but not 8/16-byte aligned): no vector loads."""
    value, shapes, starts, loc, attn, levels = make_case("channels12", device)
    storage = torch.empty(value.numel() + 1, device=device, dtype=dtype)
    misaligned = storage[1:].view(value.shape)
    misaligned.copy_(value.to(dtype))
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 8 != 0  # no 8- or 16-byte packs possible
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device,
                           dtype=dtype)
    # value (the leaf) must stay misaligned: run_op's detach() keeps the storage offset
    got = run_op(ms_deform_attn_cuda, misaligned, shapes, starts, loc, attn, grad_out)
    ref = reference64(misaligned, shapes, starts, loc, attn, grad_out, levels)
    tol = TOLERANCES[dtype]
    errors = {k: rel_err(g, r) for k, g, r in zip(("out", "value", "loc", "attn"), got, ref)}
    assert all(errors[k] <= tol[k] for k in errors), errors


def test_without_value_gradient(device):
    """need_grad_value=False: no value gradient, the same location and weight gradients, no alert."""
    value, shapes, starts, loc, attn, _ = make_case("channels31", device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    full = run_op(ms_deform_attn_cuda, value, shapes, starts, loc, attn, grad_out)
    loc_leaf, attn_leaf = loc.clone().requires_grad_(True), attn.clone().requires_grad_(True)
    torch.use_deterministic_algorithms(True)
    try:  # without the atomic value scatter the backward is deterministic: no alert
        out = ms_deform_attn_cuda(value, shapes, starts, loc_leaf, attn_leaf)
        out.backward(grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(out, full[0])
    assert torch.equal(loc_leaf.grad, full[2]) and torch.equal(attn_leaf.grad, full[3])


def test_deterministic_mode_alerts_on_value_gradient(device):
    value, shapes, starts, loc, attn, _ = make_case("channels6", device)
    value = value.requires_grad_(True)
    try:
        torch.use_deterministic_algorithms(True)
        out = ms_deform_attn_cuda(value, shapes, starts, loc, attn)  # the forward is deterministic
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        out = ms_deform_attn_cuda(value, shapes, starts, loc, attn)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward_cuda"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert value.grad is not None


def test_non_default_stream(device):
    """Launches go to the current stream: work queued on a side stream gives the default-stream result."""
    value, shapes, starts, loc, attn, _ = make_case("decoder300", device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    expected = run_op(ms_deform_attn_cuda, value, shapes, starts, loc, attn, grad_out)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        # a long kernel first on the side stream, so a launch on the wrong stream would race it
        value_side = value * 1.0
        torch.cuda._sleep(50_000_000)
        got = run_op(ms_deform_attn_cuda, value_side, shapes, starts, loc, attn, grad_out)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_offsets_beyond_2_pow_31_elements(device):
    check_offsets_beyond_2_pow_31_elements(device, ms_deform_attn_cuda)


def check_offsets_beyond_2_pow_31_elements(device, fn):
    """A 2^32-element fp16 value (8 GiB): batch 1 starts 2^31 elements in. Pixel-centre samples read exact pixels."""
    side, heads, channels = 16384, 1, 8  # one 16384 x 16384 level: 2^28 tokens x 8 channels = 2^31 per image
    # value 8 GiB + float32 gradient scratch 16 GiB + fp16 gradient 8 GiB
    if torch.cuda.get_device_properties(device).total_memory < 48 * 2 ** 30:
        pytest.skip("needs ~34 GiB of free GPU memory")
    value = torch.empty(2, side * side, heads, channels, device=device, dtype=torch.float16)
    assert value.numel() == 2 ** 32
    value.view(-1)[: 2 ** 31].fill_(1.0)
    value.view(-1)[2 ** 31:].fill_(2.0)
    # queries at the centres of a few pixels near the end of each image (largest offsets)
    pixels = torch.tensor([[side - 1, side - 1], [side - 2, side - 1], [0, side - 1], [side - 1, 0]], device=device)
    tokens = pixels[:, 1] * side + pixels[:, 0]
    for b in range(2):
        value[b, tokens, 0] = torch.arange(len(tokens) * channels, device=device, dtype=torch.float16).view(
            len(tokens), channels) + 10 * b
    loc = ((pixels.float() + 0.5) / side).view(1, len(tokens), 1, 1, 1, 2).expand(2, -1, -1, -1, -1, -1).contiguous()
    attn = torch.ones(2, len(tokens), 1, 1, 1, device=device)
    shapes = torch.tensor([[side, side]], device=device)
    starts = torch.zeros(1, dtype=torch.int64, device=device)
    value.requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn)
    assert torch.equal(out, value.detach()[:, tokens, 0])
    out.backward(torch.ones_like(out))
    grad = value.grad
    assert torch.equal(grad[:, tokens, 0], torch.ones_like(out))
    assert grad.sum(dtype=torch.float32).item() == out.numel()  # nothing written anywhere else
    del grad, value, out
    torch.cuda.empty_cache()


def test_empty_channel_dimension_gives_zero_location_gradients(device):
    """heads·C = 0 with samples present: output empty, location and weight gradients exactly zero."""
    value, shapes, starts, loc, attn, _ = make_case("channels31", device)
    value = value[..., :0].contiguous().requires_grad_(True)
    loc, attn = loc.requires_grad_(True), attn.requires_grad_(True)
    out = ms_deform_attn_cuda(value, shapes, starts, loc, attn)
    assert out.shape == (value.shape[0], loc.shape[1], 0)
    # leave NaN in the caching allocator's free blocks of these sizes, so uninitialised memory would show
    junk = [torch.full_like(loc, float("nan")), torch.full_like(attn, float("nan"))]
    del junk
    out.sum().backward()
    assert loc.grad.shape == loc.shape and torch.count_nonzero(loc.grad) == 0
    assert attn.grad.shape == attn.shape and torch.count_nonzero(attn.grad) == 0
    assert value.grad.shape == value.shape


def test_levels_that_do_not_fit_value(device):
    """Σ H·W > Lin or a start past the end: the kernels read the missing tokens as zeros and never write there.

    Reference: the PyTorch path on value zero-padded to Σ H·W tokens. Through the dispatcher, with
    the python level list, the same layout raises the PyTorch path's error instead.
    """
    value, shapes, starts, loc, attn, levels = make_case("channels31", device)
    cut = value.shape[1] - 7  # the last level (2 x 3 = 6 tokens) and one token of the level before
    short = value[:, :cut].contiguous()
    padded = torch.cat([short, torch.zeros_like(value[:, cut:])], 1)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)
    got = run_op(ms_deform_attn_cuda, short, shapes, starts, loc, attn, grad_out)
    ref = reference64(padded, shapes, starts, loc, attn, grad_out, levels)
    ref = (ref[0], ref[1][:, :cut], ref[2], ref[3])
    errors = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= 1e-5, errors
    torch.cuda.synchronize(device)  # an out-of-bounds access would surface here

    far = starts.clone()
    far[-1] = value.shape[1] + 1000  # start index past the end of value: that level adds nothing
    no_last = run_op(ms_deform_attn_cuda, value, shapes, far, loc, attn.clone(), grad_out)
    attn_zero_last = attn.clone()
    attn_zero_last[..., -1, :] = 0
    expected = ms_deform_attn_cuda(value, shapes, starts, loc, attn_zero_last)
    torch.testing.assert_close(no_last[0], expected, rtol=1e-6, atol=1e-6)
    torch.cuda.synchronize(device)

    with pytest.raises(ValueError, match="add up to"):
        ms_deform_attn(short, shapes, starts, loc, attn, spatial_shapes_list=levels)


def test_registered_op_opcheck_and_compile_on_gpu(device):
    """The registered op's fake / autograd registrations against the CUDA kernels; compile and export of the module."""
    from models.level_layout import LevelLayout
    from models.ms_deform_attn import MSDeformAttn

    value, shapes, starts, loc, attn, levels = make_case("channels6", device)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn.default,
                          (value.requires_grad_(True), shapes, starts, loc.requires_grad_(True),
                           attn.requires_grad_(True)))
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=len(levels), n_heads=2, n_points=2).to(device)
    len_in = sum(h * w for h, w in levels)
    layout = LevelLayout(shapes, levels, starts, torch.zeros(2, len_in, dtype=torch.bool, device=device))
    args = (torch.randn(2, 30, 16, device=device), torch.rand(2, 30, len(levels), 2, device=device),
            torch.randn(2, len_in, 16, device=device), layout)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-6)
    exported = torch.export.export(module, args)
    assert sum("msda.ms_deform_attn" in str(n.target) for n in exported.graph.nodes) == 1
