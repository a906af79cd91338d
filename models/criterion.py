"""Training losses: sigmoid focal classification, L1 and GIoU on matched boxes.

``SetCriterion(outputs, targets)`` returns a dict of UNWEIGHTED scalar losses (plus
the logging-only ``class_error``); the engine weights them with
``criterion.weight_dict``. Key scheme:

    loss_ce, loss_bbox, loss_giou            last decoder layer (one-to-one)
    <key>_{i}, i = 0..L-2                    earlier decoder layers ('aux_outputs')
    <key>_enc                                two-stage encoder proposals ('enc_outputs')
    <key>_one2many, <key>_one2many_{i}       one-to-many branch, main and aux layers
    <key>_dn, <key>_dn_{i}                   DINO contrastive denoising ('dn_outputs'), main and aux layers

One-to-many supervision comes in two forms:
    'hybrid' (H-DETR): extra queries, targets repeated k_one2many times, Hungarian matching.
    'mixed'  (MS-DETR): the same queries' one-to-many head, ``TopkIoUAssigner``.

The encoder proposals are matched to class-agnostic targets as the form's upstream does: the
one-to-one matcher on the refined proposal boxes (Deformable DETR, H-DETR), or, in the 'mixed'
form, ``ProposalAnchorMatcher`` on the proposals' anchors without class cost (MS-DETR).
"""
import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from util.dist import all_reduce_sum, get_world_size

from .matcher import TopkIoUAssigner, build_matcher, build_proposal_matcher

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) with Deformable DETR's normalisation.

    Args:
        inputs: (B, Q, K) logits.
        targets: (B, Q, K) binary targets, same dtype as inputs.
        num_boxes: float or 0-dim tensor, the normaliser.
        alpha: weight of positives (negatives get 1 - alpha); < 0 disables weighting.
    Returns:
        0-dim tensor: per-element loss averaged over queries, summed over batch and
        classes, divided by num_boxes. (``SetCriterion`` multiplies it by Q, as
        upstream does, which turns the query mean into a sum.)
    """
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def repeat_targets(targets: List[Dict[str, Tensor]], k: int) -> List[Dict[str, Tensor]]:
    """H-DETR's one-to-many targets: every image's labels (N,) and boxes (N, 4) tiled k times."""
    repeated = []
    for t in targets:
        r = dict(t)
        r["labels"] = t["labels"].repeat(k)
        r["boxes"] = t["boxes"].repeat(k, 1)
        repeated.append(r)
    return repeated


def _class_agnostic(targets: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
    """Targets with every label set to 0 (two-stage proposals are object/no-object)."""
    out = []
    for t in targets:
        r = dict(t)
        r["labels"] = torch.zeros_like(t["labels"])
        out.append(r)
    return out


def _src_index(indices):
    """Flatten per-image (index_i, index_j) into (batch_idx, query_idx), each (M,)."""
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query = torch.cat([src for src, _ in indices])
    return batch, query


def _last_pair_of_each_query(batch_idx: Tensor, query_idx: Tensor, shape) -> Tensor:
    """(M,) bool: True on the last of the M (batch, query) pairs that name each query of a (B, Q) grid."""
    key = batch_idx * shape[1] + query_idx
    position = torch.arange(len(key), device=key.device)
    last = torch.full((shape[0] * shape[1],), -1, dtype=torch.int64, device=key.device)
    return position == last.scatter_reduce(0, key, position, reduce="amax")[key]


class SetCriterion(nn.Module):
    """Matches predictions to targets and computes focal / L1 / GIoU losses.

    Args:
        num_classes: K, number of sigmoid classes (no background class).
        matcher: one-to-one matcher (``HungarianMatcher``).
        weight_dict: loss key -> weight, used by the engine (not applied here).
        focal_alpha: alpha of the focal loss.
        aux_loss: supervise 'aux_outputs' (and their one-to-many counterparts).
        one2many: None, 'hybrid' or 'mixed' (see module docstring).
        o2m_matcher: assigner for the one-to-many branch: ``HungarianMatcher`` on
            repeated targets for 'hybrid', ``TopkIoUAssigner`` for 'mixed'.
        k_one2many: target repetition for 'hybrid'.
        enc_matcher: matcher of the two-stage encoder proposals ('enc_outputs') to the class-agnostic
            targets; None: ``matcher`` (on the refined proposal boxes). The losses always train the
            refined boxes and scores of the matched proposals.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 focal_alpha: float = 0.25, aux_loss: bool = True, one2many: Optional[str] = None,
                 o2m_matcher: Optional[nn.Module] = None, k_one2many: int = 6,
                 enc_matcher: Optional[nn.Module] = None):
        super().__init__()
        if one2many not in (None, "hybrid", "mixed"):
            raise ValueError(f"SetCriterion: one2many must be None, 'hybrid' or 'mixed', got {one2many!r}")
        if one2many is not None and o2m_matcher is None:
            raise ValueError(f"SetCriterion: one2many={one2many!r} needs an o2m_matcher")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.aux_loss = aux_loss
        self.one2many = one2many
        self.o2m_matcher = o2m_matcher
        self.k_one2many = k_one2many
        self.enc_matcher = matcher if enc_matcher is None else enc_matcher

    # ----- individual losses -------------------------------------------------

    def loss_labels(self, outputs, targets, indices, num_boxes, log: bool = False) -> Dict[str, Tensor]:
        """Focal loss over all queries and classes; matched queries are positive on their label.

        A query with two pairs (the one-to-many assigner's step 5) is positive on one label,
        its last pair's, as upstream's label write leaves it.
        outputs['pred_logits']: (B, Q, K). Returns {'loss_ce'} (+ 'class_error' if log).
        """
        logits = outputs["pred_logits"]
        batch_idx, query_idx = _src_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        last = _last_pair_of_each_query(batch_idx, query_idx, logits.shape[:2])
        onehot = torch.zeros_like(logits)
        # a sum of 1 (last pair) and 0s (earlier pairs): exact in any order, and no boolean
        # indexing (which would wait for the device)
        onehot.index_put_((batch_idx, query_idx, matched_labels), last.to(logits.dtype), accumulate=True)
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2.0)
        # upstream scales by Q: the focal loss averages over queries, the DETR
        # recipe's coefficients were tuned for a sum
        losses = {"loss_ce": loss * logits.shape[1]}
        if log:
            losses["class_error"] = self._class_error(logits[batch_idx, query_idx], matched_labels)
        return losses

    @staticmethod
    @torch.no_grad()
    def _class_error(matched_logits: Tensor, labels: Tensor) -> Tensor:
        """100 - top-1 accuracy (%) of the matched queries; 100 when nothing matched (as upstream)."""
        if labels.numel() == 0:
            return torch.full((), 100.0, device=matched_logits.device)
        correct = (matched_logits.argmax(-1) == labels).float().mean()
        return 100.0 * (1.0 - correct)

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        """L1 (cxcywh) and 1 - GIoU (xyxy) over matched pairs, each summed / num_boxes.

        outputs['pred_boxes']: (B, Q, 4) cxcywh. Returns {'loss_bbox', 'loss_giou'}.
        """
        batch_idx, query_idx = _src_index(indices)
        src = outputs["pred_boxes"][batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        # check=False: cxcywh with non-negative sizes is well formed; checking would sync the GPU
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), check=False)
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _match_and_loss(self, outputs, targets, matcher, num_boxes, log: bool = False) -> Dict[str, Tensor]:
        """Match one set of predictions and return its three losses (unsuffixed)."""
        indices = matcher(outputs, targets)
        device = outputs["pred_logits"].device
        # indices from scipy live on CPU; move once so every gather is on-device
        indices = [(i.to(device), j.to(device)) for i, j in indices]
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    # ----- normalisation -----------------------------------------------------

    @staticmethod
    def boxes_per_process(targets: List[Dict[str, Tensor]], device) -> Tensor:
        """Average number of targets per process (summed over all processes), 0-dim, no host sync."""
        local = float(sum(len(t["labels"]) for t in targets))
        total = all_reduce_sum(torch.tensor(local, dtype=torch.float32, device=device))
        return total / get_world_size()

    @staticmethod
    def num_boxes(targets: List[Dict[str, Tensor]], device) -> Tensor:
        """The losses' normaliser: ``boxes_per_process``, at least 1."""
        return SetCriterion.boxes_per_process(targets, device).clamp(min=1.0)

    # ----- groups of outputs ---------------------------------------------------

    def _decoder_losses(self, main: Dict[str, Tensor], aux: List[Dict[str, Tensor]], targets, matcher,
                        num_boxes, suffix: str, log: bool) -> Dict[str, Tensor]:
        """Losses of the last layer (key + suffix) and of earlier layers (key + suffix + _i)."""
        losses = {}
        for k, v in self._match_and_loss(main, targets, matcher, num_boxes, log=log).items():
            losses[k + suffix if k in LOSS_NAMES else k] = v
        if self.aux_loss:
            for i, layer in enumerate(aux):
                for k, v in self._match_and_loss(layer, targets, matcher, num_boxes).items():
                    losses[f"{k}{suffix}_{i}"] = v
        return losses

    def _one2many_losses(self, outputs, targets, boxes_per_process) -> Dict[str, Tensor]:
        main = {"pred_logits": outputs["pred_logits_one2many"], "pred_boxes": outputs["pred_boxes_one2many"]}
        aux = outputs.get("aux_outputs_one2many", [])
        if self.one2many == "hybrid":
            # H-DETR runs the criterion again on k-times repeated targets, so its normaliser is
            # the repeated count's average, clamped to >= 1 after the repetition (a batch without
            # boxes divides by 1, not by k)
            targets = repeat_targets(targets, self.k_one2many)
            boxes_per_process = boxes_per_process * self.k_one2many
        num_boxes = boxes_per_process.clamp(min=1.0)
        return self._decoder_losses(main, aux, targets, self.o2m_matcher, num_boxes, "_one2many", log=False)

    def _denoising_losses(self, dn_outputs: Dict, targets, num_boxes) -> Dict[str, Tensor]:
        """Focal / L1 / GIoU on the denoising block with its known assignment (no matching).

        As DINO: positives are trained on their ground truth; negatives (and padding slots) are
        only in the focal loss, as no-object; the normaliser is num_boxes x the number of groups.
        """
        groups = dn_outputs["groups"]
        main = {"pred_logits": dn_outputs["pred_logits"], "pred_boxes": dn_outputs["pred_boxes"]}
        aux = dn_outputs.get("aux_outputs", [])
        if groups.size == 0:  # no box in the whole batch: an empty block, zero losses (kept in the graph)
            zero = main["pred_logits"].sum() * 0.0
            layers = [""] + ([f"_{i}" for i in range(len(aux))] if self.aux_loss else [])
            return {f"{k}_dn{layer}": zero for layer in layers for k in LOSS_NAMES}
        assignment = groups.assignment()
        return self._decoder_losses(main, aux, targets, lambda _outputs, _targets: assignment,
                                    num_boxes * groups.num_groups, "_dn", log=False)

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Args:
            outputs: model output dict ('pred_logits' (B, Q, K), 'pred_boxes' (B, Q, 4), optional
                'aux_outputs', 'enc_outputs' (with 'anchors' for the 'mixed' form's proposal matching),
                'pred_logits_one2many', 'pred_boxes_one2many',
                'aux_outputs_one2many', 'dn_outputs').
            targets: B dicts with 'labels' (N_b,) int64 and 'boxes' (N_b, 4) cxcywh in [0, 1].
        Returns:
            dict of unweighted 0-dim losses (+ 'class_error' for logging).
        """
        boxes_per_process = self.boxes_per_process(targets, outputs["pred_logits"].device)
        num_boxes = boxes_per_process.clamp(min=1.0)
        main = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        losses = self._decoder_losses(main, outputs.get("aux_outputs", []), targets, self.matcher,
                                      num_boxes, suffix="", log=True)
        if "enc_outputs" in outputs:
            enc = self._match_and_loss(outputs["enc_outputs"], _class_agnostic(targets), self.enc_matcher, num_boxes)
            losses.update({k + "_enc": v for k, v in enc.items()})
        if self.one2many is not None and "pred_logits_one2many" in outputs:
            losses.update(self._one2many_losses(outputs, targets, boxes_per_process))
        if "dn_outputs" in outputs:
            losses.update(self._denoising_losses(outputs["dn_outputs"], targets, num_boxes))
        return losses


# ----- construction -------------------------------------------------------------

# MS-DETR's own encoder-proposal loss weights: its parser defaults, which do not follow the main weights
MS_DETR_ENC_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _coef(value: Optional[float], fallback: float) -> float:
    """An optional loss weight flag: unset (None) takes the weight it defaults to."""
    return fallback if value is None else value


def build_weight_dict(args) -> Dict[str, float]:
    """Loss weights for every key the criterion can produce under ``args``.

    main: cls/bbox/giou_loss_coef (2, 5, 2), repeated for each aux layer (dec_layers - 1);
    enc: enc_*_loss_coef, None -> each form's upstream default: MS-DETR's (2, 5, 2) in the 'mixed'
        form, else the main coefficient (Deformable DETR, H-DETR);
    one-to-many: hybrid -> main weights * lambda_one2many; mixed -> o2m_*_loss_coef (2, 5, 2);
    denoising (--use_dn): dn_*_loss_coef, None -> the main coefficient, on every layer.
    """
    base = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    num_aux = args.dec_layers - 1 if args.aux_loss else 0

    def with_aux(weights: Dict[str, float], suffix: str) -> Dict[str, float]:
        out = {k + suffix: v for k, v in weights.items()}
        for i in range(num_aux):
            out.update({f"{k}{suffix}_{i}": v for k, v in weights.items()})
        return out

    mode = one2many_mode(args)
    enc_default = MS_DETR_ENC_WEIGHTS if mode == "mixed" else base
    weight_dict = with_aux(base, "")
    weight_dict.update({
        "loss_ce_enc": _coef(args.enc_cls_loss_coef, enc_default["loss_ce"]),
        "loss_bbox_enc": _coef(args.enc_bbox_loss_coef, enc_default["loss_bbox"]),
        "loss_giou_enc": _coef(args.enc_giou_loss_coef, enc_default["loss_giou"]),
    })
    if mode == "hybrid":
        lam = args.lambda_one2many
        weight_dict.update(with_aux({k: v * lam for k, v in base.items()}, "_one2many"))
    elif mode == "mixed":
        o2m = {"loss_ce": args.o2m_cls_loss_coef, "loss_bbox": args.o2m_bbox_loss_coef,
               "loss_giou": args.o2m_giou_loss_coef}
        weight_dict.update(with_aux(o2m, "_one2many"))
    if args.use_dn:
        dn = {
            "loss_ce": _coef(args.dn_cls_loss_coef, base["loss_ce"]),
            "loss_bbox": _coef(args.dn_bbox_loss_coef, base["loss_bbox"]),
            "loss_giou": _coef(args.dn_giou_loss_coef, base["loss_giou"]),
        }
        weight_dict.update(with_aux(dn, "_dn"))
    return weight_dict


def one2many_mode(args) -> Optional[str]:
    """'mixed' with --use_ms_detr, 'hybrid' with --num_queries_one2many > 0, else None."""
    if args.use_ms_detr:
        return "mixed"
    if args.num_queries_one2many > 0:
        return "hybrid"
    return None


def build_criterion(args, num_classes: int) -> SetCriterion:
    """SetCriterion (with ``.weight_dict``) configured from parsed flags.

    Every choice follows the form's upstream: the 'mixed' form (MS-DETR) matches the encoder
    proposals with ``ProposalAnchorMatcher``, the others with the one-to-one matcher.
    """
    matcher = build_matcher(args)
    mode = one2many_mode(args)
    o2m_matcher, enc_matcher = None, None
    if mode == "hybrid":
        o2m_matcher = copy.deepcopy(matcher)
    elif mode == "mixed":
        o2m_matcher = TopkIoUAssigner(k=args.o2m_matcher_k, threshold=args.o2m_matcher_threshold)
        enc_matcher = build_proposal_matcher(args)
    return SetCriterion(num_classes, matcher, build_weight_dict(args), focal_alpha=args.focal_alpha,
                        aux_loss=args.aux_loss, one2many=mode, o2m_matcher=o2m_matcher,
                        k_one2many=args.k_one2many, enc_matcher=enc_matcher)
