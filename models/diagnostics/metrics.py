"""The numbers of the reference diagnostics (docs/design.md §9, D1-D6) as pure functions of one image's tensors.

Shapes: T tokens (padding already removed), H heads, L levels, P points, S reference slots per
token, G ground-truth boxes. Coordinates are normalised to the image's valid region unless a
docstring says otherwise. Per-token results come with a ``defined`` mask: a token whose value
does not exist (no pairs, no matched reference, ...) is left out of every mean, so no NaN
ever reaches a metric.
"""
import math
from typing import NamedTuple, Tuple

import torch

from util.box_ops import box_cxcywh_to_xyxy, elementwise_box_iou

from .geometry import inside_any_box, inside_box


class ForegroundSums(NamedTuple):
    """Attention weight sums per sampled level (L,) for D4; tokens split by whether a GT box contains them.

    Only weight that lands inside the image's valid region counts towards the foreground: weight
    off the image can never be on an object, so shares are taken of the in-image weight.
    """
    fg_in: torch.Tensor   # in-image weight inside any GT box, tokens inside a GT box
    img_in: torch.Tensor  # in-image weight of tokens inside a GT box
    fg_out: torch.Tensor  # in-image weight inside any GT box, tokens outside every GT box
    img_out: torch.Tensor
    own_in: torch.Tensor  # in-image weight of inside tokens that lies in their own (smallest containing) box


# the valid region of an image in its own normalised coordinates (xyxy)
_WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


def inside_image(locations: torch.Tensor) -> torch.Tensor:
    """locations (..., 2) in valid-region coordinates -> (...) bool, True inside [0, 1] x [0, 1] (borders in)."""
    return inside_box(locations, locations.new_tensor(_WHOLE_IMAGE))


def off_image_sampling(locations: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """D4 OffImage sums of one encoder layer on one image: the weight outside the valid region.

    locations (T, H, L, P, 2) in valid-region coordinates, weights (T, H, L, P).
    Returns (off-image weight (L,), all weight (L,)) per sampled level.
    """
    weights = weights.float()
    off = weights * ~inside_image(locations)
    return off.sum((0, 1, 3)), weights.sum((0, 1, 3))


def foreground_sampling(locations: torch.Tensor, weights: torch.Tensor, token_box: torch.Tensor,
                        gt_boxes: torch.Tensor) -> ForegroundSums:
    """D4 sums of one encoder layer on one image.

    locations (T, H, L, P, 2) in valid-region coordinates, weights (T, H, L, P), token_box (T,) int64
    index of the smallest GT box containing each token (-1: none), gt_boxes (G, 4) xyxy.
    Returns ForegroundSums of (L,) tensors. A location counts as foreground only inside the image
    (a GT box reaching past the border does not make off-image weight foreground), so with one GT
    box covering the whole image fg_in == img_in exactly.
    """
    weights = weights.float() * inside_image(locations)  # in-image weight only
    foreground = inside_any_box(locations, gt_boxes)  # (T, H, L, P)
    inside_token = token_box >= 0
    own = gt_boxes[token_box.clamp(min=0)]  # (T, 4); rows of outside tokens are ignored below
    in_own = inside_box(locations, own[:, None, None, None, :])

    def per_level(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(T, H, L, P) -> (L,) summed over the selected tokens, heads and points."""
        return (values * tokens[:, None, None, None]).sum((0, 1, 3))

    fg = weights * foreground
    return ForegroundSums(per_level(fg, inside_token), per_level(weights, inside_token),
                          per_level(fg, ~inside_token), per_level(weights, ~inside_token),
                          per_level(weights * in_own, inside_token))


def weight_entropy(weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """D5: weights (..., L, P), summing to 1 over L x P -> (normalised entropy, N_eff), each (...).

    With the entropy in nats E = -sum w log w over the L * P samples: the normalised entropy is
    E / log(L * P), in [0, 1] (1 = uniform weights); N_eff = exp(E), the effective number of
    samples, in [1, L * P] (L * P = uniform, 1 = one sample takes all). N_eff is exp of the entropy
    in nats, not of the normalised entropy: they are different numbers (uniform: 1 and L * P).
    """
    flat = weights.float().flatten(-2)
    entropy = -torch.special.xlogy(flat, flat).sum(-1)
    samples = flat.shape[-1]
    normalised = entropy / math.log(samples) if samples > 1 else torch.ones_like(entropy)
    return normalised, entropy.exp()


def sampling_distance(locations: torch.Tensor, references: torch.Tensor, level_sizes: torch.Tensor) -> torch.Tensor:
    """D5: distance of each sampling location from its reference, in pixels (strides) of its level.

    At initialisation it is fixed by the offset init (models/ms_deform_attn.py): head h's point p
    sits (p + 1) cells along a direction whose larger coordinate is 1, so the mean over points is
    (P + 1) / 2 and over heads the mean direction length; with H = 8 four directions are axis
    aligned (length 1) and four diagonal (sqrt 2): 2.5 * (1 + sqrt 2) / 2 = 3.018 cells at P = 4.

    locations (T, H, L, P, 2) and references broadcastable to it, both normalised to the padded level
    as the operator reads them; level_sizes (L, 2) float (W, H) of each level.
    Returns (T, H, L, P).
    """
    offset = (locations.float() - references.float()) * level_sizes.float()[:, None, :]
    return offset.norm(dim=-1)


def slot_share(weights: torch.Tensor) -> torch.Tensor:
    """D5, per-point references: weights (T, H, L, P) -> (T, P) share of each point slot (mean over heads).

    Under uniform weights (as at initialisation) every slot holds 1 / P.
    """
    return weights.float().sum(2).mean(1)


def _slot_pairs(slots: int):
    return [(i, j) for i in range(slots) for j in range(i + 1, slots)]


def duplicate_fraction(slot_boxes: torch.Tensor, valid: torch.Tensor, threshold: float
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """D1: per token, the fraction of its pairs of (valid) reference boxes with IoU > threshold.

    slot_boxes (T, S, 4) cxcywh, valid (T, S) bool -> fraction (T,), defined (T,) (at least one pair).
    """
    num_tokens, slots = valid.shape
    boxes = box_cxcywh_to_xyxy(slot_boxes.float())
    duplicates = torch.zeros(num_tokens, device=valid.device)
    pairs = torch.zeros(num_tokens, device=valid.device)
    for i, j in _slot_pairs(slots):  # S(S-1)/2 pairs of slots, each over all tokens at once
        both = (valid[:, i] & valid[:, j]).float()
        iou, _ = elementwise_box_iou(boxes[:, i], boxes[:, j])
        duplicates += both * (iou.nan_to_num(0.0) > threshold)
        pairs += both
    defined = pairs > 0
    return duplicates / pairs.clamp(min=1), defined


def distinct_object_ratio(slot_gt: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """D1: per token, unique matched GT ids / references matched to any GT.

    slot_gt (T, S) int64 matched GT index per slot (-1: none), valid (T, S) bool
    -> ratio (T,), defined (T,) (at least one matched reference).
    """
    matched = valid & (slot_gt >= 0)
    first_of_its_id = matched.clone()
    for i, j in _slot_pairs(slot_gt.shape[1]):  # slot j repeats an id already held by slot i < j
        first_of_its_id[:, j] &= ~(matched[:, i] & (slot_gt[:, i] == slot_gt[:, j]))
    count = matched.sum(1)
    return first_of_its_id.sum(1) / count.clamp(min=1), count > 0


def same_object_fraction(centres: torch.Tensor, valid: torch.Tensor, own_boxes: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """D2: per token, the fraction of its (valid) reference centres inside the token's own box.

    centres (T, S, 2), valid (T, S), own_boxes (T, 4) xyxy -> fraction (T,), defined (T,).
    """
    inside = inside_box(centres, own_boxes[:, None, :]) & valid
    count = valid.sum(1)
    return inside.sum(1) / count.clamp(min=1), count > 0


def set_jaccard(ids_a: torch.Tensor, valid_a: torch.Tensor, ids_b: torch.Tensor, valid_b: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """D3: per token, |A n B| / |A u B| of two sets of candidate ids (each id at most once per set).

    ids_a (T, S), valid_a (T, S), ids_b (T, S'), valid_b (T, S') -> jaccard (T,), defined (T,) (union non-empty).
    """
    same = (ids_a[:, :, None] == ids_b[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]
    common = same.any(2).sum(1)
    union = valid_a.sum(1) + valid_b.sum(1) - common
    return common / union.clamp(min=1), union > 0


def symmetric_chamfer(points_a: torch.Tensor, valid_a: torch.Tensor, points_b: torch.Tensor,
                      valid_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """D3: per token, the mean of the two directed Chamfer distances between point sets A and B:
    (mean over a of min over b |a - b| + mean over b of min over a |a - b|) / 2.

    points_a (T, S, 2), valid_a (T, S), points_b (T, S', 2), valid_b (T, S') in any one unit
    -> distance (T,) in that unit, defined (T,) (both sets non-empty).
    """
    distance = (points_a[:, :, None, :].float() - points_b[:, None, :, :].float()).norm(dim=-1)  # (T, S, S')
    pair_valid = valid_a[:, :, None] & valid_b[:, None, :]
    distance = distance.masked_fill(~pair_valid, torch.inf)
    count_a, count_b = valid_a.sum(1), valid_b.sum(1)
    defined = (count_a > 0) & (count_b > 0)
    a_to_b = distance.amin(2).masked_fill(~valid_a, 0.0).nan_to_num(posinf=0.0).sum(1) / count_a.clamp(min=1)
    b_to_a = distance.amin(1).masked_fill(~valid_b, 0.0).nan_to_num(posinf=0.0).sum(1) / count_b.clamp(min=1)
    return (a_to_b + b_to_a) / 2, defined


def multiset_signature(slot_gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """D3 across evaluations: slot_gt (T, S) matched GT ids (-1: none), valid (T, S) -> (T, S) int32.

    Each row is the sorted multiset of the token's matched GT ids, padded with a sentinel larger than
    any id, so two tokens hold the same multiset exactly when their rows are equal. int32 halves
    the memory the diagnostics keep between evaluations (an image has far fewer than 2^31 boxes).
    """
    sentinel = torch.iinfo(torch.int32).max
    ids = torch.where(valid & (slot_gt >= 0), slot_gt.to(torch.int32), sentinel)
    return ids.sort(1).values
