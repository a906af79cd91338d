"""Multi-scale deformable attention module (parameters and sampling-location arithmetic).

The sampling itself is `ops.ms_deform_attn` (on GPUs the compiled CUDA op, else the Triton op;
PyTorch elsewhere).
"""
import math
from typing import NamedTuple

import torch
from torch import nn

from ops import ms_deform_attn

from .level_layout import LevelLayout


class MSDeformAttnOutput(NamedTuple):
    """What one attention call produced; the sampling feeds the encoder guidance and the map."""
    output: torch.Tensor              # (bs, Lq, C)
    sampling_locations: torch.Tensor  # (bs, Lq, H, L, P, 2) normalised (x, y), as sampled
    attention_weights: torch.Tensor   # (bs, Lq, H, L, P), softmax over each head's L * P samples


class MSDeformAttn(nn.Module):
    """Each query samples ``n_points`` locations per head and level around its reference point.

    Reference points may be
      (bs, Lq, L, 2)        one point per level (stock encoder / decoder, v3.0.1),
      (bs, Lq, L, 4)        a box per level: offsets scale with the box (two-stage / box refine),
      (bs, Lq, L, P, 2)     one point per level and sampling point (guided encoder, v3.0.2-4),
      (bs, Lq, H, L, P, 2)  one per head, level and point (progressive encoder references).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # initial offsets: head h looks along direction 2*pi*h/H, point p at distance p+1
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling_locations(self, query: torch.Tensor, reference_points: torch.Tensor,
                           spatial_shapes: torch.Tensor) -> torch.Tensor:
        """query (bs, Lq, C), references (see class doc) -> locations (bs, Lq, H, L, P, 2), normalised (x, y)."""
        bs, len_q, _ = query.shape
        offsets = self.sampling_offsets(query).view(bs, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        last, dim = reference_points.shape[-1], reference_points.dim()
        if last == 4 and dim == 4:
            # box references: offsets are fractions of the half box size, spread over the points
            centre = reference_points[:, :, None, :, None, :2]
            half_size = reference_points[:, :, None, :, None, 2:] * 0.5
            return centre + offsets / self.n_points * half_size
        if last != 2 or dim not in (4, 5, 6):
            raise ValueError(f"MSDeformAttn: unsupported reference shape {tuple(reference_points.shape)}")
        # (W, H) per level turns pixel offsets into normalised ones
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
        offsets = offsets / normalizer[None, None, None, :, None, :]
        if dim == 4:
            reference_points = reference_points[:, :, None, :, None, :]
        elif dim == 5:
            reference_points = reference_points[:, :, None]
        return reference_points + offsets

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                layout: LevelLayout) -> MSDeformAttnOutput:
        """query (bs, Lq, C); input_flatten (bs, T, C) laid out as ``layout`` (padding True -> value 0).

        Returns the output (bs, Lq, C) with the sampling locations and attention weights it used.
        """
        bs, len_q, _ = query.shape
        len_in = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if layout.padding_mask is not None:
            value = value.masked_fill(layout.padding_mask[..., None], 0.0)
        value = value.view(bs, len_in, self.n_heads, self.d_model // self.n_heads)
        weights = self.attention_weights(query).view(bs, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(bs, len_q, self.n_heads, self.n_levels, self.n_points)
        locations = self.sampling_locations(query, reference_points, layout.spatial_shapes)
        output = ms_deform_attn(value, layout.spatial_shapes, layout.level_start_index, locations, weights,
                                spatial_shapes_list=layout.shapes)
        return MSDeformAttnOutput(self.output_proj(output), locations, weights)
