"""Ranking rules (``--ref_rank``): per token, which candidates fill its reference slots, best first.

A rule is called as ``rule(state, slots)`` with the forward's ``GuidanceState`` (``enc_reference``)
and the number of slots S to fill; it reads what it needs from the state:

    state.candidates            the CandidateSet of the latest decoder layer (boxes, scores, valid, columns)
    state.num_tokens            T
    state.combined_map()        the (combined) cross-attention map, row-merged: tokens, weights (bs, Q, E)
    state.token_positions()     each token's own location (bs, T, 2), valid-region coordinates
    state.padding_mask          (bs, T) bool or None
    state.random_generator()    this step's torch.Generator (rules registered with reads_seed)

and returns (chosen (bs, T, S) int64 candidate index, valid (bs, T, S) bool); an invalid slot falls
back to the token's own location. A rule never puts one candidate in two slots of a token.
"""
from typing import Tuple

import torch

from util.box_ops import box_cxcywh_to_xyxy

from .candidates import ColumnMap
from .top_per_token import descending_order, entry_keys, keys_to_candidates, top_per_token

Picks = Tuple[torch.Tensor, torch.Tensor]
# (token, candidate) pairs handled at once by the rules that score every pair (random, distance)
_BLOCK_ELEMENTS = 1 << 22


def by_class_score(state, slots: int) -> Picks:
    """v3.0.1: the S candidates of highest class score (ties: lower index), the same for every token."""
    cands = state.candidates
    if cands.count < slots:
        raise ValueError(f"per_level guidance picks {slots} candidates but only {cands.count} exist")
    order, _ = descending_order(cands.scores)
    chosen = order[:, None, :slots].expand(-1, state.num_tokens, -1)
    valid = torch.ones((), dtype=torch.bool, device=chosen.device).expand(chosen.shape)
    return chosen, valid


def by_map_weight(state, slots: int) -> Picks:
    """v3.0.2-4: the S candidates of largest map weight M[t, c] (ties: class score, then lower index)."""
    return _by_map(state, slots, by_score=False)


def by_map_weight_and_score(state, slots: int) -> Picks:
    """The S candidates of largest map weight x class score (ties as ``by_map_weight``)."""
    return _by_map(state, slots, by_score=True)


def _by_map(state, slots: int, by_score: bool) -> Picks:
    """Sparse per-token top-S over the map regrouped by candidate (``ColumnMap.candidate_rows``)."""
    cands = state.candidates
    if cands.columns is None:
        raise ValueError("ranking by map weight needs candidates that stand for map columns (per query)")
    tokens, weights, owner = cands.columns.candidate_rows(*state.combined_map(), state.num_tokens)
    order, score_rank = descending_order(cands.scores)
    tie = ColumnMap.per_entry(cands.count - 1 - score_rank, owner)
    scale = ColumnMap.per_entry(cands.scores, owner) if by_score else None
    keys = entry_keys(weights, tie, cands.count, scale)
    if cands.valid is not None:
        keys.masked_fill_(~ColumnMap.per_entry(cands.valid, owner), -1)
    return keys_to_candidates(top_per_token(keys, tokens, state.num_tokens, slots), order)


def at_random(state, slots: int) -> Picks:
    """A control: per token, S distinct valid candidates drawn uniformly without the map (the S
    smallest of uniform keys, a uniformly drawn S-subset) from the step's own generator, so the
    global random state is untouched."""
    cands = state.candidates
    valid_candidates = cands.valid_mask()
    generator = state.random_generator()

    def block(first: int, size: int) -> torch.Tensor:
        keys = torch.rand(cands.scores.shape[0], size, cands.count, generator=generator,
                          device=cands.scores.device)
        return keys.masked_fill_(~valid_candidates[:, None], 2.0)

    return _smallest_per_token(state, slots, block, invalid=2.0)


def by_distance(state, slots: int) -> Picks:
    """Without the map: the token's own (smallest containing, ties lower index) box first, then the
    other candidates by the distance of their centres from the token (ties: lower index)."""
    cands = state.candidates
    boxes = cands.boxes.detach().float()
    corners = box_cxcywh_to_xyxy(boxes)
    area = ((corners[..., 2] - corners[..., 0]) * (corners[..., 3] - corners[..., 1])).double()
    valid_candidates = cands.valid_mask()
    positions = state.token_positions().float()
    index_bits = max(1, (cands.count - 1).bit_length())
    index = torch.arange(cands.count, device=boxes.device)

    def block(first: int, size: int) -> torch.Tensor:
        point = positions[:, first:first + size, None, :]                       # (bs, t, 1, 2)
        distance = (point - boxes[:, None, :, :2]).square().sum(-1)             # (bs, t, C)
        # non-negative floats order like their bit patterns; the index below breaks ties
        keys = (distance.view(torch.int32).to(torch.int64) << index_bits) | index
        inside = ((point[..., 0] >= corners[:, None, :, 0]) & (point[..., 0] <= corners[:, None, :, 2])
                  & (point[..., 1] >= corners[:, None, :, 1]) & (point[..., 1] <= corners[:, None, :, 3])
                  & valid_candidates[:, None])
        own_area = torch.where(inside, area[:, None], torch.inf)
        own = own_area.argmin(-1, keepdim=True)
        keys.scatter_(-1, own, torch.where(inside.any(-1, keepdim=True), -1, keys.gather(-1, own)))
        return keys.masked_fill_(~valid_candidates[:, None], torch.iinfo(torch.int64).max)

    return _smallest_per_token(state, slots, block, invalid=torch.iinfo(torch.int64).max)


def _smallest_per_token(state, slots: int, block, invalid) -> Picks:
    """Per token the S candidates of smallest key, with keys made ``block(first, size)`` -> (bs, size, C)
    for tokens [first, first + size), a few tokens at a time (bounded memory); a key equal to
    ``invalid`` marks an invalid candidate. Padded tokens get no candidate."""
    cands = state.candidates
    bs, count, num_tokens = cands.scores.shape[0], cands.count, state.num_tokens
    take = min(slots, count)
    step = max(1, _BLOCK_ELEMENTS // max(1, bs * count))
    chosen, valid = [], []
    for first in range(0, num_tokens, step):
        size = min(step, num_tokens - first)
        keys, index = block(first, size).topk(take, dim=-1, largest=False)
        chosen.append(index)
        valid.append(keys != invalid)
    chosen, valid = torch.cat(chosen, 1), torch.cat(valid, 1)
    if take < slots:  # fewer candidates than slots: the rest fall back to the token itself
        chosen = torch.cat([chosen, chosen.new_zeros(bs, num_tokens, slots - take)], -1)
        valid = torch.cat([valid, valid.new_zeros(bs, num_tokens, slots - take)], -1)
    if state.padding_mask is not None:
        valid = valid & ~state.padding_mask[:, :, None]
    return chosen, valid
