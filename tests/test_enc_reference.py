"""Encoder reference points from the decoder (v3.0.1-v3.0.4) on hand-built maps, boxes and scores.

Maps are built exactly: with power-of-two level sizes a sample at a pixel centre puts its whole
weight on that pixel, so ``sampling_from_map`` turns any dense (bs, T, Q) map into decoder
sampling that reproduces it. The CPU benchmark of the guidance at COCO scale is
``scripts/bench_guidance.py``.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from models.cross_attn_map import cross_attention_map
from models.enc_reference import (CandidateSet, EncoderReferenceGenerator, build_enc_reference_generator,
                                  make_candidates)
from models.guidance import ColumnMap
from models.level_layout import LevelLayout
from tests.helpers import tiny_args

SHAPES = [(4, 4), (2, 2)]  # T = 20
T = 20


def layout(shapes=SHAPES):
    """spatial_shapes (L, 2), level_start_index (L,)."""
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = ss.prod(1)
    return ss, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def sampling_from_map(dense, shapes=SHAPES):
    """dense (bs, T, Q) -> locations (bs, Q, 1, L, Pmax, 2), weights (bs, Q, 1, L, Pmax) whose map is ``dense``.

    Point p of level l sits on pixel p's centre and carries that pixel's map weight.
    """
    bs, _, num_q = dense.shape
    levels, most = len(shapes), max(h * w for h, w in shapes)
    loc = torch.full((bs, num_q, 1, levels, most, 2), 0.5, dtype=dense.dtype)
    attn = torch.zeros(bs, num_q, 1, levels, most, dtype=dense.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        pix = torch.arange(h * w)
        centre = torch.stack([(pix % w + 0.5) / w, (pix // w + 0.5) / h], -1).to(dense.dtype)
        loc[:, :, 0, lvl, :h * w] = centre
        attn[:, :, 0, lvl, :h * w] = dense[:, start:start + h * w].transpose(1, 2)
        start += h * w
    return loc, attn


def observe_map(state, dense, candidates):
    """Feed one decoder layer whose cross-attention map is exactly ``dense`` (bs, T, Q)."""
    loc, attn = sampling_from_map(dense)
    state.observe(loc, attn, candidates)


def new_state(gen, bs=1, valid_ratios=None, padding_mask=None):
    ss, starts = layout()
    if valid_ratios is None:
        valid_ratios = torch.ones(bs, len(SHAPES), 2)
    return gen.new_state(LevelLayout(ss, SHAPES, starts, padding_mask, valid_ratios))


def stock_refs(bs=1, seed=0):
    """Stand-in stock references (bs, T, L, 2): the generator treats them as opaque."""
    return torch.rand(bs, T, len(SHAPES), 2, generator=torch.Generator().manual_seed(seed))


def loop_references(combined, cands, stock, valid_ratios, points, ref_keep_self, by_score):
    """Per-token python reference of per_point references: combined (bs, T, Q) -> (bs, T, L, P, 2)."""
    bs = stock.shape[0]
    out = stock[:, :, :, None, :].repeat(1, 1, 1, points, 1)
    first = 1 if ref_keep_self else 0
    for b in range(bs):
        for t in range(T):
            ranked = []
            for c in range(cands.count):
                w = float(combined[b, t, c])  # candidate c is query c
                if w > 0:
                    s = float(cands.scores[b, c])
                    ranked.append((-(w * s if by_score else w), -s, c))
            for p, (_, _, c) in enumerate(sorted(ranked)[:points - first]):
                out[b, t, :, first + p] = cands.boxes[b, c, :2] * valid_ratios[b]
    return out


# ----------------------------------------------------------------------------- hand-built scene

# four hybrid queries (two one-to-one, two one-to-many) on one image
BOXES = torch.tensor([[[0.2, 0.3, 0.1, 0.1], [0.6, 0.7, 0.2, 0.2], [0.4, 0.1, 0.1, 0.3], [0.9, 0.5, 0.2, 0.1]]])
SCORES = torch.tensor([[0.9, 0.3, 0.5, 0.7]])
VR = torch.tensor([[[0.5, 1.0], [0.75, 0.5]]])  # (bs, L, 2) valid (w, h) per level


def hand_map():
    """(1, T, 4): token 0 -> q1 .5, q0 .25, q3 .125; token 5 -> q2 only; token 3 -> a three-way tie; token 17 empty."""
    dense = torch.zeros(1, T, 4, dtype=torch.float64)
    dense[0, 0, [0, 1, 3]] = torch.tensor([0.25, 0.5, 0.125], dtype=torch.float64)
    dense[0, 5, 2] = 0.375
    dense[0, 3, [0, 1, 2]] = 0.25
    return dense


def hybrid_candidates(ref_queries="all", boxes=BOXES):
    logits = torch.logit(SCORES)[..., None].double()
    return make_candidates(logits, boxes, 2, ref_queries)


def centre(q, boxes=BOXES):
    """Query q's centre on both levels of the hand scene: (L, 2)."""
    return boxes[0, q, :2] * VR[0]


def run_hand(gen, candidates, dense=None, stock=None):
    state = new_state(gen, valid_ratios=VR)
    observe_map(state, hand_map() if dense is None else dense, candidates)
    return state.references(stock_refs() if stock is None else stock)


def test_sampling_from_map_is_exact():
    ss, starts = layout()
    loc, attn = sampling_from_map(hand_map())
    assert torch.equal(cross_attention_map(loc, attn, ss, starts), hand_map())


def test_v301_per_level_centres_in_score_order():
    gen = EncoderReferenceGenerator("per_level", n_levels=2, n_points=4, ref_rank="cls")
    stock = stock_refs()
    state = new_state(gen, valid_ratios=VR)
    with pytest.raises(RuntimeError, match="no decoder layer observed"):
        state.references(stock)  # the transformer guides only encoder layers after a decoder layer
    state.observe(None, None, hybrid_candidates())
    refs = state.references(stock)
    assert refs.shape == (1, T, 2, 2)
    # scores .9, .3, .5, .7: q0 on level 0, q3 on level 1, each times its level's valid ratio
    expected = torch.stack([BOXES[0, 0, :2] * VR[0, 0], BOXES[0, 3, :2] * VR[0, 1]])
    assert torch.allclose(refs, expected.expand(1, T, 2, 2))
    # v3.0.3-style restriction applies to per_level too: only q0, q1 may be picked
    gen_o2o = EncoderReferenceGenerator("per_level", 2, 4, "cls", ref_queries="o2o")
    state = new_state(gen_o2o, valid_ratios=VR)
    state.observe(None, None, hybrid_candidates("o2o"))
    expected = torch.stack([BOXES[0, 0, :2] * VR[0, 0], BOXES[0, 1, :2] * VR[0, 1]])
    assert torch.allclose(state.references(stock), expected.expand(1, T, 2, 2))


def test_v301_score_ties_keep_query_order():
    gen = EncoderReferenceGenerator("per_level", 2, 4, "cls")
    state = new_state(gen, valid_ratios=VR)
    state.observe(None, None, CandidateSet(BOXES, torch.tensor([[0.5, 0.8, 0.5, 0.8]])))
    refs = state.references(stock_refs())
    assert torch.allclose(refs[0, 0], torch.stack([centre(1)[0], centre(3)[1]]))


def test_v302_top_points_by_map_weight_with_fallback():
    gen = EncoderReferenceGenerator("per_point", n_levels=2, n_points=2, ref_rank="attn")
    stock = stock_refs()
    refs = run_hand(gen, hybrid_candidates(), stock=stock)
    assert refs.shape == (1, T, 2, 2, 2)
    assert torch.allclose(refs[0, 0, :, 0], centre(1)) and torch.allclose(refs[0, 0, :, 1], centre(0))
    # one candidate only: second slot is the token's own location on each level
    assert torch.allclose(refs[0, 5, :, 0], centre(2)) and torch.equal(refs[0, 5, :, 1], stock[0, 5])
    # weight tie .25 / .25 / .25: class score decides (q0 .9 > q2 .5 > q1 .3)
    assert torch.allclose(refs[0, 3, :, 0], centre(0)) and torch.allclose(refs[0, 3, :, 1], centre(2))
    # no weight at all: both points are the token itself
    assert torch.equal(refs[0, 17], stock[0, 17][:, None].expand(2, 2, 2))


def test_v302_attn_cls_ranking():
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="attn_cls")
    refs = run_hand(gen, hybrid_candidates())
    # token 0: q0 .25*.9 = .225 > q1 .5*.3 = .15 > q3 .125*.7
    assert torch.allclose(refs[0, 0, :, 0], centre(0)) and torch.allclose(refs[0, 0, :, 1], centre(1))


def test_v303_one_to_one_only_hybrid():
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="attn", ref_queries="o2o")
    stock = stock_refs()
    cands = gen.candidates(SimpleNamespace(logits=[torch.logit(SCORES)[..., None]], boxes=[BOXES],
                                           logits_one2many=[], boxes_one2many=[]), 2)
    assert cands.count == 2
    refs = run_hand(gen, cands, stock=stock)
    assert torch.allclose(refs[0, 0, :, 0], centre(1)) and torch.allclose(refs[0, 0, :, 1], centre(0))
    # token 5 only saw the one-to-many query q2, which may not be picked
    assert torch.equal(refs[0, 5], stock[0, 5][:, None].expand(2, 2, 2))


def test_v304_keep_self_first():
    gen = EncoderReferenceGenerator("per_point", 2, 3, ref_rank="attn", ref_keep_self=True)
    stock = stock_refs()
    refs = run_hand(gen, hybrid_candidates(), stock=stock)
    assert refs.shape == (1, T, 2, 3, 2)
    assert torch.equal(refs[:, :, :, 0], stock)
    assert torch.allclose(refs[0, 0, :, 1], centre(1)) and torch.allclose(refs[0, 0, :, 2], centre(0))
    assert torch.allclose(refs[0, 5, :, 1], centre(2)) and torch.equal(refs[0, 5, :, 2], stock[0, 5])


def test_padded_tokens_fall_back_to_themselves():
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="attn")
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, [0, 5]] = True  # the map does touch these tokens, but they are padding
    state = new_state(gen, valid_ratios=VR, padding_mask=mask)
    observe_map(state, hand_map(), hybrid_candidates())
    stock = stock_refs()
    refs = state.references(stock)
    for t in (0, 5):
        assert torch.equal(refs[0, t], stock[0, t][:, None].expand(2, 2, 2))
    assert torch.allclose(refs[0, 3, :, 0], centre(0))


MIXED_O2O_BOXES = torch.tensor([[[0.1, 0.2, 0.1, 0.1], [0.3, 0.4, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
MIXED_O2M_BOXES = torch.tensor([[[0.5, 0.6, 0.1, 0.1], [0.7, 0.8, 0.1, 0.1], [0.2, 0.9, 0.1, 0.1]]])
MIXED_O2O_SCORES, MIXED_O2M_SCORES = torch.tensor([[0.4, 0.8, 0.3]]), torch.tensor([[0.6, 0.1, 0.3]])


def mixed_candidates(ref_queries="all", per_query=True):
    """Three queries, each with a one-to-one and a one-to-many prediction (MS-DETR form)."""
    logit = lambda s: torch.logit(s)[..., None]  # noqa: E731
    return make_candidates(logit(MIXED_O2O_SCORES), MIXED_O2O_BOXES, 3, ref_queries, logit(MIXED_O2M_SCORES),
                           MIXED_O2M_BOXES, per_query=per_query)


def test_mixed_form_one_candidate_per_query():
    """Ranking by map weight ranks queries: query q is candidate q, with its better prediction's centre."""
    cands = mixed_candidates()
    assert cands.count == 3
    # q0: o2m .6 > o2o .4; q1: o2o .8 > o2m .1; q2: a tie .3 / .3 keeps the one-to-one prediction
    expected = torch.stack([MIXED_O2M_BOXES[0, 0], MIXED_O2O_BOXES[0, 1], MIXED_O2O_BOXES[0, 2]])[None]
    assert torch.equal(cands.boxes, expected)
    assert torch.allclose(cands.scores, torch.tensor([[0.6, 0.8, 0.3]]))
    dense = torch.zeros(1, T, 3, dtype=torch.float64)
    dense[0, 0] = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64)
    gen = EncoderReferenceGenerator("per_point", 2, 3, ref_rank="attn")
    stock = stock_refs()
    refs = run_hand(gen, cands, dense=dense, stock=stock)
    # token 0 saw two queries: two slots from them (never one query twice), the third falls back
    assert torch.allclose(refs[0, 0, :, 0], MIXED_O2M_BOXES[0, 0, :2] * VR[0])
    assert torch.allclose(refs[0, 0, :, 1], MIXED_O2O_BOXES[0, 1, :2] * VR[0])
    assert torch.equal(refs[0, 0, :, 2], stock[0, 0])
    # v3.0.3 in the mixed form: the one-to-one predictions only, same columns
    o2o = mixed_candidates("o2o")
    assert o2o.count == 3 and torch.equal(o2o.boxes, MIXED_O2O_BOXES)
    refs = run_hand(gen, o2o, dense=dense, stock=stock)
    assert torch.allclose(refs[0, 0, :, 0], MIXED_O2O_BOXES[0, 0, :2] * VR[0])
    assert torch.allclose(refs[0, 0, :, 1], MIXED_O2O_BOXES[0, 1, :2] * VR[0])


def test_mixed_form_per_level_ranks_predictions():
    """v3.0.1 ranks the 2Q predictions by class score, so one query may fill two levels (the notes' v3.0.1)."""
    cands = mixed_candidates(per_query=False)
    assert cands.count == 6
    assert torch.equal(cands.boxes, torch.cat([MIXED_O2O_BOXES, MIXED_O2M_BOXES], 1))
    gen = EncoderReferenceGenerator("per_level", 2, 4, "cls")
    state = new_state(gen, valid_ratios=VR)
    state.observe(None, None, cands)
    refs = state.references(stock_refs())
    # scores .4 .8 .3 | .6 .1 .3: q1's o2o (.8) on level 0, q0's o2m (.6) on level 1
    assert torch.allclose(refs[0, 0], torch.stack([MIXED_O2O_BOXES[0, 1, :2] * VR[0, 0],
                                                   MIXED_O2M_BOXES[0, 0, :2] * VR[0, 1]]))
    o2o = mixed_candidates("o2o", per_query=False)
    assert o2o.count == 3 and torch.equal(o2o.boxes, MIXED_O2O_BOXES)


def decode_queries(refs, centres):
    """refs (bs, T, L, P, 2) level-0 points -> (bs, T, P) query index whose centre it is, -1 if none."""
    points = refs[:, :, 0]  # (bs, T, P, 2)
    dist = (points[:, :, :, None, :] - centres[:, None, None, :, :]).abs().sum(-1)  # (bs, T, P, Q)
    best = dist.argmin(-1)
    return torch.where(dist.amin(-1) < 1e-6, best, -1)


@pytest.mark.parametrize("form", ["hybrid", "mixed"])
@pytest.mark.parametrize("rank", ["attn", "attn_cls"])
@pytest.mark.parametrize("accum", ["none", "sum", "max"])
def test_a_query_never_fills_two_slots(form, rank, accum):
    """Random dense maps over 3 layers, P = 4: the valid slots of a token are distinct queries."""
    g = torch.Generator().manual_seed(7)
    bs, num_q, points = 2, 5, 4
    # distinct centres per query and prediction, away from any token location
    o2o_boxes = torch.cat([torch.rand(bs, num_q, 2, generator=g) * 0.5 + 0.25, torch.full((bs, num_q, 2), 0.1)], -1)
    o2m_boxes = torch.cat([torch.rand(bs, num_q, 2, generator=g) * 0.5 + 0.25, torch.full((bs, num_q, 2), 0.1)], -1)
    logits = torch.randn(bs, num_q, 3, generator=g)
    if form == "mixed":
        cands = make_candidates(logits, o2o_boxes, num_q, "all", torch.randn(bs, num_q, 3, generator=g), o2m_boxes)
    else:
        cands = make_candidates(logits, o2o_boxes, 2, "all")
    gen = EncoderReferenceGenerator("per_point", 2, points, ref_rank=rank, attn_map_accum=accum)
    state = new_state(gen, bs=bs)
    stock = stock_refs(bs)
    for _ in range(3):
        observe_map(state, torch.rand(bs, T, num_q, generator=g).double(), cands)
    queries = decode_queries(state.references(stock), cands.boxes[..., :2])
    valid = queries >= 0
    assert int(valid.sum()) == bs * T * points  # every token saw every query: all slots filled
    for b in range(bs):
        for t in range(T):
            picked = queries[b, t][valid[b, t]].tolist()
            assert len(picked) == len(set(picked))


def test_candidates_from_decoder_state_shapes():
    bs, q_o2o, q_o2m, classes = 2, 3, 5, 4
    logits = torch.randn(bs, q_o2o + q_o2m, classes)
    boxes = torch.rand(bs, q_o2o + q_o2m, 4)
    hybrid = SimpleNamespace(logits=[logits], boxes=[boxes], logits_one2many=[], boxes_one2many=[])
    for ref_queries, count in (("all", q_o2o + q_o2m), ("o2o", q_o2o)):
        gen = EncoderReferenceGenerator("per_point", 2, 2, ref_queries=ref_queries)
        cands = gen.candidates(hybrid, q_o2o)
        assert cands.boxes.shape == (bs, count, 4) and cands.scores.shape == (bs, count)
        assert torch.equal(cands.boxes, boxes[:, :count])
        assert torch.allclose(cands.scores, logits[:, :count].sigmoid().amax(-1))
    mixed = SimpleNamespace(logits=[logits[:, :q_o2o]], boxes=[boxes[:, :q_o2o]],
                            logits_one2many=[logits[:, q_o2o:2 * q_o2o]], boxes_one2many=[boxes[:, q_o2o:2 * q_o2o]])
    for mode, rank, ref_queries, count in (("per_point", "attn", "all", q_o2o), ("per_point", "attn", "o2o", q_o2o),
                                           ("per_level", "cls", "all", 2 * q_o2o), ("per_level", "cls", "o2o", q_o2o)):
        gen = EncoderReferenceGenerator(mode, 2, 2, ref_rank=rank, ref_queries=ref_queries)
        assert gen.candidates(mixed, q_o2o).boxes.shape == (bs, count, 4)
    # inference: only what runs at inference reaches the generator
    inference = SimpleNamespace(logits=[logits[:, :q_o2o]], boxes=[boxes[:, :q_o2o]], logits_one2many=[],
                                boxes_one2many=[])
    assert EncoderReferenceGenerator("per_point", 2, 2).candidates(inference, q_o2o).count == q_o2o


def test_accumulation_modes_change_ranking():
    """layer 1: q0 .5, q1 .3; layer 2: q0 .0625, q1 .3, q2 .4375 on token 0 -> none q2, sum q1, max q0."""
    first = torch.zeros(1, T, 3, dtype=torch.float64)
    second = torch.zeros(1, T, 3, dtype=torch.float64)
    first[0, 0, :2] = torch.tensor([0.5, 0.3], dtype=torch.float64)
    second[0, 0] = torch.tensor([0.0625, 0.3, 0.4375], dtype=torch.float64)
    cands = CandidateSet(BOXES[:, :3], SCORES[:, :3], columns=ColumnMap(3))  # map column q is candidate q
    winners = {}
    for accum in ("none", "sum", "max"):
        gen = EncoderReferenceGenerator("per_point", 2, 1, ref_rank="attn", attn_map_accum=accum)
        state = new_state(gen, valid_ratios=VR)
        stock = stock_refs()
        observe_map(state, first, cands)
        after_first = state.references(stock)
        assert torch.allclose(after_first[0, 0, :, 0], centre(0))
        observe_map(state, second, cands)
        refs = state.references(stock)
        winners[accum] = next(q for q in range(3) if torch.allclose(refs[0, 0, :, 0], centre(q)))
    assert winners == {"none": 2, "sum": 1, "max": 0}


@pytest.mark.parametrize("rank", ["attn", "attn_cls"])
@pytest.mark.parametrize("keep_self", [False, True])
@pytest.mark.parametrize("accum", ["none", "sum", "max"])
@pytest.mark.parametrize("form", ["hybrid_all", "hybrid_o2o", "mixed_all"])
def test_per_point_matches_loop_reference(rank, keep_self, accum, form):
    """Random quantised maps (many exact ties) over 3 layers, 2 padded images, valid ratios != 1."""
    g = torch.Generator().manual_seed(hash((rank, keep_self, accum, form)) % 1000)
    bs, num_q, points = 2, 6, 4
    vr = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.75, 0.5], [0.5, 0.5]]])
    mask = torch.zeros(bs, T, dtype=torch.bool)
    mask[1, [3, 7, 11, 15, 19]] = True
    # quantised scores give exact ties; the mixed form's two predictions per query become one candidate
    quantised_logits = lambda n: torch.logit(torch.randint(1, 5, (bs, n, 1), generator=g) / 8)  # noqa: E731
    if form == "mixed_all":
        cands = make_candidates(quantised_logits(num_q), torch.rand(bs, num_q, 4, generator=g), num_q, "all",
                                quantised_logits(num_q), torch.rand(bs, num_q, 4, generator=g))
    else:
        cands = make_candidates(quantised_logits(num_q), torch.rand(bs, num_q, 4, generator=g), 2,
                                "o2o" if form == "hybrid_o2o" else "all")
    # sigmoid(logit(k / 8)) in float32 may be off by an ulp: snap back so products tie exactly
    cands = dataclasses.replace(cands, scores=cands.scores.mul(8).round().div(8))
    gen = EncoderReferenceGenerator("per_point", 2, points, ref_rank=rank, ref_keep_self=keep_self,
                                    attn_map_accum=accum)
    state = new_state(gen, bs=bs, valid_ratios=vr, padding_mask=mask)
    stock = stock_refs(bs)
    layers = []
    for _ in range(3):
        # weights in {0, 1/8, ..., 3/8}, mostly zero: sparse maps with exact float ties
        dense = torch.randint(0, 4, (bs, T, num_q), generator=g).double() / 8
        dense = dense * (torch.rand(bs, T, num_q, generator=g) < 0.4)
        layers.append(dense.masked_fill(mask[:, :, None], 0.0))
        observe_map(state, dense, cands)
        stack = torch.stack(layers)
        combined = {"none": stack[-1], "sum": stack.sum(0), "max": stack.amax(0)}[accum]
        expected = loop_references(combined, cands, stock, vr, points, keep_self, rank == "attn_cls")
        refs = state.references(stock)
        assert refs.shape == (bs, T, 2, points, 2)
        assert torch.allclose(refs, expected)


@pytest.mark.parametrize("mode", ["per_level", "per_point"])
def test_gradient_reaches_boxes_only_with_ref_grad(mode):
    rank = "cls" if mode == "per_level" else "attn"
    dense = hand_map()
    loc, attn = sampling_from_map(dense)
    loc.requires_grad_()
    attn.requires_grad_()
    logits = torch.logit(SCORES)[..., None].double().requires_grad_()
    for ref_grad in (False, True):
        boxes = BOXES.clone().requires_grad_()
        gen = EncoderReferenceGenerator(mode, 2, 2, ref_rank=rank, ref_grad=ref_grad)
        state = new_state(gen, valid_ratios=VR)
        state.observe(loc, attn, make_candidates(logits, boxes, 2, "all"))
        refs = state.references(stock_refs())
        if not ref_grad:
            assert not refs.requires_grad
            continue
        grads = torch.autograd.grad(refs.sum(), [boxes, loc, attn, logits], allow_unused=True)
        assert grads[0] is not None and float(grads[0][..., :2].abs().sum()) > 0
        assert float(grads[0][..., 2:].abs().sum()) == 0  # only the centres are used
        assert all(g is None for g in grads[1:])


def test_generator_has_no_parameters_and_validates():
    gen = EncoderReferenceGenerator("per_point", 4, 4, "attn_cls", ref_keep_self=True, attn_map_accum="max")
    assert list(gen.parameters()) == [] and gen.state_dict() == {}
    assert gen.needs_map and not EncoderReferenceGenerator("per_level", 4, 4, "cls").needs_map
    for bad in (dict(enc_ref_mode="per_level", ref_rank="attn"), dict(enc_ref_mode="per_point", ref_rank="cls"),
                dict(enc_ref_mode="per_level", ref_rank="cls", ref_keep_self=True), dict(enc_ref_mode="sideways"),
                dict(enc_ref_mode="per_point", attn_map_accum="median"),
                dict(enc_ref_mode="per_point", ref_queries="o2m"),
                dict(enc_ref_mode="per_level", ref_rank="cls", attn_map_accum="sum"),
                dict(enc_ref_mode="per_point", ref_keep_self=True, n_points=1)):
        kwargs = dict(n_levels=4, n_points=4)
        kwargs.update(bad)
        with pytest.raises(ValueError, match="--"):  # the message names the flags
            EncoderReferenceGenerator(**kwargs)
    with pytest.raises(ValueError):
        new_state(EncoderReferenceGenerator("per_point", 2, 2)).observe(None, None, hybrid_candidates())
    args = SimpleNamespace(enc_ref_mode="per_point", num_feature_levels=4, enc_n_points=4, ref_rank="attn",
                           ref_keep_self=True, ref_grad=False, attn_map_accum="sum", ref_queries="o2o",
                           ref_source="decoder")
    built = build_enc_reference_generator(args)
    assert (built.ref_keep_self, built.attn_map_accum, built.ref_queries, built.n_points) == (True, "sum", "o2o", 4)


@pytest.mark.parametrize("flags,kwargs", [
    (["--variant", "v3.0.1", "--ref_rank", "attn"], dict(enc_ref_mode="per_level", ref_rank="attn")),
    (["--variant", "v3.0.2", "--ref_rank", "cls"], dict(enc_ref_mode="per_point", ref_rank="cls")),
    (["--variant", "v3.0.1", "--attn_map_accum", "sum"],
     dict(enc_ref_mode="per_level", ref_rank="cls", attn_map_accum="sum")),
    (["--variant", "v3.0.1", "--ref_keep_self"], dict(enc_ref_mode="per_level", ref_rank="cls", ref_keep_self=True)),
    (["--variant", "v3.0.4", "--enc_n_points", "1"], dict(enc_ref_mode="per_point", ref_keep_self=True, n_points=1)),
])
def test_parser_and_generator_reject_with_the_same_rule(flags, kwargs):
    """Each combination rule is written once: the parser's error is the generator's, prefixed."""
    with pytest.raises(ValueError) as from_parser:
        tiny_args(*flags)
    with pytest.raises(ValueError) as from_generator:
        EncoderReferenceGenerator(**{"n_levels": 4, "n_points": 4, **kwargs})
    assert str(from_parser.value) == f"invalid configuration: {from_generator.value}"


def test_references_cached_until_next_observe():
    gen = EncoderReferenceGenerator("per_point", 2, 2, "attn")
    state = new_state(gen, valid_ratios=VR)
    stock = stock_refs()
    observe_map(state, hand_map(), hybrid_candidates())
    first = state.references(stock)
    assert state.references(stock) is first
    observe_map(state, torch.zeros(1, T, 4, dtype=torch.float64), hybrid_candidates())
    assert torch.equal(state.references(stock), stock[:, :, :, None].expand(1, T, 2, 2, 2))


def test_guidance_benchmark_script_runs_at_a_tiny_size(capsys):
    """scripts/bench_guidance.py stays runnable: every measurement at a toy size (not a timing)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_guidance.py"
    spec = importlib.util.spec_from_file_location("bench_guidance", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = bench.benchmark(bs=1, num_q=3, heads=2, points=2, channels=4, repeats=0, layers=2, shapes=SHAPES, ffn=8)
    assert len(times) == 4 + 3 * 2  # operator, module, decoder layer, footprint; 3 accum modes x {1, 2} layers
    assert all(ms >= 0 for ms in times.values())
    assert "v3.0.4 accum=max: observe x2 + references" in capsys.readouterr().out
