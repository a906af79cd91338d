"""What the pictures show of a recorded forward pass (``models.recording.ForwardRecord``).

The validation pictures of training and scripts/visualize_refs.py read a record through these:
the feature levels, a decoder layer's cross-attention map over the tokens, the tokens worth
drawing and the references one token received.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch

from .cross_attn_map import cross_attention_map
from .recording import ForwardRecord


def level_shapes(record: ForwardRecord) -> List[Tuple[int, int]]:
    """[(H_l, W_l)] of the feature levels the pass ran on."""
    return [(int(h), int(w)) for h, w in record.layout.shapes]


def token_map(record: ForwardRecord, layer: int = -1, queries: Optional[torch.Tensor] = None,
              image: int = 0) -> torch.Tensor:
    """Cross-attention map of decoder ``layer`` for batch item ``image``, summed over (the given)
    queries: (T,) on the CPU."""
    decoder = record.decoder[layer]
    layout = decoder.layout
    dense = cross_attention_map(decoder.sampling_locations.float(), decoder.attention_weights.float(),
                                layout.spatial_shapes, layout.level_start_index, layout.padding_mask)  # (bs, T, Q)
    dense = dense[image]
    if queries is not None:
        dense = dense[:, queries]
    return dense.sum(-1).cpu()


def top_queries(outputs: Dict, count: int, image: int = 0) -> torch.Tensor:
    """Indices of the ``count`` one-to-one queries with the highest class score (batch item ``image``)."""
    scores = outputs["pred_logits"][image].sigmoid().max(-1).values
    return scores.topk(min(count, scores.numel())).indices.cpu()


def token_position(token: int, shapes: List[Tuple[int, int]]) -> Tuple[int, float, float]:
    """Flattened token index -> (level, x, y) of its centre, normalised to the padded input."""
    start = 0
    for level, (h, w) in enumerate(shapes):
        if token < start + h * w:
            row, col = divmod(token - start, w)
            return level, (col + 0.5) / w, (row + 0.5) / h
        start += h * w
    raise IndexError(f"token {token} is outside the {start} tokens of the feature levels")


def choose_tokens(weights: torch.Tensor, shapes: List[Tuple[int, int]], count: int,
                  min_separation: float = 0.08) -> List[int]:
    """High-map-weight tokens of a (T,) map, taken from the levels in turn (finest first).

    Coarse tokens cover more image and so collect more weight; ranking all levels together would
    pick only them. A token closer than ``min_separation`` (normalised) to one already chosen is
    skipped: neighbouring tokens of one object would show the same picture.
    """
    ranked, start = [], 0
    for h, w in shapes:
        order = torch.argsort(weights[start:start + h * w], descending=True) + start
        ranked.append(order.tolist())
        start += h * w
    chosen: List[int] = []
    places: List[Tuple[float, float]] = []
    cursors = [0] * len(shapes)
    while len(chosen) < count and any(c < len(r) for c, r in zip(cursors, ranked)):
        for level, order in enumerate(ranked):
            while cursors[level] < len(order) and len(chosen) < count:
                token = order[cursors[level]]
                cursors[level] += 1
                _, x, y = token_position(token, shapes)
                if all(math.hypot(x - px, y - py) >= min_separation for px, py in places):
                    chosen.append(token)
                    places.append((x, y))
                    break
    return chosen


def reference_entries(refs: torch.Tensor, token: int, image: int = 0) -> List[Tuple[float, float, int, str]]:
    """References one token received -> [(x, y, colour index, label)], normalised, duplicates dropped.

    Accepted shapes (batch first): (bs, T, L, 2) and (bs, T, L, 4) colour by level, as every level
    has its own reference there; (bs, T, L, P, 2) and (bs, T, H, L, P, 2) colour by sampling point.
    """
    per_token = refs[image, token].float().cpu()
    if per_token.dim() == 2:                        # (L, 2|4): one reference (box centre) per level
        items = [(per_token[l, 0], per_token[l, 1], l, f"level {l}") for l in range(per_token.shape[0])]
    elif per_token.dim() in (3, 4) and per_token.shape[-1] == 2:   # (L, P, 2) or (H, L, P, 2)
        points = per_token.reshape(-1, per_token.shape[-2], 2)    # (L or H*L, P, 2)
        items = [(points[i, p, 0], points[i, p, 1], p, f"point {p}")
                 for i in range(points.shape[0]) for p in range(points.shape[1])]
    else:
        raise ValueError(f"unsupported encoder reference shape {tuple(refs.shape)}")
    seen, entries = set(), []
    for x, y, colour, label in items:
        key = (round(float(x), 4), round(float(y), 4), colour)
        if key not in seen:
            seen.add(key)
            entries.append((float(x), float(y), colour, label))
    return entries
