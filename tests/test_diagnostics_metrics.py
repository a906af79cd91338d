"""Reference-diagnostics metrics (docs/design.md §9, D1-D6) on hand-worked cases."""
import math

import pytest
import torch

from models.diagnostics import metrics
from models.diagnostics.geometry import (covered_area_fraction, inside_any_box, match_to_ground_truth,
                                         smallest_containing_box)
from models.diagnostics.tally import Tally, scoped_keys


def cxcywh(*boxes):
    return torch.tensor(boxes, dtype=torch.float32)


# ----------------------------------------------------------------------------- D1


def test_two_identical_candidate_boxes_are_duplicates():
    boxes = cxcywh([0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2])[None]  # one token, two slots
    valid = torch.ones(1, 2, dtype=torch.bool)
    for threshold in (0.7, 0.5):
        fraction, defined = metrics.duplicate_fraction(boxes, valid, threshold)
        assert defined.tolist() == [True] and fraction.tolist() == [1.0]


def test_duplicate_fraction_counts_pairs_of_valid_slots():
    same, other = [0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]
    boxes = cxcywh(same, same, other)[None].repeat(3, 1, 1)
    valid = torch.tensor([[True, True, True],     # pairs: (same, same) dup, two (same, other) not -> 1/3
                          [True, False, True],    # one pair (same, other) -> 0
                          [False, True, False]])  # no pair: undefined
    fraction, defined = metrics.duplicate_fraction(boxes, valid, 0.7)
    assert defined.tolist() == [True, True, False]
    assert fraction[:2].tolist() == pytest.approx([1 / 3, 0.0])


def test_duplicate_thresholds_hand_iou():
    # [0, 1] x [0, 1] and [0, 0.6] x [0, 1]: IoU = 0.6, a duplicate at 0.5 but not at 0.7
    boxes = cxcywh([0.5, 0.5, 1.0, 1.0], [0.3, 0.5, 0.6, 1.0])[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert metrics.duplicate_fraction(boxes, valid, 0.5)[0].item() == 1.0
    assert metrics.duplicate_fraction(boxes, valid, 0.7)[0].item() == 0.0


def test_distinct_object_ratio():
    slot_gt = torch.tensor([[0, 0, 1], [2, -1, 2], [-1, -1, -1], [3, 1, 3]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, True], [True, True, False]])
    ratio, defined = metrics.distinct_object_ratio(slot_gt, valid)
    assert defined.tolist() == [True, True, False, True]
    # {0, 0, 1}: 2 ids / 3 matched; {2, 2}: 1 / 2; {3, 1} (third slot invalid): 2 / 2
    assert ratio[[0, 1, 3]].tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])


# ----------------------------------------------------------------------------- geometry


def test_match_to_ground_truth_threshold_and_argmax():
    gt = cxcywh([0.25, 0.5, 0.5, 1.0], [0.75, 0.5, 0.5, 1.0])
    boxes = cxcywh([0.75, 0.5, 0.5, 1.0],   # IoU 1 with GT 1
                   [0.3, 0.5, 0.6, 1.0],    # IoU with GT 0: 0.5 / 0.6 = 0.833; with GT 1: 0.1 / 0.9
                   [0.5, 0.5, 1.0, 1.0])    # IoU 0.5 with both: the argmax takes the first
    matched, best = match_to_ground_truth(boxes, gt)
    assert matched.tolist() == [1, 0, 0]
    assert best.tolist() == pytest.approx([1.0, 0.5 / 0.6, 0.5])
    small = cxcywh([0.25, 0.5, 0.2, 0.2])  # IoU 0.04 / 0.5 = 0.08 < 0.5
    assert match_to_ground_truth(small, gt)[0].tolist() == [-1]
    matched, best = match_to_ground_truth(boxes, torch.zeros(0, 4))
    assert matched.tolist() == [-1, -1, -1] and best.tolist() == [0.0, 0.0, 0.0]


def test_covered_area_fraction_is_the_union_area():
    assert covered_area_fraction(torch.tensor([[0.25, 0.25, 0.75, 0.75]])).item() == pytest.approx(0.25)
    overlapping = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]])
    assert covered_area_fraction(overlapping).item() == pytest.approx(0.25 + 0.25 - 0.0625)
    nested = torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.2, 0.1, 0.4, 0.3]])
    assert covered_area_fraction(nested).item() == pytest.approx(0.5)
    outside = torch.tensor([[0.5, 0.5, 1.5, 1.5]])  # only the part inside the image counts
    assert covered_area_fraction(outside).item() == pytest.approx(0.25)
    assert covered_area_fraction(torch.zeros(0, 4)).item() == 0.0


def test_covered_area_fraction_matches_a_fine_raster():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.3, 0.1, 0.9, 0.4], [0.6, 0.5, 0.8, 0.95], [0.2, 0.3, 0.3, 0.6]])
    n = 1000
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1)
    raster = inside_any_box(grid, boxes.double()).double().mean().item()
    assert covered_area_fraction(boxes).item() == pytest.approx(raster, abs=2e-3)


def test_smallest_containing_box():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9]])
    points = torch.tensor([[0.2, 0.2], [0.5, 0.5], [0.7, 0.8]])
    assert smallest_containing_box(points, boxes).tolist() == [1, 0, 2]
    assert smallest_containing_box(points, boxes[1:2]).tolist() == [0, -1, -1]
    assert smallest_containing_box(points, torch.zeros(0, 4)).tolist() == [-1, -1, -1]


def test_inside_any_box_blocks_agree_with_one_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    points = torch.rand(7, 5, 2, generator=g)
    corner = torch.rand(6, 2, generator=g) * 0.6
    boxes = torch.cat([corner, corner + 0.3], 1)
    expected = inside_any_box(points, boxes)
    monkeypatch.setattr("models.diagnostics.geometry._BLOCK_ELEMENTS", 7)  # blocks of one point
    assert torch.equal(inside_any_box(points, boxes), expected)
    brute = torch.tensor([[any(b[0] <= p[0] <= b[2] and b[1] <= p[1] <= b[3] for b in boxes.tolist())
                           for p in row] for row in points.tolist()])
    assert torch.equal(expected, brute)


# ----------------------------------------------------------------------------- D4


def _one_token_sampling(points_xy, weights):
    """points_xy (N, 2), weights (N,) -> locations (1, 1, 1, N, 2), weights (1, 1, 1, N): one head, one level."""
    return torch.tensor(points_xy, dtype=torch.float32)[None, None, None], \
        torch.tensor(weights, dtype=torch.float32)[None, None, None]


def test_all_sampling_points_in_a_box_give_fsr_one():
    gt = torch.tensor([[0.25, 0.25, 0.75, 0.75]])  # covers a quarter of the image
    locations, weights = _one_token_sampling([[0.3, 0.3], [0.5, 0.6], [0.7, 0.74], [0.26, 0.7]],
                                             [0.1, 0.2, 0.3, 0.4])
    sums = metrics.foreground_sampling(locations, weights, torch.tensor([0]), gt)
    fsr = sums.fg_in / sums.img_in
    assert fsr.tolist() == pytest.approx([1.0])
    assert sums.own_in.tolist() == pytest.approx(sums.img_in.tolist())
    # chance ratio: in-box weight over covered fraction x in-image weight = 1 / 0.25
    assert (sums.fg_in / (covered_area_fraction(gt) * sums.img_in)).tolist() == pytest.approx([4.0])
    assert sums.img_out.tolist() == [0.0]


def test_one_box_covering_the_whole_image_gives_share_one_although_weight_lands_off_the_image():
    """Weight off the image is no longer counted as background: of the in-image weight, all of it is on
    the box, exactly; the chance ratio (cover 1) is exactly 1 too."""
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    locations, weights = _one_token_sampling([[0.5, 0.5], [1.0, 0.2], [1.3, 0.5], [0.5, -0.1], [0.0, 1.0]],
                                             [0.125, 0.25, 0.25, 0.125, 0.25])
    sums = metrics.foreground_sampling(locations, weights, torch.tensor([0]), gt)
    off, total = metrics.off_image_sampling(locations, weights)
    assert off.tolist() == [0.375] and total.tolist() == [1.0]  # (1.3, 0.5) and (0.5, -0.1); borders are in
    assert sums.img_in.tolist() == [0.625] and sums.fg_in.tolist() == [0.625]
    assert (sums.fg_in / sums.img_in).tolist() == [1.0]
    assert (sums.own_in / sums.img_in).tolist() == [1.0]
    assert (sums.fg_in / (covered_area_fraction(gt) * sums.img_in)).tolist() == [1.0]


def test_in_image_shares_by_hand_with_weight_off_the_image():
    """Two levels, one token in the left half-box: level 0 puts 0.2 in the box, 0.1 right of it on
    the image, 0.1 off the image above and 0.1 off the image to the left, where the GT box reaches
    past the border (still not foreground); level 1 0.1 in the box, 0.4 off the image to the right."""
    gt = torch.tensor([[-0.2, 0.0, 0.5, 1.0]])  # leaves the image on the left; covers half of it
    locations = torch.tensor([[[0.25, 0.5], [0.75, 0.5], [0.25, -0.5], [-0.1, 0.5]],
                              [[0.4, 0.9], [1.5, 0.5], [1.2, 0.1], [0.7, 0.0]]]).view(1, 1, 2, 4, 2)
    weights = torch.tensor([[0.2, 0.1, 0.1, 0.1], [0.1, 0.3, 0.1, 0.0]]).view(1, 1, 2, 4)
    sums = metrics.foreground_sampling(locations, weights, torch.tensor([0]), gt)
    off, total = metrics.off_image_sampling(locations, weights)
    assert off.tolist() == pytest.approx([0.2, 0.4]) and total.tolist() == pytest.approx([0.5, 0.5])
    assert sums.img_in.tolist() == pytest.approx([0.3, 0.1])
    assert sums.fg_in.tolist() == pytest.approx([0.2, 0.1])       # shares 2/3 and 1 of the in-image weight
    assert (sums.fg_in.sum() / sums.img_in.sum()).item() == pytest.approx(0.75)
    cover = covered_area_fraction(gt).item()
    assert cover == pytest.approx(0.5)
    assert (sums.fg_in.sum() / (cover * sums.img_in.sum())).item() == pytest.approx(1.5)


def test_fsr_of_an_outside_token_and_own_object_share():
    gt = torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.1, 0.1, 0.3, 0.3]])  # a big box and a small one inside it
    # token 0 sits in the small box (its own object) and puts 0.25 inside it, 0.5 in the big box only,
    # 0.25 outside both; token 1 sits outside both and puts 0.6 into the big box
    locations = torch.tensor([[[0.2, 0.2], [0.5, 0.4], [0.9, 0.1], [0.5, 0.9]],
                              [[0.5, 0.2], [0.5, 0.9], [0.5, 0.9], [0.5, 0.9]]])[:, None, None]
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.6, 0.2, 0.1, 0.1]])[:, None, None]
    token_box = smallest_containing_box(torch.tensor([[0.2, 0.2], [0.5, 0.8]]), gt)
    assert token_box.tolist() == [1, -1]
    sums = metrics.foreground_sampling(locations, weights, token_box, gt)
    assert (sums.fg_in / sums.img_in).tolist() == pytest.approx([0.75])
    assert (sums.own_in / sums.img_in).tolist() == pytest.approx([0.25])
    assert (sums.fg_out / sums.img_out).tolist() == pytest.approx([0.6])


def test_foreground_sums_per_level():
    gt = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    locations = torch.tensor([[0.2, 0.5], [0.8, 0.5]]).view(1, 1, 2, 1, 2)  # level 0 inside, level 1 outside
    weights = torch.tensor([0.3, 0.7]).view(1, 1, 2, 1)
    sums = metrics.foreground_sampling(locations, weights, torch.tensor([0]), gt)
    assert sums.fg_in.tolist() == pytest.approx([0.3, 0.0])
    assert sums.img_in.tolist() == pytest.approx([0.3, 0.7])


# ----------------------------------------------------------------------------- D5


def test_uniform_weights_have_entropy_one_and_all_samples_effective():
    levels, points = 4, 3
    weights = torch.full((5, 2, levels, points), 1.0 / (levels * points))
    normalised, n_eff = metrics.weight_entropy(weights)
    assert torch.allclose(normalised, torch.ones(5, 2))
    assert torch.allclose(n_eff, torch.full((5, 2), float(levels * points)))


def test_one_hot_weights_have_entropy_zero_and_one_effective_sample():
    weights = torch.zeros(1, 1, 2, 2)
    weights[0, 0, 1, 0] = 1.0
    normalised, n_eff = metrics.weight_entropy(weights)
    assert normalised.item() == 0.0 and n_eff.item() == 1.0
    two = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 2, 2)
    normalised, n_eff = metrics.weight_entropy(two)
    assert normalised.item() == pytest.approx(math.log(2) / math.log(4))
    assert n_eff.item() == pytest.approx(2.0)


def test_sampling_distance_in_strides_of_the_level():
    # level 0 is 4 x 8 (H x W), level 1 is 2 x 4: one pixel is 1/8 (1/4) of the width, 1/4 (1/2) of the height
    level_sizes = torch.tensor([[8.0, 4.0], [4.0, 2.0]])
    reference = torch.tensor([0.5, 0.5]).view(1, 1, 1, 1, 2)
    locations = torch.tensor([[[0.5 + 1 / 8, 0.5], [0.5 + 1 / 8, 0.5 + 1 / 4]],
                              [[0.5, 0.5 - 1 / 2], [0.5 + 3 / 4, 0.5 + 2 / 2]]]).view(1, 1, 2, 2, 2)
    distance = metrics.sampling_distance(locations, reference, level_sizes)
    assert distance.reshape(-1).tolist() == pytest.approx([1.0, math.sqrt(2), 1.0, math.sqrt(13)])


def test_slot_share():
    # two heads, two levels, two points: head 0 puts everything on point 0, head 1 spreads evenly
    weights = torch.zeros(1, 2, 2, 2)
    weights[0, 0, :, 0] = 0.5
    weights[0, 1] = 0.25
    assert metrics.slot_share(weights).reshape(-1).tolist() == pytest.approx([0.75, 0.25])


# ----------------------------------------------------------------------------- D2, D3


def test_token_inside_a_box_with_references_inside_it_is_same_object():
    own = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.2, 0.2, 0.6, 0.6]])
    centres = torch.tensor([[[0.3, 0.3], [0.5, 0.4], [0.9, 0.9]],
                            [[0.3, 0.3], [0.9, 0.9], [0.1, 0.5]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    fraction, defined = metrics.same_object_fraction(centres, valid, own)
    assert defined.tolist() == [True, True]
    assert fraction.tolist() == pytest.approx([1.0, 1 / 3])


def test_identical_reference_sets_have_jaccard_one_and_chamfer_zero():
    ids = torch.tensor([[3, 7, 1]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    permuted = torch.tensor([[1, 3, 7]])
    jaccard, defined = metrics.set_jaccard(ids, valid, permuted, valid)
    assert defined.item() and jaccard.item() == 1.0
    points = torch.tensor([[[0.1, 0.2], [0.5, 0.5], [0.9, 0.3]]])
    distance, defined = metrics.symmetric_chamfer(points, valid, points.flip(1), valid)
    assert defined.item() and distance.item() == 0.0


def test_jaccard_and_chamfer_hand_worked():
    ids_a, valid_a = torch.tensor([[1, 2, 9]]), torch.tensor([[True, True, False]])  # {1, 2}
    ids_b, valid_b = torch.tensor([[2, 3]]), torch.tensor([[True, True]])            # {2, 3}
    assert metrics.set_jaccard(ids_a, valid_a, ids_b, valid_b)[0].item() == pytest.approx(1 / 3)
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert not metrics.set_jaccard(ids_a, none, ids_b, torch.zeros(1, 2, dtype=torch.bool))[1].item()
    # A = {(0, 0)}, B = {(3, 4), (0, 0)}: A -> B 0; B -> A (5 + 0) / 2; symmetric mean 1.25
    points_a = torch.tensor([[[0.0, 0.0], [100.0, 100.0]]])
    points_b = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    distance, defined = metrics.symmetric_chamfer(points_a, torch.tensor([[True, False]]), points_b,
                                                  torch.ones(1, 2, dtype=torch.bool))
    assert defined.item() and distance.item() == pytest.approx(1.25)
    assert not metrics.symmetric_chamfer(points_a, torch.zeros(1, 2, dtype=torch.bool), points_b,
                                         torch.ones(1, 2, dtype=torch.bool))[1].item()


def test_multiset_signature():
    slot_gt = torch.tensor([[2, 0, 2], [0, 2, 2], [0, 2, -1], [0, 2, 5]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, True], [True, True, False]])
    signature = metrics.multiset_signature(slot_gt, valid)
    assert torch.equal(signature[0], signature[1])      # same multiset {0, 2, 2} in another order
    assert not torch.equal(signature[0], signature[2])  # {0, 2}: one 2 fewer
    assert torch.equal(signature[2], signature[3])      # unmatched and invalid slots hold no id


# ----------------------------------------------------------------------------- tally


def test_tally_leaves_out_keys_without_items_and_scopes():
    assert scoped_keys("D4/off_image", "enc0", "lvl1") == ["D4/off_image", "D4/off_image/enc0",
                                                           "D4/off_image/enc0/lvl1"]
    tally = Tally()
    tally.add(["a", "a/x"], torch.tensor(3.0), torch.tensor(2.0))
    tally.add(["a"], 1.0, 2)
    tally.add(["empty"], torch.tensor(0.0), torch.tensor(0.0))
    tally.add_values(["v"], torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([True, False, True]))
    means = tally.means()
    assert means == {"a": 1.0, "a/x": 1.5, "v": 2.0}
    assert all(type(value) is float for value in means.values())
