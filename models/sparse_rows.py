"""Merging repeated tokens within the rows of a sparse map (one row per query or per candidate).

Kept apart from ``cross_attn_map`` so that the guidance's ranking rules (``models/guidance``) can
regroup a map by candidate without importing the map's construction.
"""
from typing import Tuple

import torch


def reduce_rows(token_index: torch.Tensor, weight: torch.Tensor, reduce: str = "sum"
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge repeated tokens within each row of a footprint.

    A query reaches the same token through several heads, points and corners; the map entry
    M[t, q] is their sum (or, for combining layers, their max). Rows are independent, so a
    batched sort along the last axis groups equal tokens without any global sort or host sync.

    Args:
        token_index: (..., E) int64; weight: (..., E) non-negative.
        reduce: "sum" or "max" over entries of a row that share a token.

    Returns:
        token_index (..., E) and weight (..., E): each row's distinct tokens in increasing order
        with their totals, packed at the front of the row; the rest of the row is padding with
        weight 0 (and token 0), so every (row, token) appears at most once with non-zero weight.
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce_rows: reduce must be 'sum' or 'max', got {reduce!r}")
    lead, width = token_index.shape[:-1], token_index.shape[-1]
    tokens = token_index.reshape(-1, width)
    rows = tokens.shape[0]
    sorted_tokens, order = tokens.sort(dim=-1, stable=True)
    sorted_weight = weight.reshape(-1, width).gather(-1, order)
    first = torch.ones_like(sorted_tokens, dtype=torch.bool)
    first[:, 1:] = sorted_tokens[:, 1:] != sorted_tokens[:, :-1]
    # run r of a row goes to slot r of that row: a running count of run starts (int32 where it
    # fits, which halves the memory of the index and is faster than a cumulative max)
    index_dtype = torch.int32 if rows * width < 2 ** 31 else torch.int64
    slot = first.cumsum(-1, dtype=index_dtype) - 1
    slot += torch.arange(rows, device=tokens.device, dtype=index_dtype)[:, None] * width
    slot = slot.view(-1)
    totals = sorted_weight.new_zeros(rows * width)
    if reduce == "sum":
        totals.index_add_(0, slot, sorted_weight.view(-1))
    else:  # weights are >= 0, so the zero start is neutral for the max
        totals.scatter_reduce_(0, slot.long(), sorted_weight.view(-1), "amax")
    # only a run's first entry contributes its token, so the add is an exact copy (and, unlike
    # index_copy_, index_add_ takes the int32 slots)
    packed_tokens = torch.zeros_like(sorted_tokens).view(-1)
    packed_tokens.index_add_(0, slot, torch.where(first, sorted_tokens, 0).view(-1))
    return packed_tokens.view(*lead, width), totals.view(*lead, width)
