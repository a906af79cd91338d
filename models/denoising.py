"""DINO's contrastive denoising (CDN), training only.

Noised copies of the ground truth are fed to the decoder next to the matching queries and
trained to reconstruct it, with the assignment known (no matching):

- ``num_groups = max(dn_number // max_boxes, 1)`` groups, ``max_boxes`` the largest number of
  ground-truth boxes of an image in the batch. A group holds a positive half and a negative
  half of ``max_boxes`` slots each; slot j of a half carries box j of its image (slots past
  an image's box count are padding: zero content, box (0.5, 0.5, 0.5, 0.5), no box loss).
- Box noise: each corner of a box moves by (w/2, h/2) x noise x ``box_noise_scale`` (lambda),
  in a random direction per coordinate; positives draw noise in [0, 1) (< lambda in half-sizes),
  negatives in [1, 2) (lambda <= noise < 2 lambda). Negatives are trained as "no object".
- Label noise: as DINO, each input label is replaced, with probability ``label_noise_ratio / 2``,
  by a class drawn uniformly from all classes (which may be the same class).
- Queries: content = the label embedding of the (noised) label; position = the noised box, embedded
  like the matching queries' proposals (two-stage) or by a parameter-free sine embedding.

Query axis during training: [matching queries (one-to-one, then hybrid one-to-many) | denoising
block of ``num_groups * group_size`` queries]. ``attn_mask`` keeps matching queries from seeing
the block and the groups from seeing each other. In the decoder, ``DenoisingPredictions.split_off``
is the one place the block leaves the query axis: the matching outputs and the encoder
reference generator never see denoising queries (they carry ground truth).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from util.box_ops import box_dtype, inverse_sigmoid

from .position_encoding import box_sine_embedding

__all__ = ["DenoisingConfig", "DenoisingGroups", "DenoisingQueries", "DenoisingPredictions",
           "num_denoising_groups", "make_denoising_groups", "denoising_attn_mask", "make_denoising_queries",
           "append_denoising_queries"]


@dataclass(frozen=True)
class DenoisingConfig:
    """DINO's CDN settings (flags --dn_number, --dn_label_noise_ratio, --dn_box_noise_scale)."""
    num_classes: int
    dn_number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 0.4


@dataclass
class DenoisingGroups:
    """The noised ground truth of one batch, laid out slot by slot (D = num_groups * group_size).

    Slot s belongs to group s // group_size; within a group the first half are positives.
    """
    labels: Tensor        # (bs, D) int64 input labels after label noise (0 on padding)
    boxes: Tensor         # (bs, D, 4) input boxes cxcywh in [0, 1] after box noise (0.5 on padding)
    valid: Tensor         # (bs, D) bool, the slot carries a ground-truth box
    positive: Tensor      # (D,) bool, the slot is in a positive half
    gt_index: Tensor      # (bs, D) int64, index of the slot's box in its image's targets, -1 on padding
    num_groups: int
    group_size: int       # 2 * max_boxes
    counts: List[int]     # ground-truth boxes per image

    @property
    def size(self) -> int:
        return self.num_groups * self.group_size

    def assignment(self) -> List[Tuple[Tensor, Tensor]]:
        """The known assignment: per image (slot indices, target indices) of its positive slots,
        group by group; built from the layout, so no device synchronisation."""
        device = self.labels.device
        starts = torch.arange(self.num_groups, device=device)[:, None] * self.group_size
        pairs = []
        for n in self.counts:
            boxes = torch.arange(n, device=device)
            pairs.append(((starts + boxes[None]).flatten(), boxes.repeat(self.num_groups)))
        return pairs


def num_denoising_groups(dn_number: int, max_boxes: int) -> int:
    """DINO's group count: dn_number // max_boxes, at least 1 (also for a batch without boxes)."""
    return max(dn_number // max_boxes, 1) if max_boxes > 0 else 1


def _padded_targets(targets: List[Dict[str, Tensor]], max_boxes: int, device) -> Tuple[Tensor, Tensor]:
    """Targets -> labels (bs, max_boxes) int64 (0 on padding), boxes (bs, max_boxes, 4) (0.5 on padding)
    in the targets' box dtype, at least float32."""
    labels = torch.zeros(len(targets), max_boxes, dtype=torch.long, device=device)
    dtype = box_dtype(targets[0]["boxes"].dtype)
    boxes = torch.full((len(targets), max_boxes, 4), 0.5, dtype=dtype, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        labels[b, :n] = t["labels"]
        boxes[b, :n] = t["boxes"].to(boxes.dtype)
    return labels, boxes


def _noised_boxes(boxes: Tensor, negative: Tensor, scale: float, generator: Optional[torch.Generator]) -> Tensor:
    """boxes (bs, D, 4) cxcywh, negative (D,) bool -> noised boxes (bs, D, 4) cxcywh in [0, 1].

    Corners (x0, y0, x1, y1) move by sign * u * (w/2, h/2, w/2, h/2) * scale, u ~ U[0, 1) for
    positives and U[1, 2) for negatives; clamped to the image, widths and heights kept >= 0.
    """
    half = boxes[..., 2:] / 2
    corners = torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], -1)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    magnitude = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    magnitude = magnitude + negative.to(boxes.dtype)[None, :, None]
    corners = (corners + sign * magnitude * torch.cat([half, half], -1) * scale).clamp(0.0, 1.0)
    # opposite corners may cross for large noise: the box then has zero size, not a negative one
    size = (corners[..., 2:] - corners[..., :2]).clamp(min=0.0)
    return torch.cat([(corners[..., :2] + corners[..., 2:]) / 2, size], -1)


def make_denoising_groups(targets: List[Dict[str, Tensor]], config: DenoisingConfig,
                          generator: Optional[torch.Generator] = None) -> DenoisingGroups:
    """Repeat the ground truth into positive/negative groups and noise it (see module docstring).

    targets: bs dicts with 'labels' (N_b,) int64 and 'boxes' (N_b, 4) cxcywh in [0, 1].
    generator: random source (on the targets' device); None uses torch's global one.
    """
    device = targets[0]["boxes"].device
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts)
    num_groups = num_denoising_groups(config.dn_number, max_boxes)
    group_size = 2 * max_boxes
    slot = torch.arange(num_groups * group_size, device=device)
    box_slot = slot % max(max_boxes, 1)            # which ground-truth box a slot carries
    positive = (slot % max(group_size, 1)) < max_boxes
    valid = box_slot[None] < torch.tensor(counts, device=device)[:, None]
    gt_labels, gt_boxes = _padded_targets(targets, max_boxes, device)
    labels, boxes = gt_labels[:, box_slot], gt_boxes[:, box_slot]

    if config.label_noise_ratio > 0:
        flip = torch.rand(labels.shape, generator=generator, device=device) < config.label_noise_ratio * 0.5
        random_labels = torch.randint(0, config.num_classes, labels.shape, generator=generator, device=device)
        labels = torch.where(flip, random_labels, labels)
    if config.box_noise_scale > 0:
        boxes = _noised_boxes(boxes, ~positive, config.box_noise_scale, generator)
    labels = labels.masked_fill(~valid, 0)
    boxes = torch.where(valid[..., None], boxes, torch.full_like(boxes, 0.5))
    gt_index = torch.where(valid, box_slot[None].expand_as(valid), torch.full_like(valid, -1, dtype=torch.long))
    return DenoisingGroups(labels, boxes, valid, positive, gt_index, num_groups, group_size, counts)


def denoising_attn_mask(matching_mask: Optional[Tensor], num_queries: int, num_queries_one2one: int,
                        num_groups: int, group_size: int, device=None) -> Tensor:
    """Self-attention mask over [matching queries | denoising block]: (Q + D, Q + D) bool, True = may not attend.

    matching_mask: (Q, Q) mask among the matching queries (the hybrid group mask) or None.
    - matching queries (one-to-one and one-to-many) never see denoising queries;
    - a denoising query sees its own group and the one-to-one queries, not the hybrid
      one-to-many group (denoising rehearses the one-to-one task, as in DINO);
    - denoising groups never see each other.
    """
    size = num_groups * group_size
    mask = torch.zeros(num_queries + size, num_queries + size, dtype=torch.bool, device=device)
    if matching_mask is not None:
        mask[:num_queries, :num_queries] = matching_mask
    mask[:num_queries, num_queries:] = True
    mask[num_queries:, num_queries_one2one:num_queries] = True
    group = torch.arange(size, device=device) // max(group_size, 1)
    mask[num_queries:, num_queries:] = group[:, None] != group[None, :]
    return mask


@dataclass
class DenoisingQueries:
    """Decoder inputs of the denoising block for one batch, plus its layout for the loss."""
    groups: DenoisingGroups
    content: Tensor       # (bs, D, C) label embeddings (zero on padding)

    def attn_mask(self, matching_mask: Optional[Tensor], num_queries: int, num_queries_one2one: int) -> Tensor:
        """The full self-attention mask (see ``denoising_attn_mask``)."""
        return denoising_attn_mask(matching_mask, num_queries, num_queries_one2one, self.groups.num_groups,
                                   self.groups.group_size, self.content.device)


def make_denoising_queries(targets: List[Dict[str, Tensor]], config: DenoisingConfig, label_enc: nn.Embedding,
                           generator: Optional[torch.Generator] = None) -> DenoisingQueries:
    """Noised groups and their content queries: label_enc(labels) (bs, D, C), zero on padding slots."""
    groups = make_denoising_groups(targets, config, generator)
    # always through label_enc, even for an empty block, so DDP sees the embedding used every step
    content = label_enc(groups.labels) * groups.valid[..., None].to(label_enc.weight.dtype)
    return DenoisingQueries(groups, content)


@dataclass
class DenoisingPredictions:
    """Per-decoder-layer predictions of the denoising block, collected while the decoder runs."""
    num: int                                              # D, the block at the end of the query axis
    logits: List[Tensor] = field(default_factory=list)   # per layer (bs, D, K)
    boxes: List[Tensor] = field(default_factory=list)    # per layer (bs, D, 4)

    def split_off(self, layer_output, logits: Tensor, boxes: Tensor):
        """Keep the block's predictions; return what the rest of the model may see without it.

        layer_output: the decoder layer's ``DecoderLayerOutput`` over all Q + D queries.
        logits (bs, Q + D, K), boxes (bs, Q + D, 4) -> (output, logits (bs, Q, K), boxes (bs, Q, 4)).
        The returned output keeps ``hidden`` whole (the next layer needs every query) and drops the
        block from the one-to-many stream and from the cross-attention sampling, so neither the
        MS-DETR one-to-many branch nor the encoder guidance ever sees a denoising query.
        """
        keep = logits.shape[1] - self.num
        self.logits.append(logits[:, keep:])
        self.boxes.append(boxes[:, keep:])

        def head(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[:, :keep]

        layer_output = layer_output._replace(hidden_one2many=head(layer_output.hidden_one2many),
                                             sampling_locations=head(layer_output.sampling_locations),
                                             attention_weights=head(layer_output.attention_weights))
        return layer_output, logits[:, :keep], boxes[:, :keep]


def append_denoising_queries(transformer, state, queries: DenoisingQueries):
    """Add the denoising block after the matching queries of a fresh ``DecoderState`` (in place).

    Content: the label embeddings. Position: the noised boxes through the transformer's proposal
    embedding (two-stage; as the matching queries' positions) or ``box_sine_embedding``. Reference:
    the noised box, or its centre when the matching queries start from points (not two-stage).
    The block's boxes join the matching queries' box path in its dtype (float32, or float64 for a
    float64 model).
    """
    boxes = queries.groups.boxes.to(state.reference.dtype)
    channels = state.tgt.shape[-1]
    if transformer.two_stage:
        embedded = transformer.proposal_pos_embed(inverse_sigmoid(boxes))
        query_pos = transformer.pos_trans_norm(transformer.pos_trans(embedded))[..., :channels]
    else:
        query_pos = box_sine_embedding(boxes, channels)
    reference = boxes if state.reference.shape[-1] == 4 else boxes[..., :2]
    state.tgt = torch.cat([state.tgt, queries.content.to(state.tgt.dtype)], 1)
    state.query_pos = torch.cat([state.query_pos, query_pos.to(state.query_pos.dtype)], 1)
    state.box_reference = torch.cat([state.box_reference, reference.to(state.box_reference.dtype)], 1)
    state.reference = torch.cat([state.reference, reference.to(state.reference.dtype)], 1)
    state.denoising = DenoisingPredictions(queries.groups.size)
    return state
