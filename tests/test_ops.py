"""CPU tests of the multi-scale deformable attention operator's PyTorch path and dispatcher."""
import logging

import pytest
import torch

import ops
from ops import ms_deform_attn, ms_deform_attn_pytorch


def make_inputs(bs, len_q, heads, channels, shapes, points, dtype=torch.float64, spread=(-0.1, 1.1), seed=0):
    """Random operator inputs; locations uniform in ``spread`` so some land outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = ss.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    len_in = int(sizes.sum())
    levels = len(shapes)
    value = torch.randn(bs, len_in, heads, channels, generator=g, dtype=dtype)
    lo, hi = spread
    loc = torch.rand(bs, len_q, heads, levels, points, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(bs, len_q, heads, levels, points, generator=g, dtype=dtype)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, ss, starts, loc, attn


def reference(value, shapes, starts, loc, attn):
    """Per-sample float64 loop: explicit bilinear interpolation with zero padding.

    Pixel coordinates follow align_corners=False: x = loc_x * W - 0.5, so pixel centres sit
    at (i + 0.5) / W. Returns (bs, Lq, heads * C). Differentiable in value, loc and attn
    (autograd through the loop): on a pixel boundary, where the interpolation has a kink, the
    gradient is the one-sided one of the corner ``floor`` picks, as in grid_sample.
    """
    value, loc, attn = value.double(), loc.double(), attn.double()
    bs, _, heads, channels = value.shape
    _, len_q, _, levels, points, _ = loc.shape
    rows = []
    for b in range(bs):
        for q in range(len_q):
            for h in range(heads):
                acc = torch.zeros(channels, dtype=torch.float64)
                for lvl in range(levels):
                    hl, wl = (int(s) for s in shapes[lvl])
                    start = int(starts[lvl])
                    for p in range(points):
                        x = loc[b, q, h, lvl, p, 0] * wl - 0.5
                        y = loc[b, q, h, lvl, p, 1] * hl - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(channels, dtype=torch.float64)
                        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                                          (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
                            xi, yi = x0 + dx, y0 + dy
                            if 0 <= xi < wl and 0 <= yi < hl:
                                sample = sample + w * value[b, start + yi * wl + xi, h]
                        acc = acc + attn[b, q, h, lvl, p] * sample
                rows.append(acc)
    if not rows:
        return value.new_zeros(bs, len_q, heads * channels)
    return torch.stack(rows).reshape(bs, len_q, heads * channels)


CASES = [
    # bs, Lq, heads, C, level shapes (H, W), points
    (1, 5, 1, 3, [(4, 6)], 1),
    (2, 7, 2, 4, [(5, 3), (3, 7), (1, 2)], 2),
    (2, 4, 3, 5, [(6, 9), (3, 5), (2, 3), (1, 1)], 4),
    (1, 9, 2, 8, [(2, 11), (7, 1)], 3),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_loop_reference(case):
    bs, len_q, heads, channels, shapes, points = case
    value, ss, starts, loc, attn = make_inputs(bs, len_q, heads, channels, shapes, points, spread=(-0.3, 1.3))
    # Make sure the draw really exercises the border: some samples outside, some inside.
    assert ((loc < 0) | (loc > 1)).any() and ((loc > 0.2) & (loc < 0.8)).any()
    out = ms_deform_attn_pytorch(value, ss, starts, loc, attn)
    assert out.shape == (bs, len_q, heads * channels) and out.dtype == torch.float64
    torch.testing.assert_close(out, reference(value, ss, starts, loc, attn), rtol=1e-12, atol=1e-12)


def test_far_outside_samples_give_zero():
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, 4, [(3, 4), (2, 2)], 2)
    loc = torch.stack([loc[..., 0] + 5.0, loc[..., 1] - 7.0], dim=-1)
    out = ms_deform_attn_pytorch(value, ss, starts, loc, attn)
    assert torch.count_nonzero(out) == 0


def test_pixel_centre_reads_exact_value():
    """A location at a pixel centre ((i + 0.5) / W) returns that pixel, the align_corners=False convention."""
    value, ss, starts, loc, attn = make_inputs(1, 1, 1, 2, [(3, 5)], 1)
    xi, yi = 3, 1
    loc[...] = torch.tensor([(xi + 0.5) / 5, (yi + 0.5) / 3], dtype=torch.float64)
    attn[...] = 1.0
    out = ms_deform_attn_pytorch(value, ss, starts, loc, attn)
    torch.testing.assert_close(out[0, 0], value[0, yi * 5 + xi, 0])


def test_float32_matches_reference():
    value, ss, starts, loc, attn = make_inputs(2, 6, 2, 4, [(5, 7), (3, 4)], 2)
    out = ms_deform_attn_pytorch(value.float(), ss, starts, loc.float(), attn.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(value.float(), ss, starts, loc.float(), attn.float()),
                               rtol=1e-5, atol=1e-5)


def test_half_value_with_float_locations_returns_value_dtype():
    value, ss, starts, loc, attn = make_inputs(1, 5, 2, 4, [(4, 4), (2, 3)], 2)
    out = ms_deform_attn_pytorch(value.bfloat16(), ss, starts, loc.float(), attn.float())
    assert out.dtype == torch.bfloat16
    ref = reference(value.bfloat16().double(), ss, starts, loc.float(), attn.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_gradcheck_value_locations_weights():
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, 3, [(3, 4), (2, 3)], 2, spread=(-0.2, 1.2), seed=3)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)

    def fn(v, l, a):
        return ms_deform_attn_pytorch(v, ss, starts, l, a, [(3, 4), (2, 3)])

    # Random float64 locations are almost surely away from integer pixel coordinates,
    # where bilinear interpolation has kinks and finite differences would disagree.
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_shapes_list_given_or_derived_agree():
    shapes = [(5, 6), (3, 3), (2, 1)]
    value, ss, starts, loc, attn = make_inputs(2, 5, 2, 4, shapes, 3)
    a = ms_deform_attn_pytorch(value, ss, starts, loc, attn)
    b = ms_deform_attn_pytorch(value, ss, starts, loc, attn, spatial_shapes_list=shapes)
    c = ms_deform_attn(value, ss, starts, loc, attn, spatial_shapes_list=[list(s) for s in shapes])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_inconsistent_shapes_are_clear_errors():
    value, ss, starts, loc, attn = make_inputs(1, 2, 2, 4, [(3, 3), (2, 2)], 2)
    with pytest.raises(ValueError, match="add up to"):
        ms_deform_attn_pytorch(value[:, :-1], ss, starts, loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_pytorch(value, ss, starts, loc, attn[..., :1])


@pytest.fixture
def restore_impl(monkeypatch):
    monkeypatch.delenv("MSDA_IMPL", raising=False)
    yield monkeypatch
    ops.set_impl(None)


def test_dispatcher_on_cpu_equals_pytorch_path(restore_impl):
    value, ss, starts, loc, attn = make_inputs(2, 6, 2, 4, [(4, 5), (2, 3)], 2, dtype=torch.float32)
    assert ops.get_impl() == "auto"
    assert ops.active_impl(torch.device("cpu")) == "pytorch"
    assert torch.equal(ms_deform_attn(value, ss, starts, loc, attn),
                       ms_deform_attn_pytorch(value, ss, starts, loc, attn))


def test_forcing_pytorch_by_env_and_setter(restore_impl):
    value, ss, starts, loc, attn = make_inputs(1, 4, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    expected = ms_deform_attn_pytorch(value, ss, starts, loc, attn)
    restore_impl.setenv("MSDA_IMPL", "pytorch")
    assert ops.get_impl() == "pytorch" and ops.active_impl("cuda") == "pytorch"
    assert torch.equal(ms_deform_attn(value, ss, starts, loc, attn), expected)
    restore_impl.setenv("MSDA_IMPL", "auto")
    ops.set_impl("PyTorch")
    assert ops.get_impl() == "pytorch" and ops.active_impl("cuda") == "pytorch"
    ops.set_impl(None)
    assert ops.get_impl() == "auto"


def test_bad_impl_names_and_forced_cuda_on_cpu_fail_clearly(restore_impl):
    with pytest.raises(ValueError, match="expected one of"):
        ops.set_impl("tensorrt")
    restore_impl.setenv("MSDA_IMPL", "nonsense")
    with pytest.raises(ValueError, match="MSDA_IMPL"):
        ops.get_impl()
    restore_impl.setenv("MSDA_IMPL", "cuda")
    value, ss, starts, loc, attn = make_inputs(1, 2, 1, 2, [(2, 2)], 1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="forced to 'cuda'"):
        ms_deform_attn(value, ss, starts, loc, attn)


def test_fallback_warning_is_logged_once(restore_impl, caplog):
    """Without a usable compiled op or Triton, CUDA inputs fall back with exactly one log line.

    Exercised through ``active_impl('cuda')`` with the loaders' state patched, so it runs without a GPU.
    (tests/ops_triton_cases.py checks the order compiled op, Triton, PyTorch path.)
    """
    import ops._ext as ext
    import ops.dispatch as dispatch

    restore_impl.setattr(ext, "_tried", True)
    restore_impl.setattr(ext, "_module", None)
    restore_impl.setattr(ext, "_error", "test: pretend the build failed")
    restore_impl.setattr(dispatch, "_warned_fallback", False)
    restore_impl.setattr(dispatch, "triton_error", lambda device: "test: pretend Triton is missing")
    with caplog.at_level(logging.WARNING, logger="ops"):
        assert ops.active_impl("cuda") == "pytorch"
        assert ops.active_impl("cuda") == "pytorch"
    lines = [r for r in caplog.records if "PyTorch path" in r.getMessage()]
    assert len(lines) == 1 and "pretend the build failed" in lines[0].getMessage()
    assert "pretend Triton is missing" in lines[0].getMessage()
    restore_impl.setenv("MSDA_IMPL", "cuda")
    with pytest.raises(RuntimeError, match="unavailable"):
        ops.active_impl("cuda")


# ----------------------------------------------------------------------------------------------
# Level layout checked against value (same message for both paths), explicit backward


@pytest.fixture
def compiled_route(monkeypatch):
    """Route the dispatcher as if the compiled op were usable, so its host-side checks run on CPU.

    The registered op then runs its CPU kernel (the PyTorch path) where CUDA would run the kernels.
    """
    import ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_impl_for_device_type", lambda device_type: "cuda")
    return monkeypatch


def _pytorch_path_error(value, ss, starts, loc, attn, shapes):
    with pytest.raises(ValueError) as info:
        ms_deform_attn_pytorch(value, ss, starts, loc, attn, shapes)
    return str(info.value)


@pytest.mark.parametrize("change", ["fewer_tokens", "more_tokens", "bigger_level"])
def test_compiled_route_checks_level_sizes_like_pytorch_path(compiled_route, change):
    """Σ H·W ≠ Lin raises before any kernel runs, with the PyTorch path's exact message.

    ``spatial_shapes`` lives on the meta device, where reading its values is impossible: the check
    uses only the python list and tensor metadata, so on a GPU it cannot cause a device sync.
    """
    shapes = [(3, 4), (2, 3)]
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, 4, shapes, 2, dtype=torch.float32)
    if change == "fewer_tokens":  # Lin < Σ H·W: the kernels would read and scatter past value's end
        value = value[:, :-2]
    elif change == "more_tokens":
        value = torch.cat([value, value[:, :1]], 1)
    else:
        shapes = [(3, 4), (3, 3)]
        ss = torch.tensor(shapes)
    expected = _pytorch_path_error(value, ss, starts, loc, attn, shapes)
    assert "add up to" in expected
    with pytest.raises(ValueError) as info:
        ms_deform_attn(value, ss.to("meta"), starts, loc, attn, spatial_shapes_list=shapes)
    assert str(info.value) == expected


def test_compiled_route_with_consistent_levels_equals_pytorch_path(compiled_route):
    shapes = [(3, 4), (2, 3)]
    value, ss, starts, loc, attn = make_inputs(2, 5, 2, 4, shapes, 2, dtype=torch.float32)
    got = ms_deform_attn(value, ss, starts, loc, attn, spatial_shapes_list=shapes)
    assert torch.equal(got, ms_deform_attn_pytorch(value, ss, starts, loc, attn, shapes))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("need_grad_value", [True, False])
def test_explicit_backward_matches_autograd(dtype, need_grad_value):
    """The registered op's CPU backward (grid_sample's backward, replayed per level) equals autograd."""
    from ops.ms_deform_attn_pytorch import ms_deform_attn_pytorch_backward

    value, ss, starts, loc, attn = make_inputs(2, 7, 3, 5, [(5, 3), (3, 7), (1, 2)], 2, dtype=dtype,
                                               spread=(-0.3, 1.3), seed=5)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn_pytorch(leaves[0], ss, starts, leaves[1], leaves[2])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out.backward(grad_out)
    got = ms_deform_attn_pytorch_backward(value, ss, starts, loc, attn, grad_out, need_grad_value)
    if need_grad_value:
        torch.testing.assert_close(got[0], leaves[0].grad, rtol=1e-6, atol=1e-6)
    else:
        assert got[0] is None
    torch.testing.assert_close(got[1], leaves[1].grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2], leaves[2].grad, rtol=1e-6, atol=1e-6)
    assert all(g.is_contiguous() and g.dtype == dtype for g in got if g is not None)


def test_explicit_backward_without_channels_is_zero():
    """heads·C = 0 with samples present: location and weight gradients are the empty sum, zero."""
    from ops.ms_deform_attn_pytorch import ms_deform_attn_pytorch_backward

    value, ss, starts, loc, attn = make_inputs(1, 4, 2, 3, [(3, 3)], 2)
    value = value[..., :0]
    grad_out = torch.zeros(1, 4, 0, dtype=value.dtype)
    grad_value, grad_loc, grad_attn = ms_deform_attn_pytorch_backward(value, ss, starts, loc, attn, grad_out)
    assert grad_value.shape == value.shape
    assert grad_loc.shape == loc.shape and torch.count_nonzero(grad_loc) == 0
    assert grad_attn.shape == attn.shape and torch.count_nonzero(grad_attn) == 0
