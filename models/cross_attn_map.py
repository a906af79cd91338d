"""The decoder's cross-attention map: which encoder tokens each query attended to, and how much.

A deformable cross-attention sample (query q, head h, level l, point p) at normalised location
s with weight a reads the four pixels around s by bilinear interpolation. Spreading a over
those four pixels, with the operator's own convention (grid_sample, zero padding,
align_corners=False: pixel x = s_x * W_l - 0.5), and flattening all levels gives

    M[b, t, q] = sum_{h, l, p} a(q, h, l, p) * bilinear(s(q, h, l, p), t)        (docs/design.md §5)

Three forms live here:
  * ``attention_footprint``: the sparse form, (token index, weight) for every corner of every
    sample, shape (bs, Q, K) with K = heads * levels * points * 4;
  * ``cross_attention_map``: the dense reference (bs, T, Q) (or per head), for tests and plots;
  * ``CrossAttnMapAccumulator``: combines the sparse maps of several decoder layers
    (``--attn_map_accum none|sum|max``) without ever building a (T, Q) tensor.
"""
from typing import List, Optional, Tuple

import torch

from .level_layout import LevelLayout
from .research_settings import ACCUM_MODES, check_choice
from .sparse_rows import reduce_rows

__all__ = ["attention_footprint", "footprint_to_dense", "cross_attention_map", "reduce_rows",
           "CrossAttnMapAccumulator"]


def _axis_corners(pixel: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinate (...) along one axis of a level of ``size`` pixels -> the two neighbouring
    pixel indices (..., 2) int64, clamped into the level, and their bilinear factors (..., 2).

    The factors are written as grid_sample writes them ((i0 + 1) - x rather than 1 - fraction),
    so the rounding matches the operator's; a neighbour outside the level gets factor 0 (zero
    padding), which the 2-D outer product then carries to every corner that uses it.
    A diverged sample (inf, NaN, +-1e30) is moved to pixel -2, where both neighbours are outside,
    so it contributes nothing (as in the operator) and never overflows the integer conversion.
    """
    size_f = size.to(pixel.dtype)
    # every pixel < -1 or > size has both neighbours outside, so clamping there changes no weight
    pixel = torch.where(pixel.isfinite(), pixel, -2.0)
    pixel = torch.minimum(pixel.clamp(min=-2.0), size_f + 1)
    low = pixel.floor()
    both = torch.stack((low, low + 1), -1)
    factors = torch.stack((low + 1 - pixel, pixel - low), -1)
    factors = factors.masked_fill((both < 0) | (both >= size_f[..., None]), 0.0)
    index = torch.minimum(both.clamp(min=0).to(torch.int64), size[..., None] - 1)
    return index, factors


def attention_footprint(sampling_locations: torch.Tensor, attention_weights: torch.Tensor, layout: LevelLayout
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every bilinear corner of every sample as (flattened token index, weight).

    Args:
        sampling_locations: (bs, Q, heads, levels, points, 2), normalised (x, y); values outside
            [0, 1] are allowed (their outside corners get weight 0).
        attention_weights: (bs, Q, heads, levels, points).
        layout: the token axis. The level sizes are broadcast from ``layout.spatial_shapes`` on
            its own device, so nothing is read on the host and the call never synchronises;
            padded tokens (``layout.padding_mask`` True) get weight 0.

    Returns:
        token_index (bs, Q, K) int64 and weight (bs, Q, K) float (at least float32), with
        K = heads * levels * points * 4 ordered (head, level, point, corner), corner = 2 * dy + dx
        (so head = k // (levels * points * 4)). Corners outside their level and padded tokens
        carry weight 0 and a clamped, valid index.
    """
    bs, num_q, _, levels, _, _ = sampling_locations.shape
    spatial_shapes, level_start_index, padding_mask = layout.spatial_shapes, layout.level_start_index, \
        layout.padding_mask
    dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    # level sizes broadcast over (bs, Q, heads, levels, points): one pass covers all levels
    height = spatial_shapes[:, 0].view(1, 1, 1, levels, 1)
    width = spatial_shapes[:, 1].view(1, 1, 1, levels, 1)
    # the operator feeds grid_sample g = 2 * loc - 1, which maps it back to pixels as ((g + 1) * W - 1) / 2
    grid = sampling_locations.to(dtype) * 2 - 1
    x_index, x_factor = _axis_corners(((grid[..., 0] + 1) * width.to(dtype) - 1) / 2, width)
    y_index, y_factor = _axis_corners(((grid[..., 1] + 1) * height.to(dtype) - 1) / 2, height)
    # corners as outer products (dy, dx) -> (..., 2, 2), flattened to corner = 2 * dy + dx
    row_start = level_start_index.view(1, 1, 1, levels, 1, 1) + y_index * width[..., None]
    token_index = (row_start[..., :, None] + x_index[..., None, :]).reshape(bs, num_q, -1)
    weight = attention_weights.to(dtype)[..., None, None] * y_factor[..., :, None] * x_factor[..., None, :]
    weight = weight.reshape(bs, num_q, -1)
    if padding_mask is not None:
        padded = padding_mask.gather(1, token_index.view(bs, -1)).view(bs, num_q, -1)
        weight = weight.masked_fill(padded, 0.0)
    return token_index, weight


def footprint_to_dense(token_index: torch.Tensor, weight: torch.Tensor, num_tokens: int,
                       heads: Optional[int] = None) -> torch.Tensor:
    """Scatter-add a footprint into the dense map.

    token_index, weight: (bs, Q, K) (any K; with ``heads`` K must be heads * k_per_head with the
    head outermost, as ``attention_footprint`` orders it).
    Returns (bs, T, Q) with T = num_tokens, or (bs, heads, T, Q) when ``heads`` is given.
    """
    bs, num_q, k = token_index.shape
    device = token_index.device
    groups = 1 if heads is None else heads
    # flat position ((b * groups + g) * T + t) * Q + q, g = head of entry k (or 0)
    batch = torch.arange(bs, device=device).view(bs, 1, 1)
    group = (torch.arange(k, device=device) // (k // groups)).view(1, 1, k)
    query = torch.arange(num_q, device=device).view(1, num_q, 1)
    flat = ((batch * groups + group) * num_tokens + token_index) * num_q + query
    dense = weight.new_zeros(bs * groups * num_tokens * num_q)
    dense.index_add_(0, flat.reshape(-1), weight.reshape(-1))
    if heads is None:
        return dense.view(bs, num_tokens, num_q)
    return dense.view(bs, heads, num_tokens, num_q)


def cross_attention_map(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                        spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                        padding_mask: Optional[torch.Tensor] = None, per_head: bool = False) -> torch.Tensor:
    """Dense cross-attention map (the reference form; the model uses the sparse footprint).

    Args:
        sampling_locations: (bs, Q, heads, levels, points, 2) normalised (x, y).
        attention_weights: (bs, Q, heads, levels, points).
        spatial_shapes: (levels, 2) int64 (H, W); level_start_index: (levels,).
        padding_mask: optional (bs, T) True on padding.
        per_head: keep heads apart.

    Returns:
        (bs, T, Q), or (bs, heads, T, Q) with ``per_head``; M[b, t, q] as in the module doc.
        T is read from ``spatial_shapes`` (a host read: this is the reference, not the model path).
    """
    layout = LevelLayout.from_tensors(spatial_shapes, level_start_index, padding_mask)
    token_index, weight = attention_footprint(sampling_locations, attention_weights, layout)
    heads = sampling_locations.shape[2] if per_head else None
    return footprint_to_dense(token_index, weight, layout.num_tokens, heads)


class CrossAttnMapAccumulator:
    """Combines the sparse maps of successive decoder layers (``--attn_map_accum``).

    ``add(token_index, weight)`` once per decoder layer with that layer's footprint (bs, Q, K);
    ``combined()`` returns the map to use now as a row-merged footprint (bs, Q, E):
      none  the latest layer's map;
      sum   sum over the layers added so far (every layer weighs alike);
      max   elementwise max over the layers' maps (each layer's map merged first): a token keeps
            the strongest attention any layer gave it, so a query that one layer fixed on stays.
    Footprints are stored detached; nothing of size T x Q is ever built. Work is deferred to
    ``combined()`` (cached until the next ``add``), so a layer whose map is never used costs
    only its footprint.
    """

    def __init__(self, attn_map_accum: str = "none"):
        check_choice("attn_map_accum", attn_map_accum, ACCUM_MODES)
        self.attn_map_accum = attn_map_accum
        self.num_layers = 0
        self._raw: List[Tuple[torch.Tensor, torch.Tensor]] = []      # footprints not merged yet
        self._merged: List[Tuple[torch.Tensor, torch.Tensor]] = []   # max mode: per-layer merged maps
        self._cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return self.num_layers

    def add(self, token_index: torch.Tensor, weight: torch.Tensor) -> None:
        """Record one decoder layer's footprint: token_index, weight (bs, Q, K)."""
        if self._raw and self._raw[-1][0].shape[:2] != token_index.shape[:2]:
            raise ValueError(f"CrossAttnMapAccumulator: footprint {tuple(token_index.shape)} does not match "
                             f"the earlier layers' {tuple(self._raw[-1][0].shape)} in batch or queries")
        entry = (token_index.detach(), weight.detach())
        if self.attn_map_accum == "none":
            self._raw = [entry]
        else:
            self._raw.append(entry)
        self.num_layers += 1
        self._cache = None

    def combined(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The combined map as (token_index (bs, Q, E), weight (bs, Q, E)), tokens unique per row.

        E is the number of stored footprint entries per query (K for none, up to M * K for
        sum/max after M layers). Raises if no layer was added.
        """
        if self.num_layers == 0:
            raise RuntimeError("CrossAttnMapAccumulator.combined: no decoder layer has been added")
        if self._cache is None:
            self._cache = self._combine()
        return self._cache

    def _combine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Merge the stored footprints as ``attn_map_accum`` says -> (bs, Q, E) pair."""
        if self.attn_map_accum == "max":
            # a layer's map entry is a sum over its own samples, so merge per layer before the max
            self._merged.extend(reduce_rows(t, w, "sum") for t, w in self._raw)
            self._raw = []
            tokens = torch.cat([t for t, _ in self._merged], -1)
            weights = torch.cat([w for _, w in self._merged], -1)
            return reduce_rows(tokens, weights, "max")
        tokens = torch.cat([t for t, _ in self._raw], -1)
        weights = torch.cat([w for _, w in self._raw], -1)
        return reduce_rows(tokens, weights, "sum")

    def dense(self, num_tokens: int) -> torch.Tensor:
        """The combined map as a dense (bs, T, Q) tensor (tests and visualisation only)."""
        tokens, weights = self.combined()
        return footprint_to_dense(tokens, weights, num_tokens)
