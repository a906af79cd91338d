"""The cross-attention map (dense reference, sparse footprint, layer accumulation) against the operator."""
import pytest
import torch

from models.cross_attn_map import (CrossAttnMapAccumulator, attention_footprint, cross_attention_map,
                                   footprint_to_dense, reduce_rows)
from models.level_layout import LevelLayout
from ops import ms_deform_attn_pytorch

SHAPES = [(6, 5), (3, 4), (2, 2)]


def level_layout(shapes):
    """[(H, W), ...] -> spatial_shapes (L, 2), level_start_index (L,), T."""
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = ss.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return ss, starts, int(sizes.sum())


def padding_for(shapes, valid_fraction):
    """Per image (w, h) valid fractions -> (bs, T) bool mask, True right of / below the valid part of each level."""
    masks = []
    for frac_w, frac_h in valid_fraction:
        per_level = []
        for h, w in shapes:
            valid_w, valid_h = max(1, round(frac_w * w)), max(1, round(frac_h * h))
            m = torch.ones(h, w, dtype=torch.bool)
            m[:valid_h, :valid_w] = False
            per_level.append(m.reshape(-1))
        masks.append(torch.cat(per_level))
    return torch.stack(masks)


def random_sampling(bs, num_q, heads, shapes, points, dtype=torch.float64, seed=0, spread=(-0.25, 1.25)):
    """Locations uniform in ``spread`` (some outside the map) and per-head normalised weights."""
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    lo, hi = spread
    loc = torch.rand(bs, num_q, heads, levels, points, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(bs, num_q, heads, levels, points, generator=g, dtype=dtype)
    return loc, attn / attn.sum((-1, -2), keepdim=True)


def loop_map(loc, attn, shapes, padding_mask=None):
    """Float64 per-sample loop: explicit bilinear corners, pixel x = loc_x * W - 0.5. -> (bs, heads, T, Q)."""
    ss, starts, total = level_layout(shapes)
    bs, num_q, heads, levels, points, _ = loc.shape
    dense = torch.zeros(bs, heads, total, num_q, dtype=torch.float64)
    for b in range(bs):
        for q in range(num_q):
            for h in range(heads):
                for lvl, (height, width) in enumerate(shapes):
                    for p in range(points):
                        x = float(loc[b, q, h, lvl, p, 0]) * width - 0.5
                        y = float(loc[b, q, h, lvl, p, 1]) * height - 0.5
                        a = float(attn[b, q, h, lvl, p])
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= cx < width and 0 <= cy < height:
                                t = int(starts[lvl]) + cy * width + cx
                                if padding_mask is not None and padding_mask[b, t]:
                                    continue
                                dense[b, h, t, q] += a * (1 - abs(x - cx)) * (1 - abs(y - cy))
    return dense


@pytest.fixture(scope="module")
def case():
    """bs 2 (image 1 padded), 7 queries, 3 heads, 3 levels, 3 points, float64."""
    ss, starts, total = level_layout(SHAPES)
    loc, attn = random_sampling(2, 7, 3, SHAPES, 3)
    mask = padding_for(SHAPES, [(1.0, 1.0), (0.6, 0.5)])
    return dict(ss=ss, starts=starts, total=total, loc=loc, attn=attn, mask=mask,
                layout=LevelLayout(ss, SHAPES, starts, mask), unpadded=LevelLayout(ss, SHAPES, starts))


def test_footprint_layout_and_corner_order():
    """K = heads*levels*points*4 ordered (head, level, point, corner); corner = 2*dy + dx."""
    ss, starts, _ = level_layout([(4, 4), (2, 2)])
    layout = LevelLayout(ss, [(4, 4), (2, 2)], starts)
    loc = torch.zeros(1, 1, 2, 2, 1, 2, dtype=torch.float64)
    # head 0, level 0: pixel coords (1.25, 2.5) -> x0 1, y0 2; head 1, level 1: (0.5, 0.0)
    loc[0, 0, 0, 0, 0] = torch.tensor([(1.25 + 0.5) / 4, (2.5 + 0.5) / 4])
    loc[0, 0, 1, 1, 0] = torch.tensor([(0.5 + 0.5) / 2, (0.0 + 0.5) / 2])
    attn = torch.ones(1, 1, 2, 2, 1, dtype=torch.float64)
    tokens, weights = attention_footprint(loc, attn, layout)
    assert tokens.shape == weights.shape == (1, 1, 2 * 2 * 1 * 4)
    assert tokens.dtype == torch.int64
    k_head, k_level = 2 * 1 * 4, 1 * 4
    level0 = slice(0, 4)
    assert tokens[0, 0, level0].tolist() == [2 * 4 + 1, 2 * 4 + 2, 3 * 4 + 1, 3 * 4 + 2]
    assert torch.allclose(weights[0, 0, level0], torch.tensor([0.75 * 0.5, 0.25 * 0.5, 0.75 * 0.5, 0.25 * 0.5],
                                                               dtype=torch.float64))
    h1l1 = slice(k_head + k_level, k_head + k_level + 4)
    assert tokens[0, 0, h1l1].tolist() == [16 + 0, 16 + 1, 16 + 2, 16 + 3]
    assert torch.allclose(weights[0, 0, h1l1], torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_footprint_outside_corners_zero_and_indices_valid(case):
    tokens, weights = attention_footprint(case["loc"], case["attn"], case["layout"])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < case["total"]
    assert bool((weights >= 0).all())
    far = case["loc"].clone()
    far[..., 0] = 5.0  # every sample far right of every level
    _, weights_far = attention_footprint(far, case["attn"], case["unpadded"])
    assert bool((weights_far == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diverged_locations_contribute_nothing(case, dtype):
    """inf, -inf, NaN and +-1e30 locations (a diverged model) add no weight and never break the index."""
    loc, attn = case["loc"].to(dtype).clone(), case["attn"].to(dtype)
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    values = [float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 1e19]
    for i, value in enumerate(values):  # one bad sample (x or y) per query and value
        bad[0, i, i % 3, i % 3, i % 3] = True
        loc[0, i, i % 3, i % 3, i % 3, i % 2] = value
    bad[1, :, 0, 1] = True  # and a whole level of image 1, both coordinates
    loc[1, :, 0, 1] = float("nan")
    tokens, weights = attention_footprint(loc, attn, case["layout"])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < case["total"]
    dense = cross_attention_map(loc, attn, case["ss"], case["starts"], case["mask"])
    without = cross_attention_map(loc.masked_fill(bad[..., None], 0.5), attn.masked_fill(bad, 0.0), case["ss"],
                                  case["starts"], case["mask"])
    assert torch.equal(dense, without)
    # finite far-away samples: the operator agrees (it reads zeros there)
    far = case["loc"].to(dtype).clone()
    far[0, :, 0, 0, 0] = torch.tensor([1e30, -1e30], dtype=dtype)
    value = torch.randn(2, case["total"], 3, 4, dtype=dtype).masked_fill(case["mask"][:, :, None, None], 0.0)
    out = ms_deform_attn_pytorch(value, case["ss"], case["starts"], far, attn).view(2, 7, 3, 4)
    per_head = cross_attention_map(far, attn, case["ss"], case["starts"], case["mask"], per_head=True)
    assert torch.allclose(torch.einsum("bhtq,bthc->bqhc", per_head, value), out, atol=1e-5)


def test_dense_map_matches_loop_reference(case):
    dense = cross_attention_map(case["loc"], case["attn"], case["ss"], case["starts"], case["mask"], per_head=True)
    expected = loop_map(case["loc"], case["attn"], SHAPES, case["mask"])
    assert dense.shape == (2, 3, case["total"], 7)
    assert torch.allclose(dense, expected, atol=1e-12)
    summed = cross_attention_map(case["loc"], case["attn"], case["ss"], case["starts"], case["mask"])
    assert summed.shape == (2, case["total"], 7)
    assert torch.allclose(summed, expected.sum(1), atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_map_reproduces_operator_per_head(case, dtype, atol):
    """Sum_t M_h[t, q] V_h[t] is the operator's output for (q, h): the map is what the decoder read."""
    g = torch.Generator().manual_seed(1)
    channels = 4
    value = torch.randn(2, case["total"], 3, channels, generator=g, dtype=torch.float64)
    value = value.masked_fill(case["mask"][:, :, None, None], 0.0)  # MSDeformAttn zeroes padded values
    value, loc, attn = value.to(dtype), case["loc"].to(dtype), case["attn"].to(dtype)
    out = ms_deform_attn_pytorch(value, case["ss"], case["starts"], loc, attn).view(2, 7, 3, channels)
    dense = cross_attention_map(loc, attn, case["ss"], case["starts"], case["mask"], per_head=True)
    from_map = torch.einsum("bhtq,bthc->bqhc", dense.to(dtype), value)
    assert torch.allclose(from_map, out, atol=atol)


def test_map_mass_is_attention_minus_outside_and_padding(case):
    dense = cross_attention_map(case["loc"], case["attn"], case["ss"], case["starts"], case["mask"])
    lost = loop_map(case["loc"], case["attn"], SHAPES, None) - loop_map(case["loc"], case["attn"], SHAPES,
                                                                         case["mask"])
    # weight on the map without the mask = sum of a minus what fell outside (loop reference counts corners)
    unmasked = cross_attention_map(case["loc"], case["attn"], case["ss"], case["starts"])
    outside = case["attn"].sum((2, 3, 4)) - unmasked.sum(1)
    assert bool((outside > 1e-3).any()), "the random samples should leave the map sometimes"
    expected = case["attn"].sum((2, 3, 4)) - outside - lost.sum((1, 2))
    assert torch.allclose(dense.sum(1), expected, atol=1e-12)
    # and the outside weight itself, from the explicit corner loop
    assert torch.allclose(unmasked.sum(1), loop_map(case["loc"], case["attn"], SHAPES).sum((1, 2)), atol=1e-12)


def test_padded_tokens_receive_nothing(case):
    dense = cross_attention_map(case["loc"], case["attn"], case["ss"], case["starts"], case["mask"])
    assert bool(case["mask"][1].any())
    assert bool((dense[1][case["mask"][1]] == 0).all())
    unmasked = cross_attention_map(case["loc"], case["attn"], case["ss"], case["starts"])
    assert float(unmasked[1][case["mask"][1]].sum()) > 0  # the mask, not luck, keeps them empty


def test_reduce_rows_merges_repeats():
    tokens = torch.tensor([[[3, 1, 3, 0, 1, 3]]])
    weights = torch.tensor([[[0.5, 0.25, 0.125, 0.0, 0.5, 1.0]]])
    merged_t, merged_w = reduce_rows(tokens, weights, "sum")
    assert merged_t[..., :3].tolist() == [[[0, 1, 3]]]
    assert merged_w.tolist() == [[[0.0, 0.75, 1.625, 0.0, 0.0, 0.0]]]
    _, max_w = reduce_rows(tokens, weights, "max")
    assert max_w.tolist() == [[[0.0, 0.5, 1.0, 0.0, 0.0, 0.0]]]


@pytest.mark.parametrize("mode", ["none", "sum", "max"])
def test_accumulator_matches_dense_combination(case, mode):
    acc = CrossAttnMapAccumulator(mode)
    dense_layers = []
    for layer in range(3):
        loc, attn = random_sampling(2, 7, 3, SHAPES, 3, seed=10 + layer)
        dense_layers.append(cross_attention_map(loc, attn, case["ss"], case["starts"], case["mask"]))
        acc.add(*attention_footprint(loc, attn, case["layout"]))
        stack = torch.stack(dense_layers)
        expected = {"none": stack[-1], "sum": stack.sum(0), "max": stack.amax(0)}[mode]
        assert len(acc) == layer + 1
        assert torch.allclose(acc.dense(case["total"]), expected, atol=1e-12)
        tokens, weights = acc.combined()
        # every (query, token) appears at most once with weight
        hits = footprint_to_dense(tokens, (weights > 0).double(), case["total"])
        assert float(hits.max()) <= 1.0


def test_accumulator_stores_detached_and_rejects_bad_use(case):
    loc = case["loc"].clone().requires_grad_()
    attn = case["attn"].clone().requires_grad_()
    acc = CrossAttnMapAccumulator("sum")
    with pytest.raises(RuntimeError):
        acc.combined()
    acc.add(*attention_footprint(loc, attn, case["unpadded"]))
    assert not acc.combined()[1].requires_grad
    with pytest.raises(ValueError):
        acc.add(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        CrossAttnMapAccumulator("median")
