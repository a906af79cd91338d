"""Candidate sources (``--ref_source``): what the boxes are that a token may take its references from.

A source is called after every decoder layer as ``source(decoder_state, num_queries_one2one,
generator, inputs)``: decoder_state holds the layers' predictions so far (``logits``, ``boxes``
and, in the mixed form, ``logits_one2many``/``boxes_one2many`` lists of (bs, Q, ...)); generator
is the ``EncoderReferenceGenerator`` (its flags: ``ref_queries``, and ``ranking``, the ranking
rule's registry entry); inputs the forward's ``GuidanceInputs`` (None when nothing was needed).
It returns a ``CandidateSet``.
"""
import torch

from util.box_ops import box_cxcywh_to_xyxy

from .candidates import CandidateSet, ColumnMap, make_candidates


def from_decoder(decoder_state, num_queries_one2one: int, generator, inputs) -> CandidateSet:
    """The latest decoder layer's predictions (design §6): per query (ranking by map weight) or
    per prediction (v3.0.1); the mixed form's one-to-many predictions when that layer made them."""
    mixed = len(decoder_state.logits_one2many) == len(decoder_state.logits) > 0
    return make_candidates(decoder_state.logits[-1], decoder_state.boxes[-1], num_queries_one2one,
                           generator.ref_queries,
                           decoder_state.logits_one2many[-1] if mixed else None,
                           decoder_state.boxes_one2many[-1] if mixed else None,
                           per_query=generator.ranking.per_query)


def from_ground_truth(decoder_state, num_queries_one2one: int, generator, inputs) -> CandidateSet:
    """The oracle (a control, never a detector): each image's ground-truth boxes, class-agnostic,
    padded to the batch's largest count (``valid`` False on padding; scores 0, so ties go to the
    lower GT index).

    For a ranking rule that reads the map, each decoder query (its box as ``from_decoder`` gives
    it) stands for the GT box it overlaps most (``assign_to_best_box``), so a GT box's map weight
    for a token is the sum over the queries assigned to it.
    """
    boxes, valid = inputs.gt_boxes, inputs.gt_valid
    columns = None
    if generator.ranking.reads_map:
        queries = from_decoder(decoder_state, num_queries_one2one, generator, inputs)
        columns = ColumnMap(boxes.shape[1], assign_to_best_box(queries.boxes.detach(), boxes, valid))
    return CandidateSet(boxes, boxes.new_zeros(boxes.shape[:2], dtype=torch.float32), valid, columns)


def assign_to_best_box(predictions: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
    """Each prediction's GT box of largest IoU, when that IoU is > 0.

    predictions (bs, Q, 4), gt_boxes (bs, G, 4) cxcywh; gt_valid (bs, G) bool. Returns (bs, Q)
    int64 GT index (ties: the lower index), -1 where the prediction overlaps no valid GT box (or is
    degenerate, IoU NaN). Every query gets a box, unlike a one-to-one (Hungarian) assignment.
    """
    bs, num_queries = predictions.shape[:2]
    if gt_boxes.shape[1] == 0:
        return torch.full((bs, num_queries), -1, dtype=torch.int64, device=predictions.device)
    pred = box_cxcywh_to_xyxy(predictions.float())[:, :, None]   # (bs, Q, 1, 4)
    gt = box_cxcywh_to_xyxy(gt_boxes.float())[:, None]           # (bs, 1, G, 4)
    size = (torch.minimum(pred[..., 2:], gt[..., 2:]) - torch.maximum(pred[..., :2], gt[..., :2])).clamp(min=0)
    inter = size[..., 0] * size[..., 1]
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iou = inter / (area(pred) + area(gt) - inter)
    iou = iou.nan_to_num(nan=-1.0).masked_fill(~gt_valid[:, None], -1.0)
    best = iou.argmax(-1)
    best_iou = iou.gather(-1, best[..., None])[..., 0]
    return torch.where(best_iou > 0, best, -1)
