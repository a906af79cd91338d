"""Losses on hand-worked values; the full criterion on fake model outputs; post-processing."""
import math

import pytest
import torch

from models.criterion import SetCriterion, build_criterion, repeat_targets, sigmoid_focal_loss
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess, build_postprocessors
from tests.helpers import TINY
from cli.config import parse_args


# ----- focal loss --------------------------------------------------------------

def test_sigmoid_focal_loss_hand_value():
    # query 0: logit 0 (p = 1/2), positive: alpha (1 - p)^2 * -log p = 0.25 * 0.25 * log 2
    # query 1: logit log 3 (p = 3/4), negative: (1 - alpha) p^2 * -log(1 - p) = 0.75 * 0.5625 * log 4
    inputs = torch.tensor([[[0.0], [math.log(3.0)]]], dtype=torch.float64)
    targets = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2 / 2  # mean over Q, / num_boxes
    assert sigmoid_focal_loss(inputs, targets, num_boxes=2).item() == pytest.approx(expected)


def test_loss_ce_is_scaled_by_num_queries():
    criterion = SetCriterion(num_classes=1, matcher=HungarianMatcher(), weight_dict={})
    logits = torch.tensor([[[0.0], [math.log(3.0)]]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, num_boxes=2)["loss_ce"]
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2 / 2 * 2
    assert loss.item() == pytest.approx(expected)


# ----- box losses ----------------------------------------------------------------

def test_box_losses_hand_values():
    criterion = SetCriterion(num_classes=1, matcher=HungarianMatcher(), weight_dict={})
    # pair 0: [0.4,0.4,0.6,0.6] vs [0.45,0.4,0.65,0.6]: L1 0.05, IoU 0.03/0.05 = 0.6, hull = union -> GIoU 0.6
    # pair 1: [0.1,0.1,0.3,0.3] vs [0.5,0.1,0.7,0.3]: L1 0.4, IoU 0, union 0.08, hull 0.12 -> GIoU -1/3
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([0, 0]),
                "boxes": torch.tensor([[0.6, 0.2, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2]], dtype=torch.float64)}]
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    losses = criterion.loss_boxes({"pred_boxes": pred}, targets, indices, num_boxes=2)
    assert losses["loss_bbox"].item() == pytest.approx((0.05 + 0.4) / 2)
    assert losses["loss_giou"].item() == pytest.approx(((1 - 0.6) + (1 + 1 / 3)) / 2)


def test_query_with_two_pairs_is_positive_on_its_last_pairs_label_only():
    # the one-to-many assigner can pair query 0 with t1 (label 1) and, scoring higher, with t0
    # (label 0); as upstream, the box losses see both pairs and the class target is the last's.
    # All logits 0 (p = 1/2): q0 positive on class 0: 1/4 (1/2)^2 log 2; q0 class 1 and q1's two
    # classes negative: 3/4 (1/2)^2 log 2 each -> (1/16 + 3 * 3/16) log 2 = 5/8 log 2 (sum over
    # queries: the mean over Q times Q), divided by num_boxes 1
    criterion = SetCriterion(num_classes=2, matcher=HungarianMatcher(), weight_dict={})
    logits = torch.zeros(1, 2, 2, dtype=torch.float64)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2], [0.5, 0.4, 0.2, 0.2]], dtype=torch.float64)}]
    indices = [(torch.tensor([0, 0]), torch.tensor([1, 0]))]
    loss_ce = criterion.loss_labels({"pred_logits": logits}, targets, indices, num_boxes=1)["loss_ce"]
    assert loss_ce.item() == pytest.approx(5 / 8 * math.log(2), rel=1e-12)
    loss_bbox = criterion.loss_boxes({"pred_boxes": boxes}, targets, indices, num_boxes=1)["loss_bbox"]
    assert loss_bbox.item() == pytest.approx(0.1 + 0.05, rel=1e-12)  # |0.5 - 0.4| and |0.5 - 0.55|


def test_box_losses_without_matches_are_zero():
    criterion = SetCriterion(num_classes=1, matcher=HungarianMatcher(), weight_dict={})
    pred = torch.rand(1, 3, 4, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    targets = [{"labels": empty, "boxes": torch.zeros(0, 4)}]
    losses = criterion.loss_boxes({"pred_boxes": pred}, targets, [(empty, empty)], num_boxes=1)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0


# ----- full criterion ------------------------------------------------------------

NUM_CLASSES, NUM_QUERIES, NUM_O2M, DEC_LAYERS = 5, 10, 12, 4


def _args(**kw):
    """The parser's complete namespace (every flag a builder reads), with these tests' settings."""
    args = parse_args(TINY)
    base = dict(dec_layers=DEC_LAYERS, aux_loss=True, num_queries_one2many=0, use_ms_detr=False,
                cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
                enc_cls_loss_coef=None, enc_bbox_loss_coef=None, enc_giou_loss_coef=None,
                k_one2many=3, lambda_one2many=1.0, o2m_cls_loss_coef=2.0, o2m_bbox_loss_coef=5.0,
                o2m_giou_loss_coef=2.0, o2m_matcher_k=6, o2m_matcher_threshold=0.4, topk_eval=100)
    base.update(kw)
    vars(args).update(base)
    return args


def _leaf_prediction(generator, batch, queries):
    logits = torch.randn(batch, queries, NUM_CLASSES, generator=generator).requires_grad_()
    centres = torch.rand(batch, queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.05
    return {"pred_logits": logits, "pred_boxes": torch.cat([centres, sizes], -1).requires_grad_()}


def _fake_outputs(one2many_queries):
    g = torch.Generator().manual_seed(0)
    out = _leaf_prediction(g, 2, NUM_QUERIES)
    out["aux_outputs"] = [_leaf_prediction(g, 2, NUM_QUERIES) for _ in range(DEC_LAYERS - 1)]
    out["enc_outputs"] = _leaf_prediction(g, 2, 30)
    # the proposals before refinement (the model returns them; MS-DETR matches on them)
    out["enc_outputs"]["anchors"] = _leaf_prediction(g, 2, 30)["pred_boxes"].detach()
    if one2many_queries:
        o2m = _leaf_prediction(g, 2, one2many_queries)
        out["pred_logits_one2many"], out["pred_boxes_one2many"] = o2m["pred_logits"], o2m["pred_boxes"]
        out["aux_outputs_one2many"] = [_leaf_prediction(g, 2, one2many_queries) for _ in range(DEC_LAYERS - 1)]
    return out


def _targets():
    return [
        {"labels": torch.tensor([1, 4, 1]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.7, 0.7, 0.1, 0.1]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},  # an image without objects
    ]


def _expected_keys(one2many: bool):
    names = ["loss_ce", "loss_bbox", "loss_giou"]
    keys = set(names) | {"class_error"}
    keys |= {f"{n}_{i}" for n in names for i in range(DEC_LAYERS - 1)}
    keys |= {f"{n}_enc" for n in names}
    if one2many:
        keys |= {f"{n}_one2many" for n in names}
        keys |= {f"{n}_one2many_{i}" for n in names for i in range(DEC_LAYERS - 1)}
    return keys


def _leaves(outputs):
    yield outputs["pred_logits"]
    yield outputs["pred_boxes"]
    for key in ("aux_outputs", "aux_outputs_one2many"):
        for layer in outputs.get(key, []):
            yield layer["pred_logits"]
            yield layer["pred_boxes"]
    if "enc_outputs" in outputs:
        yield outputs["enc_outputs"]["pred_logits"]
        yield outputs["enc_outputs"]["pred_boxes"]
    for key in ("pred_logits_one2many", "pred_boxes_one2many"):
        if key in outputs:
            yield outputs[key]


@pytest.mark.parametrize("mode, args, o2m_queries", [
    ("none", _args(), 0),
    ("hybrid", _args(num_queries_one2many=NUM_O2M), NUM_O2M),
    ("mixed", _args(use_ms_detr=True, o2m_matcher_threshold=0.1), NUM_QUERIES),
])
def test_full_criterion(mode, args, o2m_queries):
    criterion = build_criterion(args, NUM_CLASSES)
    outputs = _fake_outputs(o2m_queries)
    losses = criterion(outputs, _targets())
    assert set(losses) == _expected_keys(o2m_queries > 0)
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert set(losses) - set(criterion.weight_dict) == {"class_error"}
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    for leaf in _leaves(outputs):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_weight_dict_values():
    wd = build_criterion(_args(enc_cls_loss_coef=7.0), NUM_CLASSES).weight_dict
    assert (wd["loss_ce"], wd["loss_bbox"], wd["loss_giou"]) == (2.0, 5.0, 2.0)
    assert wd["loss_ce_2"] == 2.0 and "loss_ce_3" not in wd
    assert (wd["loss_ce_enc"], wd["loss_bbox_enc"], wd["loss_giou_enc"]) == (7.0, 5.0, 2.0)
    assert not any("one2many" in k for k in wd)

    hybrid = build_criterion(_args(num_queries_one2many=NUM_O2M, lambda_one2many=0.5), NUM_CLASSES).weight_dict
    assert hybrid["loss_ce_one2many"] == 1.0 and hybrid["loss_bbox_one2many_0"] == 2.5

    mixed = build_criterion(_args(use_ms_detr=True, o2m_cls_loss_coef=3.0), NUM_CLASSES).weight_dict
    assert mixed["loss_ce_one2many"] == 3.0 and mixed["loss_giou_one2many_2"] == 2.0

    # unset encoder weights follow each form's upstream: the main weights (Deformable DETR, H-DETR),
    # MS-DETR's fixed 2 / 5 / 2 (its training scripts lower the main classification weight to 1)
    plain = build_criterion(_args(cls_loss_coef=1.0, bbox_loss_coef=4.0), NUM_CLASSES).weight_dict
    assert (plain["loss_ce_enc"], plain["loss_bbox_enc"], plain["loss_giou_enc"]) == (1.0, 4.0, 2.0)
    mixed = build_criterion(_args(use_ms_detr=True, cls_loss_coef=1.0, bbox_loss_coef=4.0), NUM_CLASSES).weight_dict
    assert (mixed["loss_ce_enc"], mixed["loss_bbox_enc"], mixed["loss_giou_enc"]) == (2.0, 5.0, 2.0)

    no_aux = build_criterion(_args(aux_loss=False), NUM_CLASSES)
    assert "loss_ce_0" not in no_aux.weight_dict
    losses = no_aux(_fake_outputs(0), _targets())
    assert "loss_ce_0" not in losses


def test_parser_defaults_configure_the_criterion():
    criterion = build_criterion(parse_args(TINY + ["--dec_layers", "6"]), NUM_CLASSES)
    assert criterion.one2many is None and criterion.matcher.cost_class == 2.0
    assert criterion.weight_dict["loss_ce_4"] == 2.0  # dec_layers default 6 -> aux 0..4


def test_repeat_targets():
    targets = _targets()
    repeated = repeat_targets(targets, 3)
    assert repeated[0]["labels"].tolist() == [1, 4, 1] * 3
    assert torch.equal(repeated[0]["boxes"], targets[0]["boxes"].repeat(3, 1))
    assert len(repeated[1]["labels"]) == 0
    assert len(targets[0]["labels"]) == 3  # inputs untouched


def test_hybrid_matches_against_repeated_targets():
    seen = []

    class SpyMatcher(HungarianMatcher):
        def forward(self, outputs, targets):
            seen.append([len(t["labels"]) for t in targets])
            return super().forward(outputs, targets)

    weight_dict = build_criterion(_args(num_queries_one2many=NUM_O2M), NUM_CLASSES).weight_dict
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(), weight_dict, one2many="hybrid",
                             o2m_matcher=SpyMatcher(), k_one2many=3)
    criterion(_fake_outputs(NUM_O2M), _targets())
    assert seen == [[9, 0]] * DEC_LAYERS  # main + 3 aux one-to-many layers, each on 3 x 3 targets


def test_hybrid_normaliser_uses_repeated_count():
    # identical predictions for the one-to-one and one-to-many groups: the one-to-many
    # box loss covers k times the pairs and is divided by k times the boxes -> equal
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    box = torch.tensor([[[0.45, 0.5, 0.2, 0.2]]])
    logits = torch.zeros(1, 1, 1)
    outputs = {"pred_logits": logits, "pred_boxes": box,
               "pred_logits_one2many": logits.repeat(1, 2, 1), "pred_boxes_one2many": box.repeat(1, 2, 1)}
    criterion = SetCriterion(1, HungarianMatcher(), {}, one2many="hybrid", o2m_matcher=HungarianMatcher(),
                             k_one2many=2)
    losses = criterion(outputs, targets)
    assert losses["loss_bbox_one2many"].item() == pytest.approx(losses["loss_bbox"].item())
    assert losses["loss_bbox"].item() == pytest.approx(0.05)


def test_hybrid_normaliser_of_a_batch_without_boxes_is_one():
    # H-DETR clamps the repeated count to >= 1 after repeating it: with no box anywhere the
    # one-to-many focal loss is divided by 1, not by k. One query, logit 0 (p = 1/2), negative:
    # (1 - alpha) p^2 * -log(1 - p) = 0.75 * 0.25 * log 2, times Q = 1, divided by 1
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    logits, box = torch.zeros(1, 1, 1), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    outputs = {"pred_logits": logits, "pred_boxes": box, "pred_logits_one2many": logits, "pred_boxes_one2many": box}
    criterion = SetCriterion(1, HungarianMatcher(), {}, one2many="hybrid", o2m_matcher=HungarianMatcher(),
                             k_one2many=6)
    losses = criterion(outputs, targets)
    assert losses["loss_ce_one2many"].item() == pytest.approx(0.75 * 0.25 * math.log(2))
    assert losses["loss_ce"].item() == pytest.approx(0.75 * 0.25 * math.log(2))


def test_encoder_losses_are_class_agnostic():
    # encoder logits with a single class: a target of class 4 must still be matched as class 0
    criterion = build_criterion(_args(), NUM_CLASSES)
    outputs = _fake_outputs(0)
    g = torch.Generator().manual_seed(1)
    enc = _leaf_prediction(g, 2, 30)
    outputs["enc_outputs"] = {"pred_logits": enc["pred_logits"][..., :1], "pred_boxes": enc["pred_boxes"]}
    losses = criterion(outputs, _targets())
    assert torch.isfinite(losses["loss_ce_enc"])


def test_num_boxes_clamped_to_one():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    assert SetCriterion.num_boxes(targets, "cpu").item() == 1.0
    assert SetCriterion.num_boxes(_targets(), "cpu").item() == 3.0


# ----- post-processing ----------------------------------------------------------

def test_postprocess_hand_case():
    logits = torch.tensor([[[-5.0, 3.0, -5.0], [2.0, -5.0, -6.0]]])
    # q0: cxcywh (0.5, 0.5, 0.2, 0.4) -> xyxy (0.4, 0.3, 0.6, 0.7); q1: (0.25, 0.25, 0.5, 0.5) -> (0, 0, 0.5, 0.5)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]])
    sizes = torch.tensor([[100, 200]])  # (h, w)
    out = PostProcess(topk=2)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(out) == 1
    assert torch.allclose(out[0]["scores"], torch.tensor([3.0, 2.0]).sigmoid())
    assert out[0]["labels"].tolist() == [1, 0] and out[0]["labels"].dtype == torch.int64
    assert torch.allclose(out[0]["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 50.0]]))


def test_postprocess_topk_clamped_and_ignores_one2many():
    logits = torch.randn(2, 3, 2)
    boxes = torch.rand(2, 3, 4) * 0.3 + 0.2
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "pred_logits_one2many": torch.full((2, 5, 2), 50.0), "pred_boxes_one2many": torch.rand(2, 5, 4)}
    post = build_postprocessors(_args(topk_eval=100))["bbox"]
    results = post(outputs, torch.tensor([[10, 20], [30, 40]]))
    assert [len(r["scores"]) for r in results] == [6, 6]
    assert torch.allclose(results[0]["scores"].sort(descending=True).values, logits[0].sigmoid().flatten().sort(
        descending=True).values)
