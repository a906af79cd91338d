"""Which encoder proposals the two-stage loss trains: each form as its upstream matches them.

Deformable DETR and H-DETR match the refined proposal boxes with the full one-to-one cost (class
cost included); MS-DETR matches the proposals' anchors (the boxes before the head's refinement)
with box costs only. A hand-built case where the four choices pick three different proposals,
with the losses worked out by hand, and the presets of the research setting resolved to the
MS-DETR matching.
"""
import glob
import math
import os

import pytest
import torch

from cli.config import load_variants, parse_args
from models.criterion import build_criterion
from models import matcher as matchers
from models.matcher import HungarianMatcher
from tests.helpers import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# One target t = (0.5, 0.5, 0.2, 0.2) cxcywh, i.e. x and y in [0.4, 0.6]; class 3 in the data, class 0
# (object) for the proposals. Three proposals, one class logit each:
#              anchor (before refinement)     refined box                 logit
#   p0         (0.50, 0.5, 0.2, 0.2) = t      (0.5, 0.80, 0.2, 0.2)       -ln 3  (p = 1/4)
#   p1         (0.20, 0.5, 0.2, 0.2)          (0.55, 0.5, 0.2, 0.2)       -ln 3  (p = 1/4)
#   p2         (0.55, 0.5, 0.2, 0.2)          (0.60, 0.5, 0.2, 0.2)       +ln 3  (p = 3/4)
#
# Box costs, 5 * L1 - 2 * GIoU (each box 0.2 x 0.2, area 0.04):
#   equal to t:             L1 0,    GIoU 1                                   -> -2
#   shifted 0.05 in x:      L1 0.05, inter 0.03, union 0.05, hull 0.05: GIoU 0.6  -> 0.25 - 1.2 = -0.95
#   shifted 0.10 in x:      L1 0.1,  inter 0.02, union 0.06, hull 0.06: GIoU 1/3  -> 0.5 - 2/3 = -0.167
#   shifted 0.30 (x or y):  L1 0.3,  inter 0, union 0.08, hull 0.1: GIoU -0.2     -> 1.5 + 0.4 = 1.9
# Class cost (focal, alpha 1/4, gamma 2), weight 2:
#   p = 1/4: 2 * (1/4 (3/4)^2 ln 4 - 3/4 (1/4)^2 ln 4/3) = 2 * 0.18146 = +0.363
#   p = 3/4: 2 * (1/4 (1/4)^2 ln 4/3 - 3/4 (3/4)^2 ln 4) = 2 * -0.58035 = -1.161
# Totals (p0, p1, p2) and the pick:
#   anchors, box costs only  (MS-DETR):            -2,     1.9,    -0.95   -> p0
#   anchors, with class cost:                      -1.637, 2.263,  -2.111  -> p2
#   refined, with class cost (DDETR, H-DETR):      2.263,  -0.587, -1.327  -> p2
#   refined, box costs only:                       1.9,    -0.95,  -0.167  -> p1
ANCHORS = [[0.50, 0.5, 0.2, 0.2], [0.20, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2]]
REFINED = [[0.50, 0.8, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2], [0.60, 0.5, 0.2, 0.2]]
LOGITS = [-math.log(3.0), -math.log(3.0), math.log(3.0)]

# Losses of the matched proposal (refined box, num_boxes 1). The focal loss is summed over the three
# proposals (upstream's mean over queries times their number):
#   p0 matched: L1 |0.8 - 0.5| = 0.3; GIoU -0.2 -> 1.2;
#       focal: p0 positive at 1/4: 1/4 (3/4)^2 ln 4 = 9/64 ln 4; p1 negative at 1/4: 3/4 (1/4)^2 ln 4/3
#       = 3/64 ln 4/3; p2 negative at 3/4: 3/4 (3/4)^2 ln 4 = 27/64 ln 4
#   p2 matched: L1 0.1; GIoU 1/3 -> 2/3;
#       focal: p2 positive at 3/4: 1/4 (1/4)^2 ln 4/3 = 1/64 ln 4/3; p0, p1 negative: 2 * 3/64 ln 4/3
MS_DETR_LOSSES = {"loss_bbox_enc": 0.3, "loss_giou_enc": 1.2,
                  "loss_ce_enc": 36 / 64 * math.log(4.0) + 3 / 64 * math.log(4 / 3)}
REFINED_FULL_COST_LOSSES = {"loss_bbox_enc": 0.1, "loss_giou_enc": 2 / 3, "loss_ce_enc": 7 / 64 * math.log(4 / 3)}


def _encoder_outputs():
    return {"pred_logits": torch.tensor(LOGITS, dtype=torch.float64).view(1, 3, 1),
            "pred_boxes": torch.tensor([REFINED], dtype=torch.float64),
            "anchors": torch.tensor([ANCHORS], dtype=torch.float64)}


def _targets(label: int = 3):
    return [{"labels": torch.tensor([label]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)}]


def _outputs():
    """A one-query decoder (matched exactly, its losses are not under test) and the three proposals."""
    decoder = {"pred_logits": torch.zeros(1, 1, 5, dtype=torch.float64),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], dtype=torch.float64)}
    return {**decoder, "enc_outputs": _encoder_outputs()}


def _picked(matcher, boxes_key: str):
    outputs = _encoder_outputs()
    outputs = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs[boxes_key]}
    (rows, cols), = matcher(outputs, _targets(label=0))
    return rows.tolist(), cols.tolist()


def test_the_case_separates_the_four_matching_choices():
    """Anchors vs refined boxes and with vs without the class cost: three different proposals."""
    full, box_only = HungarianMatcher(2.0, 5.0, 2.0), HungarianMatcher(0.0, 5.0, 2.0)
    assert _picked(box_only, "anchors") == ([0], [0])
    assert _picked(full, "anchors") == ([2], [0])
    assert _picked(full, "pred_boxes") == ([2], [0])
    assert _picked(box_only, "pred_boxes") == ([1], [0])


def _args(*flags):
    return parse_args(TINY + ["--dec_layers", "1", *flags])


def _enc_losses(criterion):
    losses = criterion(_outputs(), _targets())
    return {k: losses[k].item() for k in MS_DETR_LOSSES}


def test_mixed_form_matches_proposals_on_anchors_without_class_cost():
    """MS-DETR: the proposal whose anchor is the target (p0) is trained, on its refined box and score."""
    criterion = build_criterion(_args("--use_ms_detr"), num_classes=5)
    assert _enc_losses(criterion) == pytest.approx(MS_DETR_LOSSES, rel=1e-12)
    assert [(i.tolist(), j.tolist()) for i, j in criterion.enc_matcher(_encoder_outputs(), _targets(0))] \
        == [([0], [0])]


@pytest.mark.parametrize("flags", [[], ["--num_queries_one2many", "4"]], ids=["deformable_detr", "hybrid"])
def test_other_forms_match_refined_boxes_with_the_full_cost(flags):
    """Deformable DETR and H-DETR: the one-to-one matcher on the refined boxes picks p2."""
    criterion = build_criterion(_args(*flags), num_classes=5)
    assert _enc_losses(criterion) == pytest.approx(REFINED_FULL_COST_LOSSES, rel=1e-12)
    assert criterion.enc_matcher is criterion.matcher


def test_proposal_matcher_needs_anchors():
    outputs = _encoder_outputs()
    del outputs["anchors"]
    with pytest.raises(KeyError, match="anchors"):
        matchers.ProposalAnchorMatcher()(outputs, _targets(0))


def test_mixed_form_rejects_zero_box_costs():
    with pytest.raises(ValueError, match="--set_cost_bbox and --set_cost_giou"):
        _args("--use_ms_detr", "--set_cost_bbox", "0", "--set_cost_giou", "0")


# ----- the presets of the research setting ----------------------------------------------------

def _preset_cases():
    """(id, flags) for every guided preset in the MS-DETR form: the research configs (single- and
    two-stage, as scripts/_run_variant.sh runs them) and every variants.yaml preset on the demo."""
    cases = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "v3.0.*.yaml"))):
        name = os.path.basename(path)
        cases.append((name, ["--config", path]))
        cases.append((name + "+two_stage", ["--config", path, "--two_stage", "--mixed_selection"]))
    for variant in load_variants():
        cases.append((f"demo.yaml --variant {variant}",
                      ["--config", os.path.join(CONFIGS, "demo.yaml"), "--variant", variant]))
    return cases


@pytest.mark.parametrize("flags", [flags for _, flags in _preset_cases()], ids=[i for i, _ in _preset_cases()])
def test_guided_presets_match_proposals_on_anchors_without_class_cost(flags):
    args = parse_args(flags + ["--device", "cpu", "--backbone_weights", "none"])
    assert args.use_ms_detr
    criterion = build_criterion(args, num_classes=5)
    assert _enc_losses(criterion) == pytest.approx(MS_DETR_LOSSES, rel=1e-12)
    matcher = criterion.enc_matcher
    assert isinstance(matcher, matchers.ProposalAnchorMatcher)
    assert (matcher.hungarian.cost_class, matcher.hungarian.cost_bbox, matcher.hungarian.cost_giou) \
        == (0.0, args.set_cost_bbox, args.set_cost_giou)
