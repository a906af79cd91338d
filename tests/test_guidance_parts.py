"""Guidance as registered parts: the registry, the oracle source (gt) with both of its rankings, the
random ranking, the distance ranking, and the rules that combine them -- on hand-built scenes.

The map of a decoder layer is built exactly from a dense (bs, T, Q) tensor (``sampling_from_map``
of test_enc_reference); ground-truth boxes, queries and valid ratios are chosen by hand, so every
expected reference is a GT centre times a level's valid ratio, compared with ``torch.equal``.
"""
from types import SimpleNamespace

import pytest
import torch

from cli.config import get_args_parser
from models.deformable_transformer import encoder_reference_points
from models.enc_reference import EncoderReferenceGenerator
from models.guidance import RANKINGS, SOURCES, GuidanceInputs, guidance_inputs, make_candidates
from models.guidance.sources import assign_to_best_box
from models.level_layout import LevelLayout
from models.stages import guided_encoder_layers, parse_stages
from tests.helpers import tiny_args
from tests.test_enc_reference import SHAPES, T, sampling_from_map

VR = torch.tensor([[[0.5, 1.0], [0.75, 0.5]]])  # (1, L, 2) valid (w, h) per level
# two GT boxes and a padding row (valid False) whose box would catch query 2 if it were read
GT = torch.tensor([[[0.25, 0.25, 0.3, 0.3], [0.7, 0.7, 0.2, 0.2], [0.9, 0.1, 0.05, 0.05]]])
GT_VALID = torch.tensor([[True, True, False]])
# decoder queries: q0 ~ GT0, q1 ~ GT1, q2 overlaps no valid GT box, q3 overlaps GT0 only (IoU 0.29)
QUERIES = torch.tensor([[[0.26, 0.25, 0.3, 0.3], [0.7, 0.72, 0.2, 0.2], [0.9, 0.1, 0.05, 0.05],
                         [0.35, 0.35, 0.3, 0.3]]])


def gt_centre(g, level):
    return GT[0, g, :2] * VR[0, level]


def decoder_state(boxes=QUERIES):
    logits = torch.zeros(boxes.shape[0], boxes.shape[1], 3)
    return SimpleNamespace(logits=[logits], boxes=[boxes], logits_one2many=[], boxes_one2many=[])


def scene_layout(padding_mask=None):
    return LevelLayout.from_shapes(SHAPES, padding_mask=padding_mask, valid_ratios=VR)


def guided_references(gen, inputs, dense=None, layout=None, picks=None):
    """One decoder layer (map ``dense`` (1, T, 4)) observed, then the references of the stock grid."""
    layout = layout or scene_layout()
    state = gen.new_state(layout, inputs)
    if dense is None:
        state.observe(None, None, gen.candidates(decoder_state(), 4, inputs))
    else:
        state.observe(*sampling_from_map(dense), gen.candidates(decoder_state(), 4, inputs))
    if picks is not None:
        gen.picks_listener = picks.append
    stock = encoder_reference_points(layout)
    return state.references(stock), stock


def oracle_inputs(seed=None):
    return GuidanceInputs(GT.clone(), GT_VALID.clone(), seed)


# ----------------------------------------------------------------------------- registry and rules

def test_registry_rejects_an_unknown_name_listing_the_choices():
    with pytest.raises(ValueError) as error:
        RANKINGS.get("nearest")
    assert str(error.value) == ("--ref_rank: unknown ranking rule 'nearest'; choose from "
                                "cls, attn, attn_cls, random, distance")
    with pytest.raises(ValueError, match="--ref_source: unknown candidate source 'oracle'; choose from decoder, gt"):
        SOURCES.get("oracle")
    with pytest.raises(ValueError, match="choose from decoder, gt"):
        EncoderReferenceGenerator("per_point", 2, 2, ref_source="oracle")


def test_the_parser_takes_its_choices_from_the_registry():
    actions = {a.dest: a for a in get_args_parser()._actions}
    assert tuple(actions["ref_rank"].choices) == RANKINGS.names() == ("cls", "attn", "attn_cls", "random", "distance")
    assert tuple(actions["ref_source"].choices) == SOURCES.names() == ("decoder", "gt")
    assert actions["ref_source"].default == "decoder"


@pytest.mark.parametrize("flags,named", [
    (["--variant", "v3.0.4_gt", "--ref_rank", "attn_cls"], ["--ref_rank attn_cls", "--ref_source gt"]),
    (["--variant", "v3.0.4_gt", "--ref_grad"], ["--ref_grad", "--ref_source gt"]),
    (["--variant", "v3.0.4_gt_distance", "--attn_map_accum", "sum"], ["--attn_map_accum", "--ref_rank distance"]),
    (["--variant", "v3.0.4_random", "--attn_map_accum", "max"], ["--attn_map_accum", "--ref_rank random"]),
    (["--variant", "v3.0.4_gt_distance", "--ref_queries", "o2o"], ["--ref_queries", "--ref_source gt"]),
    (["--variant", "v3.0.4_gt_distance", "--use_ms_detr", "--no-ref_eval_one2many"],
     ["--no-ref_eval_one2many", "--ref_rank distance"]),
    (["--variant", "v3.0.1", "--ref_rank", "random"], ["--enc_ref_mode per_level", "--ref_rank cls"]),
    (["--variant", "v3.0.1", "--ref_source", "gt"], ["--ref_rank cls", "--ref_source gt"]),
    (["--variant", "cascade", "--ref_source", "gt"], ["--ref_source", "--enc_ref_mode"]),
])
def test_combinations_that_cannot_work_are_configuration_errors(flags, named):
    with pytest.raises(ValueError) as error:
        tiny_args(*flags)
    assert all(name in str(error.value) for name in named), str(error.value)


@pytest.mark.parametrize("variant", ["v3.0.4_gt", "v3.0.4_gt_distance", "v3.0.4_random"])
def test_control_presets_parse(variant):
    args = tiny_args("--variant", variant)
    assert (args.enc_ref_mode, args.ref_keep_self) == ("per_point", True)
    assert args.ref_source == ("gt" if "gt" in variant else "decoder")


def test_distance_ranks_decoder_candidates_too():
    """The distance rule is generic over the candidates, so the decoder source may use it."""
    args = tiny_args("--variant", "v3.0.4", "--ref_rank", "distance")
    assert (args.ref_source, args.ref_rank) == ("decoder", "distance")


def test_guided_encoder_layers_is_the_schedule_rule():
    assert guided_encoder_layers(parse_stages("stock", 6, 6)) == []
    assert guided_encoder_layers(parse_stages("cascade", 3, 3)) == [1, 2]
    assert guided_encoder_layers(parse_stages("0:1,2:1,1:1", 3, 3)) == [0, 1, 2]
    assert guided_encoder_layers(parse_stages("2:0,1:1,1:1", 4, 2)) == [3]


def test_guidance_inputs_only_when_needed():
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, {"boxes": torch.zeros(0, 4)},
               {"boxes": torch.tensor([[0.1, 0.2, 0.1, 0.1], [0.3, 0.4, 0.2, 0.2]])}]
    assert guidance_inputs(tiny_args("--variant", "v3.0.4"), targets, (0,)) is None
    assert guidance_inputs(tiny_args("--variant", "cascade"), targets, (0,)) is None
    assert guidance_inputs(None, targets, (0,)) is None
    oracle = guidance_inputs(tiny_args("--variant", "v3.0.4_gt"), targets, (0,))
    assert oracle.seed is None and oracle.gt_boxes.shape == (3, 2, 4)
    assert oracle.gt_valid.tolist() == [[True, False], [False, False], [True, True]]
    assert torch.equal(oracle.gt_boxes[2], targets[2]["boxes"]) and torch.equal(oracle.gt_boxes[1], torch.zeros(2, 4))
    random = guidance_inputs(tiny_args("--variant", "v3.0.4_random"), targets, (7, 1, 2))
    assert random.gt_boxes is None and random.seed == guidance_inputs(tiny_args("--variant", "v3.0.4_random"),
                                                                       None, (7, 1, 2)).seed
    assert random.seed != guidance_inputs(tiny_args("--variant", "v3.0.4_random"), None, (7, 1, 3)).seed
    with pytest.raises(ValueError, match="--ref_source gt reads the ground-truth boxes"):
        guidance_inputs(tiny_args("--variant", "v3.0.4_gt"), None, (0,))


def test_a_model_that_needs_inputs_says_so():
    gen = EncoderReferenceGenerator("per_point", 2, 3, ref_source="gt", ref_keep_self=True)
    with pytest.raises(ValueError, match="reads the ground truth: call the model with guidance="):
        gen.new_state(scene_layout())
    gen = EncoderReferenceGenerator("per_point", 2, 3, ref_rank="random", ref_keep_self=True)
    with pytest.raises(ValueError, match="draws random numbers"):
        gen.new_state(scene_layout(), GuidanceInputs())


# ----------------------------------------------------------------------------- oracle: the map chooses

def test_each_query_goes_to_its_best_overlapping_valid_gt_box():
    assigned = assign_to_best_box(QUERIES, GT, GT_VALID)
    assert assigned.tolist() == [[0, 1, -1, 0]]
    # the padding row is the only box query 2 overlaps: read as valid, it would take it
    assert assign_to_best_box(QUERIES, GT, torch.ones(1, 3, dtype=torch.bool)).tolist() == [[0, 1, 2, 0]]
    assert assign_to_best_box(QUERIES, GT[:, :0], GT_VALID[:, :0]).tolist() == [[-1, -1, -1, -1]]


def oracle_map():
    """(1, T, 4): token 0 -> q1 .5, q0 .25, q3 .125; token 3 -> q0 .2, q3 .2, q1 .3; token 5 -> q2 only;
    token 7 -> q2 .5, q0 .1."""
    dense = torch.zeros(1, T, 4, dtype=torch.float64)
    dense[0, 0, [0, 1, 3]] = torch.tensor([0.25, 0.5, 0.125], dtype=torch.float64)
    dense[0, 3, [0, 1, 3]] = torch.tensor([0.2, 0.3, 0.2], dtype=torch.float64)
    dense[0, 5, 2] = 0.5
    dense[0, 7, [0, 2]] = torch.tensor([0.1, 0.5], dtype=torch.float64)
    return dense


def test_oracle_attn_references_are_gt_centres_chosen_by_summed_map_weight():
    gen = EncoderReferenceGenerator("per_point", 2, 3, ref_rank="attn", ref_source="gt", ref_keep_self=True)
    refs, stock = guided_references(gen, oracle_inputs(), oracle_map())
    assert refs.shape == (1, T, 2, 3, 2)
    assert torch.equal(refs[:, :, :, 0], stock)  # ref_keep_self
    for level in range(2):
        # token 0: GT1 .5 (q1) before GT0 .375 (q0 + q3)
        assert torch.equal(refs[0, 0, level, 1], gt_centre(1, level))
        assert torch.equal(refs[0, 0, level, 2], gt_centre(0, level))
        # token 3: GT0 .4 (q0 + q3) before GT1 .3, although q1 alone weighs most: a GT box sums its queries
        assert torch.equal(refs[0, 3, level, 1], gt_centre(0, level))
        assert torch.equal(refs[0, 3, level, 2], gt_centre(1, level))
        # token 7: q2 overlaps no GT box and contributes nothing; GT0 from q0, then the token itself
        assert torch.equal(refs[0, 7, level, 1], gt_centre(0, level))
        assert torch.equal(refs[0, 7, level, 2], stock[0, 7, level])
    # token 5 saw q2 only, token 9 nothing: both fall back to their own location
    for token in (5, 9):
        assert torch.equal(refs[0, token], stock[0, token][:, None].expand(2, 3, 2))


def test_oracle_attn_ties_go_to_the_lower_gt_index():
    dense = torch.zeros(1, T, 4, dtype=torch.float64)
    dense[0, 2, [1, 3]] = 0.25  # GT1 .25 (q1) and GT0 .25 (q3): a tie
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="attn", ref_source="gt")
    refs, _ = guided_references(gen, oracle_inputs(), dense)
    assert torch.equal(refs[0, 2, 0, 0], gt_centre(0, 0)) and torch.equal(refs[0, 2, 0, 1], gt_centre(1, 0))


# ----------------------------------------------------------------------------- oracle: distance

DIST_GT = torch.tensor([[[0.5, 0.5, 0.8, 0.8], [0.3, 0.3, 0.2, 0.2], [0.85, 0.15, 0.1, 0.1], [0.3, 0.3, 0.6, 0.6]]])
DIST_VALID = torch.tensor([[True, True, True, False]])


def loop_distance_order(position, boxes, valid):
    """Brute force: the smallest valid box containing ``position`` (ties: lower index), then the other
    valid boxes by squared centre distance (float32, as the code), ties lower index."""
    candidates = [g for g in range(boxes.shape[0]) if valid[g]]
    inside = [g for g in candidates
              if boxes[g, 0] - boxes[g, 2] / 2 <= position[0] <= boxes[g, 0] + boxes[g, 2] / 2
              and boxes[g, 1] - boxes[g, 3] / 2 <= position[1] <= boxes[g, 1] + boxes[g, 3] / 2]
    own = min(inside, key=lambda g: (float(boxes[g, 2]) * float(boxes[g, 3]), g)) if inside else None
    rest = sorted((g for g in candidates if g != own),
                  key=lambda g: (float(((position - boxes[g, :2]) ** 2).sum()), g))
    return ([own] if own is not None else []) + rest


def test_oracle_distance_own_box_first_then_nearest_centres():
    gen = EncoderReferenceGenerator("per_point", 2, 4, ref_rank="distance", ref_source="gt", ref_keep_self=True)
    refs, stock = guided_references(gen, GuidanceInputs(DIST_GT.clone(), DIST_VALID.clone()))
    positions = stock[0, :, 0] / VR[0, 0]  # level 0's column: every level holds the same point
    checked_inside = 0
    for token in range(T):
        order = loop_distance_order(positions[token], DIST_GT[0], DIST_VALID[0])
        assert 3 not in order
        for slot in range(3):
            for level in range(2):
                got = refs[0, token, level, 1 + slot]
                if slot < len(order):
                    assert torch.equal(got, DIST_GT[0, order[slot], :2] * VR[0, level]), (token, slot)
                else:
                    assert torch.equal(got, stock[0, token, level])
        checked_inside += int(order[0] == 1)
    assert checked_inside > 0  # some tokens lie in the small box inside the big one: it comes first


def test_distance_uses_each_tokens_own_level_position():
    """Tokens of the coarse level sit at their own centres (not level 0's grid)."""
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="distance", ref_source="gt")
    refs, stock = guided_references(gen, GuidanceInputs(DIST_GT.clone(), DIST_VALID.clone()))
    coarse = 16  # first token of level 1 (2 x 2): centre (0.25, 0.25) of the valid region
    assert torch.allclose(stock[0, coarse, 1] / VR[0, 1], torch.tensor([1 / 3, 0.5]))
    order = loop_distance_order(stock[0, coarse, 1] / VR[0, 1], DIST_GT[0], DIST_VALID[0])
    assert torch.equal(refs[0, coarse, 0, 0], DIST_GT[0, order[0], :2] * VR[0, 0])


# ----------------------------------------------------------------------------- random

def random_picks(seed, source="decoder", points=4, inputs=None, padding_mask=None):
    gen = EncoderReferenceGenerator("per_point", 2, points, ref_rank="random", ref_source=source)
    picks = []
    inputs = inputs or GuidanceInputs(seed=seed)
    refs, stock = guided_references(gen, inputs, layout=scene_layout(padding_mask), picks=picks)
    return picks[0], refs, stock


def test_random_ranking_is_reproducible_and_draws_without_repeats():
    before = torch.get_rng_state()
    first, refs, _ = random_picks(seed=5)
    again, refs_again, _ = random_picks(seed=5)
    other, _, _ = random_picks(seed=6)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    assert torch.equal(first.chosen, again.chosen) and torch.equal(refs, refs_again)
    assert not torch.equal(first.chosen, other.chosen)
    assert bool(first.valid.all())  # 4 candidates for 4 slots: every slot filled
    for token in range(T):
        assert sorted(first.chosen[0, token].tolist()) == [0, 1, 2, 3]  # a permutation: no repeat
    assert len({tuple(first.chosen[0, t].tolist()) for t in range(T)}) > 5  # tokens draw independently


def test_random_ranking_differs_from_the_map_and_keeps_to_valid_candidates():
    picks, _, _ = random_picks(seed=1, points=2)
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="attn")
    map_picks = []
    dense = torch.rand(1, T, 4, generator=torch.Generator().manual_seed(0)).double()
    guided_references(gen, None, dense, picks=map_picks)
    assert not torch.equal(picks.chosen, map_picks[0].chosen)
    # the oracle's padded candidate (index 2) is never drawn, and 2 valid boxes leave slot 3 empty
    gt_picks, refs, stock = random_picks(seed=3, source="gt", points=3, inputs=oracle_inputs(seed=3))
    assert not bool((gt_picks.chosen[gt_picks.valid] == 2).any())
    assert gt_picks.valid[..., :2].all() and not gt_picks.valid[..., 2].any()
    assert torch.equal(refs[0, :, :, 2], stock[0])
    counts = torch.bincount(gt_picks.chosen[0, :, 0], minlength=2)
    assert counts[0] > 0 and counts[1] > 0


def test_random_ranking_leaves_padded_tokens_alone():
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, [2, 3, 18]] = True
    picks, refs, stock = random_picks(seed=2, padding_mask=mask)
    assert not picks.valid[0, [2, 3, 18]].any() and picks.valid[0, [0, 1, 4]].all()
    assert torch.equal(refs[0, 3], stock[0, 3][:, None].expand(2, 4, 2))


def test_random_candidates_are_queries_like_v3_0_4s():
    """The random ranking draws among the candidates the map ranking would rank (one per query)."""
    logits = torch.randn(1, 3, 2)
    o2o, o2m = torch.rand(1, 3, 4), torch.rand(1, 3, 4)
    gen = EncoderReferenceGenerator("per_point", 2, 2, ref_rank="random")
    state = SimpleNamespace(logits=[logits], boxes=[o2o], logits_one2many=[logits + 1], boxes_one2many=[o2m])
    assert gen.candidates(state, 3).count == 3
    assert torch.equal(gen.candidates(state, 3).boxes, make_candidates(logits, o2o, 3, "all", logits + 1, o2m).boxes)
