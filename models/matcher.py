"""Assignment of predictions to ground-truth boxes.

* ``HungarianMatcher``: one-to-one bipartite matching (DETR / Deformable DETR).
* ``ProposalAnchorMatcher``: MS-DETR's one-to-one matching of two-stage encoder proposals, on
  their anchors and by box costs alone.
* ``TopkIoUAssigner``: one-to-many assignment used by MS-DETR's mixed supervision.

Each returns, per image, a pair ``(index_i, index_j)`` of int64 tensors of equal
length: ``index_i`` indexes predictions (queries), ``index_j`` indexes that image's
targets. The one-to-one matchers give a prediction at most one target; the top-k
assigner can give it two (its step 5).
"""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_dtype, box_iou, generalized_box_iou

Indices = List[Tuple[Tensor, Tensor]]


def focal_class_cost(prob: Tensor, tgt_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-loss-shaped classification cost (Deformable DETR).

    The cost of assigning a prediction to a target of class c is the focal loss the
    prediction would pay for being positive on c, minus what it pays for being
    negative on c (which it would pay if left unmatched), so the difference is the
    marginal cost of the assignment.

    Args:
        prob: (P, K) sigmoid class probabilities.
        tgt_labels: (T,) int64 class ids.
    Returns:
        (P, T) cost.
    """
    eps = 1e-8  # keeps log finite at probabilities of exactly 0 or 1
    p = prob[:, tgt_labels]
    pos = alpha * (1 - p) ** gamma * -(p + eps).log()
    neg = (1 - alpha) * p ** gamma * -(1 - p + eps).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one matching minimising a weighted sum of class, L1 and GIoU costs.

    cost(q, t) = cost_class * focal_class_cost(q, t)
               + cost_bbox  * ||box_q - box_t||_1            (cxcywh)
               + cost_giou  * -GIoU(box_q, box_t)             (xyxy)

    solved per image with scipy's ``linear_sum_assignment`` on CPU.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Pairwise matching cost.

        Args:
            pred_logits: (P, K) raw logits.
            pred_boxes: (P, 4) cxcywh.
            tgt_labels: (T,) int64.
            tgt_boxes: (T, 4) cxcywh.
        Returns:
            (P, T) cost in ``box_dtype(pred_boxes.dtype)``: float32, or float64 for a float64 model.
        """
        # float32 even under autocast: the assignment is sensitive to small differences (and a
        # float64 model keeps float64, so its assignment breaks ties as a float64 upstream does)
        dtype = box_dtype(pred_boxes.dtype)
        prob = pred_logits.to(dtype).sigmoid()
        pred_boxes = pred_boxes.to(dtype)
        tgt_boxes = tgt_boxes.to(dtype)
        cost = self.cost_bbox * torch.cdist(pred_boxes, tgt_boxes, p=1)
        if self.cost_class != 0:  # a box-only matcher skips the class term (and any non-finite logit in it)
            cost = cost + self.cost_class * focal_class_cost(prob, tgt_labels, self.focal_alpha, self.focal_gamma)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Indices:
        """Match each image's predictions to its targets.

        Args:
            outputs: 'pred_logits' (B, Q, K), 'pred_boxes' (B, Q, 4) cxcywh.
            targets: B dicts with 'labels' (N_b,) int64 and 'boxes' (N_b, 4) cxcywh.
        Returns:
            B pairs (index_i, index_j), CPU int64, each of length min(Q, N_b).
        """
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [_empty_pair() for _ in range(batch_size)]
        # One batched cost over all targets of all images (cheaper than B small
        # calls); each image then only reads its own column block.
        cost = self.cost_matrix(
            outputs["pred_logits"].flatten(0, 1),
            outputs["pred_boxes"].flatten(0, 1),
            torch.cat([t["labels"] for t in targets]),
            torch.cat([t["boxes"] for t in targets]),
        )
        cost = cost.view(batch_size, num_queries, -1).cpu()
        indices = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class ProposalAnchorMatcher(nn.Module):
    """MS-DETR's matching of the two-stage encoder proposals to the (class-agnostic) targets.

    Each proposal is matched by where it started, its anchor, not by where the head moved it, and
    by box costs alone: Hungarian matching with ``cost_class = 0`` on ``outputs['anchors']``
    (B, P, 4) cxcywh, the generated proposal boxes before refinement. The criterion then trains the
    matched proposals' refined boxes and scores. (Deformable DETR and H-DETR instead match the
    refined boxes with the full one-to-one cost.)
    """

    def __init__(self, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        self.hungarian = HungarianMatcher(cost_class=0.0, cost_bbox=cost_bbox, cost_giou=cost_giou)

    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Indices:
        """Args: 'pred_logits' (B, P, K) and 'anchors' (B, P, 4) cxcywh; targets as ``HungarianMatcher``.
        Returns B pairs (index_i, index_j), CPU int64."""
        if "anchors" not in outputs:
            raise KeyError("ProposalAnchorMatcher: the encoder outputs have no 'anchors' (the proposals "
                           "before refinement), which MS-DETR's proposal matching needs")
        return self.hungarian({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["anchors"]}, targets)


def _empty_pair(device=None) -> Tuple[Tensor, Tensor]:
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return empty, empty.clone()


class TopkIoUAssigner(nn.Module):
    """One-to-many assignment of MS-DETR ("Stage2Assigner", adapted from DETA).

    Rule, per image with Q predictions and T > 0 targets:

    1. Score every (target t, prediction q) pair:
       ``s[t, q] = coef_box * IoU(box_q, box_t) + coef_cls * sigmoid(logit_q)[label_t]``.
    2. Each prediction picks its best target ``g(q) = argmax_t s[t, q]``; it is a
       positive candidate if ``max_t s[t, q] >= threshold``. In addition, for every
       target its single highest-scoring prediction is made a candidate (keeping that
       prediction's own ``g(q)``), so every target has a chance of a match.
    3. If there are more than ``int(positive_fraction * Q)`` candidates, that many
       are kept at random (detectron2-style fg subsampling).
    4. Target t is given ``n_t = min(k, #kept candidates with g(q) = t)`` predictions:
       its ``n_t`` highest-scoring predictions over *all* Q (not only the candidates).
    5. Step 4 can give one prediction to two targets (overlapping ground truth, good
       predictions). Both pairs are kept, as upstream keeps them: the box losses train
       the prediction toward both boxes, and ``SetCriterion`` gives it one class target,
       its last pair's, which the ascending order makes the higher-scoring one (upstream
       writes the labels in that order, so the last write stays).

    Returned pairs are on the predictions' device, in ascending score order.
    Images without targets get no pairs.
    """

    def __init__(self, k: int = 6, threshold: float = 0.4, coef_box: float = 0.7, coef_cls: float = 0.3,
                 positive_fraction: float = 0.25):
        super().__init__()
        if k < 1:
            raise ValueError(f"TopkIoUAssigner: k must be >= 1, got {k}")
        self.k = k
        self.threshold = threshold
        self.coef_box = coef_box
        self.coef_cls = coef_cls
        self.positive_fraction = positive_fraction

    def score_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Match quality, (T, Q): coef_box * IoU + coef_cls * class probability (float32 or wider)."""
        dtype = box_dtype(pred_boxes.dtype)
        iou, _ = box_iou(box_cxcywh_to_xyxy(tgt_boxes.to(dtype)), box_cxcywh_to_xyxy(pred_boxes.to(dtype)))
        prob = pred_logits.to(dtype).sigmoid()[:, tgt_labels].t()
        return self.coef_box * iou + self.coef_cls * prob

    def _candidate_counts(self, scores: Tensor) -> Tensor:
        """Steps 2-3: number of kept candidates whose best target is t, (T,) int64."""
        num_targets, num_queries = scores.shape
        best_score, best_target = scores.max(dim=0)
        candidate = best_score >= self.threshold
        # every target's top prediction becomes a candidate regardless of threshold
        candidate[scores.argmax(dim=1)] = True
        cand_idx = candidate.nonzero().squeeze(1)
        max_pos = int(self.positive_fraction * num_queries)
        if cand_idx.numel() > max_pos:
            keep = torch.randperm(cand_idx.numel(), device=cand_idx.device)[:max_pos]
            cand_idx = cand_idx[keep]
        return torch.bincount(best_target[cand_idx], minlength=num_targets)

    def assign_one(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor):
        """Assignment for one image.

        Args:
            pred_logits: (Q, K); pred_boxes: (Q, 4) cxcywh; tgt_labels: (T,); tgt_boxes: (T, 4) cxcywh.
        Returns:
            (index_i, index_j) int64 on pred_logits' device.
        """
        num_queries = pred_logits.shape[0]
        if len(tgt_labels) == 0 or num_queries == 0:
            return _empty_pair(pred_logits.device)
        scores = self.score_matrix(pred_logits, pred_boxes, tgt_labels, tgt_boxes)
        counts = self._candidate_counts(scores).clamp(max=self.k)
        top_score, top_pred = scores.topk(min(self.k, num_queries), dim=1)  # (T, k), descending
        rank = torch.arange(top_pred.shape[1], device=scores.device)
        take = rank[None, :] < counts[:, None]
        tgt_idx = torch.arange(len(tgt_labels), device=scores.device)[:, None].expand_as(top_pred)[take]
        pred_idx, score = top_pred[take], top_score[take]
        order = score.argsort(stable=True)
        return pred_idx[order], tgt_idx[order]

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Indices:
        """Args: as ``HungarianMatcher.forward``. Returns B pairs (index_i, index_j) int64."""
        return [
            self.assign_one(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"])
            for b, t in enumerate(targets)
        ]


def build_proposal_matcher(args) -> ProposalAnchorMatcher:
    """MS-DETR's encoder-proposal matcher: the one-to-one box costs (``--set_cost_bbox/giou``), no class cost."""
    return ProposalAnchorMatcher(cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou)


def build_matcher(args) -> HungarianMatcher:
    """One-to-one matcher from ``--set_cost_class/bbox/giou`` and ``--focal_alpha``."""
    return HungarianMatcher(
        cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou,
        focal_alpha=args.focal_alpha,
    )
