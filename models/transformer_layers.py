"""Encoder and decoder layers of the deformable transformer, and the MLP box head."""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .level_layout import LevelLayout
from .ms_deform_attn import MSDeformAttn


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (keys: layers.N.weight/bias)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def with_pos_embed(tensor: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


def _ffn(x: torch.Tensor, linear1: nn.Linear, dropout_mid: nn.Dropout, linear2: nn.Linear, dropout_out: nn.Dropout,
         norm: nn.LayerNorm) -> torch.Tensor:
    """Residual two-layer ReLU FFN followed by LayerNorm: (..., C) -> (..., C)."""
    return norm(x + dropout_out(linear2(dropout_mid(F.relu(linear1(x))))))


class EncoderLayerOutput(NamedTuple):
    memory: torch.Tensor                       # (bs, T, C)
    sampling_locations: torch.Tensor  # (bs, T, H, L, P, 2) of the self-attention


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels' tokens, then an FFN (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                layout: LevelLayout) -> EncoderLayerOutput:
        """src, pos (bs, T, C) laid out as ``layout``; reference_points: any shape MSDeformAttn accepts."""
        attn = self.self_attn(with_pos_embed(src, pos), reference_points, src, layout)
        src = self.norm1(src + self.dropout1(attn.output))
        src = _ffn(src, self.linear1, self.dropout2, self.linear2, self.dropout3, self.norm2)
        return EncoderLayerOutput(src, attn.sampling_locations)


class DecoderLayerOutput(NamedTuple):
    hidden: torch.Tensor                        # (bs, Q, C) one-to-one stream
    hidden_one2many: Optional[torch.Tensor]     # (bs, Q, C) MS-DETR one-to-many stream, training only
    sampling_locations: torch.Tensor            # (bs, Q, H, L, P, 2) of the cross-attention
    attention_weights: torch.Tensor             # (bs, Q, H, L, P)


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the memory, FFN (post-norm).

    Stock order is self-attn -> cross-attn -> FFN. With ``use_ms_detr`` (MS-DETR) the order is
    cross-attn -> [aux FFN, the one-to-many output] -> self-attn -> FFN (the one-to-one output).
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, use_ms_detr: bool = False, use_aux_ffn: bool = True):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.use_ms_detr = use_ms_detr
        self.use_aux_ffn = use_ms_detr and use_aux_ffn
        if self.use_aux_ffn:
            self.linear3 = nn.Linear(d_model, d_ffn)
            self.dropout5 = nn.Dropout(dropout)
            self.linear4 = nn.Linear(d_ffn, d_model)
            self.dropout6 = nn.Dropout(dropout)
            self.norm4 = nn.LayerNorm(d_model)

    def _self_attention(self, tgt, query_pos, self_attn_mask):
        q = k = with_pos_embed(tgt, query_pos)
        out = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        return self.norm2(tgt + self.dropout2(out))

    def _cross_attention(self, tgt, query_pos, reference_points, src, layout):
        attn = self.cross_attn(with_pos_embed(tgt, query_pos), reference_points, src, layout)
        return self.norm1(tgt + self.dropout1(attn.output)), attn

    def forward(self, tgt, query_pos, reference_points, src, layout: LevelLayout, self_attn_mask=None,
                with_one2many: bool = False) -> DecoderLayerOutput:
        """tgt, query_pos (bs, Q, C); reference_points (bs, Q, L, 2|4); src (bs, T, C) laid out as
        ``layout``; self_attn_mask (Q, Q) bool, True = may not attend. ``with_one2many`` asks
        MS-DETR's one-to-many stream (training only)."""
        hidden_one2many = None
        if self.use_ms_detr:
            tgt, attn = self._cross_attention(tgt, query_pos, reference_points, src, layout)
            if with_one2many:
                hidden_one2many = (_ffn(tgt, self.linear3, self.dropout5, self.linear4, self.dropout6, self.norm4)
                                   if self.use_aux_ffn else tgt)
            tgt = self._self_attention(tgt, query_pos, self_attn_mask)
        else:
            tgt = self._self_attention(tgt, query_pos, self_attn_mask)
            tgt, attn = self._cross_attention(tgt, query_pos, reference_points, src, layout)
        tgt = _ffn(tgt, self.linear1, self.dropout3, self.linear2, self.dropout4, self.norm3)
        return DecoderLayerOutput(tgt, hidden_one2many, attn.sampling_locations, attn.attention_weights)
