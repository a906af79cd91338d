"""Per token, the best few of a sparse set of (candidate, token, value) entries, without host syncs.

Each entry gets one int64 key that orders it by (value, class score): the float32 bit pattern of
the value (for non-negative floats it orders like the value) shifted left, with the inverted
score rank of its candidate below it, so equal values are broken by class score and every
candidate's key is distinct within a token. P rounds of a per-token scatter-max pick the winners;
the low bits say which candidate won. Nothing of size tokens x candidates is built and no Python
loop runs over tokens or candidates.
"""
from typing import Optional, Tuple

import torch


def descending_order(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """scores (bs, C) -> order (bs, C) best first (ties: lower index first) and its inverse rank (bs, C)."""
    order = scores.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return order, rank


def _score_bits(count: int) -> int:
    return max(1, (count - 1).bit_length())


def entry_keys(weights: torch.Tensor, tie: torch.Tensor, count: int, scale: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """One int64 key per entry that orders the entries of a token best first.

    weights (bs, ...) the entries' ranking weight; tie, broadcastable to it, the entry's candidate's
    ``count - 1 - score rank`` (``descending_order``) among the C = ``count`` candidates; scale,
    broadcastable, multiplies the weight (class score: attn_cls). Entries with weight <= 0 get -1
    (never picked; -0.0 too, whose bit pattern would read as negative). Returns int64 like weights.
    """
    value = weights.float()
    if scale is not None:
        value = value * scale
    keys = value.contiguous().view(torch.int32).to(torch.int64)
    keys <<= _score_bits(count)
    keys |= tie
    return keys.masked_fill_(weights <= 0, -1)


def top_per_token(keys: torch.Tensor, tokens: torch.Tensor, num_tokens: int, rounds: int) -> torch.Tensor:
    """P rounds of per-token max over sparse keyed entries.

    keys (bs, ...) int64 (-1 = absent; consumed: overwritten in place), tokens (bs, ...) token index
    in [0, T), same shape. Returns (bs, T, rounds) int64: the keys of each token's best, second
    best, ... entries, -1 where the token has fewer entries. Keys are unique within a token, so the
    winner of a round is exactly the entry equal to the round's max and can be retired without a sort.
    """
    bs = keys.shape[0]
    offset = torch.arange(bs, device=keys.device).view(bs, *([1] * (keys.dim() - 1))) * num_tokens
    flat_tokens = (tokens + offset).reshape(-1)
    keys = keys.reshape(-1)
    picked = []
    for step in range(rounds):
        best = torch.full((bs * num_tokens,), -1, dtype=torch.int64, device=keys.device)
        best.scatter_reduce_(0, flat_tokens, keys, "amax")
        picked.append(best)
        if step + 1 < rounds:
            # retire this round's winners
            keys.masked_fill_(keys == best.gather(0, flat_tokens), -1)
    if not picked:
        return keys.new_full((bs, num_tokens, 0), -1)
    return torch.stack(picked, -1).view(bs, num_tokens, rounds)


def keys_to_candidates(picked: torch.Tensor, order: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """picked (bs, T, P) keys from ``top_per_token``, order (bs, C) -> candidate index (bs, T, P), valid mask."""
    bs, num_tokens, points = picked.shape
    count = order.shape[1]
    valid = picked >= 0
    tie = picked & ((1 << _score_bits(count)) - 1)
    score_rank = (count - 1 - tie).clamp(0, count - 1)
    chosen = order.gather(1, score_rank.view(bs, -1)).view(bs, num_tokens, points)
    return chosen, valid
