"""Hungarian matcher vs brute force; top-k IoU assigner on a hand-worked case."""
import itertools
import math

import pytest
import torch

from models.matcher import HungarianMatcher, TopkIoUAssigner


# ----- Hungarian matcher -----------------------------------------------------

def _reference_cost(logits, boxes, labels, tgt_boxes, w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25, gamma=2.0):
    """Matching cost written pair by pair in plain Python, independently of the module.

    class: focal loss of being positive on the target class minus that of being negative;
    box: L1 distance of cxcywh + negative GIoU of the xyxy boxes.
    """
    def xyxy(b):
        cx, cy, w, h = b
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    def giou(a, b):
        ax0, ay0, ax1, ay1 = xyxy(a)
        bx0, by0, bx1, by1 = xyxy(b)
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
        hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
        return inter / union - (hull - union) / hull

    cost = [[0.0] * len(labels) for _ in range(len(logits))]
    for q in range(len(logits)):
        for t in range(len(labels)):
            p = 1 / (1 + math.exp(-logits[q][labels[t]]))
            pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
            l1 = sum(abs(x - y) for x, y in zip(boxes[q], tgt_boxes[t]))
            cost[q][t] = w_class * (pos - neg) + w_bbox * l1 - w_giou * giou(boxes[q], tgt_boxes[t])
    return cost


def _brute_force_optimum(cost):
    """Minimum total cost over all assignments of min(Q, T) disjoint pairs."""
    num_q, num_t = len(cost), len(cost[0])
    if num_t <= num_q:
        return min(sum(cost[q][t] for t, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_q), num_t))
    return min(sum(cost[q][t] for q, t in enumerate(perm))
               for perm in itertools.permutations(range(num_t), num_q))


def _random_case(generator, batch, num_queries, num_classes, sizes):
    logits = torch.randn(batch, num_queries, num_classes, generator=generator, dtype=torch.float64) * 2
    centres = torch.rand(batch, num_queries, 2, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    sizes_wh = torch.rand(batch, num_queries, 2, generator=generator, dtype=torch.float64) * 0.3 + 0.05
    outputs = {"pred_logits": logits, "pred_boxes": torch.cat([centres, sizes_wh], -1)}
    targets = []
    for n in sizes:
        c = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.3 + 0.05
        targets.append({"labels": torch.randint(num_classes, (n,), generator=generator),
                        "boxes": torch.cat([c, wh], -1)})
    return outputs, targets


@pytest.mark.parametrize("seed", range(8))
def test_hungarian_matches_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries = 5
    sizes = [int(torch.randint(1, num_queries + 1, (1,), generator=g)) for _ in range(2)]
    outputs, targets = _random_case(g, 2, num_queries, 3, sizes)
    indices = HungarianMatcher()(outputs, targets)
    for b, (rows, cols) in enumerate(indices):
        cost = _reference_cost(outputs["pred_logits"][b].tolist(), outputs["pred_boxes"][b].tolist(),
                               targets[b]["labels"].tolist(), targets[b]["boxes"].tolist())
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(num_queries, sizes[b])
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        chosen = sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist()))
        # float32 cost inside the matcher: allow a small tolerance on near-ties
        assert chosen == pytest.approx(_brute_force_optimum(cost), abs=1e-4)


def test_hungarian_more_targets_than_queries():
    g = torch.Generator().manual_seed(42)
    outputs, targets = _random_case(g, 1, 3, 4, [5])
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    cost = _reference_cost(outputs["pred_logits"][0].tolist(), outputs["pred_boxes"][0].tolist(),
                           targets[0]["labels"].tolist(), targets[0]["boxes"].tolist())
    assert len(rows) == 3
    chosen = sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist()))
    assert chosen == pytest.approx(_brute_force_optimum(cost), abs=1e-4)


def test_hungarian_custom_weights_match_reference():
    g = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(g, 1, 4, 3, [3])
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.5, cost_giou=3.0)
    rows, cols = matcher(outputs, targets)[0]
    cost = _reference_cost(outputs["pred_logits"][0].tolist(), outputs["pred_boxes"][0].tolist(),
                           targets[0]["labels"].tolist(), targets[0]["boxes"].tolist(),
                           w_class=1.0, w_bbox=0.5, w_giou=3.0)
    chosen = sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist()))
    assert chosen == pytest.approx(_brute_force_optimum(cost), abs=1e-4)


def test_hungarian_empty_targets():
    g = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(g, 2, 4, 3, [0, 2])
    indices = HungarianMatcher()(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 2]
    assert indices[0][0].dtype == torch.int64
    outputs, targets = _random_case(g, 2, 4, 3, [0, 0])
    assert [len(r) for r, _ in HungarianMatcher()(outputs, targets)] == [0, 0]


def test_hungarian_gives_no_gradient():
    g = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(g, 1, 4, 3, [2])
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert not rows.requires_grad and not cols.requires_grad


# ----- top-k IoU assigner (MS-DETR) ------------------------------------------

def _cxcywh(x0, y0, x1, y1):
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def _hand_case(p3_confident: bool):
    """Two 0.2 x 0.2 targets; predictions shifted along x by known amounts.

    IoU of two 0.2 x 0.2 squares shifted by d: (0.2 - d) / (0.2 + d).
        p0 = t0 (d 0)    IoU 1      score 0.7
        p1 = t0 (d 0.02) IoU 0.818  score 0.573
        p2 = t0 (d 0.05) IoU 0.6    score 0.42   (>= 0.4: candidate)
        p3 = t0 (d 0.1)  IoU 0.333  score 0.233  (+0.3 if confident on t0's class -> 0.533)
        p4 = t1 (d 0.07) IoU 0.481  score 0.337  (< 0.4, but t1's best -> candidate)
        p5.. far away    IoU 0      score 0
    Class logits are -20 (probability ~0) except where stated, so score ~ 0.7 IoU.
    """
    boxes = [
        _cxcywh(0.10, 0.1, 0.30, 0.3),
        _cxcywh(0.12, 0.1, 0.32, 0.3),
        _cxcywh(0.15, 0.1, 0.35, 0.3),
        _cxcywh(0.20, 0.1, 0.40, 0.3),
        _cxcywh(0.67, 0.6, 0.87, 0.8),
    ]
    num_queries = 20  # candidate cap int(0.25 * 20) = 5 is not reached
    boxes += [_cxcywh(0.94, 0.02, 0.96, 0.04)] * (num_queries - len(boxes))
    logits = torch.full((1, num_queries, 3), -20.0)
    if p3_confident:
        logits[0, 3, 1] = 20.0
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([boxes])}
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([_cxcywh(0.1, 0.1, 0.3, 0.3), _cxcywh(0.6, 0.6, 0.8, 0.8)])}]
    return outputs, targets


def _pairs(indices):
    rows, cols = indices
    return sorted(zip(rows.tolist(), cols.tolist()))


def test_topk_assigner_iou_only_hand_case():
    outputs, targets = _hand_case(p3_confident=False)
    # t0 has 3 candidates (p0, p1, p2) -> min(k=2, 3) = 2 best: p0, p1; t1 gets its best, p4
    assert _pairs(TopkIoUAssigner(k=2, threshold=0.4)(outputs, targets)[0]) == [(0, 0), (1, 0), (4, 1)]
    # with k=6 t0 keeps all three of its candidates
    assert _pairs(TopkIoUAssigner(k=6, threshold=0.4)(outputs, targets)[0]) == [(0, 0), (1, 0), (2, 0), (4, 1)]


def test_topk_assigner_uses_class_probability():
    outputs, targets = _hand_case(p3_confident=True)
    # p3 now scores 0.533 > p2's 0.42: it is a candidate and outranks p2
    assert _pairs(TopkIoUAssigner(k=3, threshold=0.4)(outputs, targets)[0]) == [(0, 0), (1, 0), (3, 0), (4, 1)]
    assert _pairs(TopkIoUAssigner(k=6, threshold=0.4)(outputs, targets)[0]) == [
        (0, 0), (1, 0), (2, 0), (3, 0), (4, 1)]


def test_topk_assigner_output_order_is_ascending_score():
    outputs, targets = _hand_case(p3_confident=True)
    rows, cols = TopkIoUAssigner(k=6, threshold=0.4)(outputs, targets)[0]
    # scores: p4 0.337, p2 0.42, p3 0.533, p1 0.573, p0 0.7
    assert rows.tolist() == [4, 2, 3, 1, 0]
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64


def test_topk_assigner_empty_targets():
    outputs, _ = _hand_case(p3_confident=False)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    rows, cols = TopkIoUAssigner()(outputs, empty)[0]
    assert len(rows) == 0 and len(cols) == 0


def test_topk_assigner_shared_prediction_keeps_both_pairs():
    """A prediction in the top-k of two targets keeps both pairs, as upstream, higher score last.

    t0 spans x [0.10, 0.30], t1 x [0.23, 0.43] (all boxes 0.2 high, same rows):
        p0 x [0.16, 0.36]: IoU t0 0.538, t1 0.481 -> best t0 (score 0.377)
        p1 = t0, p2 = t1 (IoU 1)
        p3 x [0.31, 0.51]: IoU t1 0.429 (score 0.300), t0 0 -> best t1
    """
    boxes = [_cxcywh(0.16, 0.1, 0.36, 0.3), _cxcywh(0.10, 0.1, 0.30, 0.3),
             _cxcywh(0.23, 0.1, 0.43, 0.3), _cxcywh(0.31, 0.1, 0.51, 0.3)]
    boxes += [_cxcywh(0.94, 0.9, 0.96, 0.92)] * 16  # Q = 20: candidate cap 5 not reached
    outputs = {"pred_logits": torch.full((1, 20, 2), -20.0), "pred_boxes": torch.tensor([boxes])}
    targets = [{"labels": torch.tensor([0, 0]),
                "boxes": torch.tensor([_cxcywh(0.10, 0.1, 0.30, 0.3), _cxcywh(0.23, 0.1, 0.43, 0.3)])}]
    # threshold 0.4: only p1 (t0) and p2 (t1) qualify -> one prediction each
    assert _pairs(TopkIoUAssigner(k=6, threshold=0.4)(outputs, targets)[0]) == [(1, 0), (2, 1)]
    # threshold 0.25: candidates p1, p0 (best t0) and p2, p3 (best t1) -> two per target.
    # t0's top-2 = p1, p0; t1's top-2 = p2, p0 (p0's 0.481 beats p3's 0.429), so p0 is shared
    # and keeps both pairs; ascending scores: (p0, t1) 0.337 before (p0, t0) 0.377, before the
    # two 0.7 pairs
    rows, cols = TopkIoUAssigner(k=6, threshold=0.25)(outputs, targets)[0]
    assert _pairs((rows, cols)) == [(0, 0), (0, 1), (1, 0), (2, 1)]
    assert list(zip(rows.tolist(), cols.tolist()))[:2] == [(0, 1), (0, 0)]


def test_topk_assigner_caps_candidates():
    """More candidates than int(0.25 * Q): a random subset of that size decides the counts."""
    outputs, targets = _hand_case(p3_confident=True)
    outputs = {k: v[:, :8] for k, v in outputs.items()}  # Q = 8 -> cap 2 of the 5 candidates
    torch.manual_seed(0)
    for _ in range(5):
        rows, cols = TopkIoUAssigner(k=6, threshold=0.4)(outputs, targets)[0]
        assert len(rows) == 2


def test_topk_assigner_random_invariants():
    g = torch.Generator().manual_seed(5)
    outputs, targets = _random_case(g, 2, 40, 4, [3, 6])
    assigner = TopkIoUAssigner(k=4, threshold=0.3)
    for b, (rows, cols) in enumerate(assigner(outputs, targets)):
        pairs = list(zip(rows.tolist(), cols.tolist()))
        assert len(set(pairs)) == len(pairs)  # each (prediction, target) pair at most once
        assert torch.bincount(cols, minlength=len(targets[b]["labels"])).max() <= 4
        assert len(rows) <= 4 * len(targets[b]["labels"])


def test_costs_run_in_float32_or_wider():
    """Half predictions are scored in float32; float64 ones stay float64, so a float64 model breaks
    exact ties (as these two boxes, mirror images around the target, are) as float64 upstream does."""
    boxes = torch.tensor([[0.375, 0.375, 0.4, 0.4], [0.625, 0.625, 0.4, 0.4]])
    labels, targets = torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.5, 0.6]])
    matcher = HungarianMatcher(cost_class=0.0)
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                            (torch.float64, torch.float64)):
        cost = matcher.cost_matrix(torch.zeros(2, 1, dtype=dtype), boxes.to(dtype), labels, targets)
        assert cost.dtype == expected
        score = TopkIoUAssigner().score_matrix(torch.zeros(2, 1, dtype=dtype), boxes.to(dtype), labels, targets)
        assert score.dtype == expected
