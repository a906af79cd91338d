"""Box utilities on hand-worked boxes."""
import math

import pytest
import torch

from util.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                          elementwise_box_iou, elementwise_generalized_box_iou,
                          generalized_box_iou, inverse_sigmoid)


def test_cxcywh_xyxy_round_trip():
    torch.manual_seed(0)
    boxes = torch.rand(50, 4, dtype=torch.float64)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4], dtype=torch.float64)),
                       torch.tensor([0.4, 0.3, 0.6, 0.7], dtype=torch.float64))


def test_leading_dims_are_kept():
    boxes = torch.rand(2, 3, 4)
    assert box_cxcywh_to_xyxy(boxes).shape == (2, 3, 4)
    assert box_area(box_cxcywh_to_xyxy(boxes)).shape == (2, 3)


def test_iou_and_union_of_overlapping_squares():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(a, b)
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7; the second box is disjoint
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0]]))


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),                 # identical
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),               # contained: enclosing box = union
    ([0, 0, 1, 1], [2, 0, 3, 1], -1 / 3),               # disjoint: IoU 0, union 2, enclosing 3
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9),        # overlap: enclosing 9, union 7
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),                  # touching edges: enclosing = union
])
def test_generalized_iou_known_pairs(a, b, expected):
    a = torch.tensor([a], dtype=torch.float64)
    b = torch.tensor([b], dtype=torch.float64)
    assert generalized_box_iou(a, b).item() == pytest.approx(expected)
    assert generalized_box_iou(b, a).item() == pytest.approx(expected)
    assert elementwise_generalized_box_iou(a, b).item() == pytest.approx(expected)


def test_far_apart_giou_tends_to_minus_one():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1000.0, 1000.0, 1001.0, 1001.0]])
    assert generalized_box_iou(a, b).item() == pytest.approx(-1.0, abs=1e-5)


def test_elementwise_matches_diagonal_of_pairwise():
    torch.manual_seed(1)
    a = box_cxcywh_to_xyxy(torch.rand(7, 4, dtype=torch.float64))
    b = box_cxcywh_to_xyxy(torch.rand(7, 4, dtype=torch.float64))
    assert torch.allclose(elementwise_box_iou(a, b)[0], box_iou(a, b)[0].diagonal())
    assert torch.allclose(elementwise_box_iou(a, b)[1], box_iou(a, b)[1].diagonal())
    assert torch.allclose(elementwise_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal())


def test_generalized_iou_rejects_malformed_boxes():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(AssertionError):
        generalized_box_iou(good, bad)
    with pytest.raises(AssertionError):
        elementwise_generalized_box_iou(bad, good)


def test_empty_inputs():
    empty = torch.zeros(0, 4)
    some = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert generalized_box_iou(empty, some).shape == (0, 1)
    assert generalized_box_iou(some, empty).shape == (1, 0)


def test_inverse_sigmoid():
    x = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64)
    assert torch.allclose(inverse_sigmoid(x.sigmoid()), x)
    edges = inverse_sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(edges).all()
    assert edges[0].item() == pytest.approx(math.log(1e-5), rel=1e-4)
    assert edges[1].item() == pytest.approx(-math.log(1e-5), rel=1e-4)
