"""Sine positional encoding of feature maps (Deformable DETR's normalised variant)."""
import math

import torch
from torch import nn

from util.box_ops import box_dtype
from util.nested_tensor import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine encoding of each pixel's position inside the valid (unpadded) image.

    Coordinates are normalised by the valid height/width, so the encoding describes where a
    pixel is in the image rather than in the padded batch.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        """mask (B, H, W) True on padding -> pos (B, 2 * num_pos_feats, H, W), y features first."""
        not_mask = ~tensor_list.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        # -0.5 puts a pixel's coordinate at its centre, as Deformable DETR does
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[:, :, :, None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[:, :, :, None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., F) angles -> (..., F) with sin of even and cos of odd entries, interleaved pairwise."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def build_position_encoding(args) -> PositionEmbeddingSine:
    return PositionEmbeddingSine(args.hidden_dim // 2, scale=args.position_embedding_scale)


def box_sine_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """boxes (..., Q, 4) in [0, 1] -> (..., Q, dim): sine/cosine of each coordinate, dim // 4 features each.

    The positional embedding of box-shaped queries: two-stage proposals (dim = 2 * d_model, through
    ``DeformableTransformer.proposal_pos_embed``) and denoising queries with learned matching
    positions (dim = d_model). Parameter-free. Computed in ``box_dtype(boxes.dtype)``: float32 for
    half boxes, float64 for float64 ones.
    """
    if dim % 8 != 0:
        raise ValueError(f"box_sine_embedding: dim {dim} must be a multiple of 8")
    feats = dim // 4
    dtype = box_dtype(boxes.dtype)
    freq = torch.arange(feats, dtype=dtype, device=boxes.device)
    freq = temperature ** (2 * torch.div(freq, 2, rounding_mode="floor") / feats)
    angles = boxes.to(dtype)[..., None] * (2 * math.pi) / freq          # (..., Q, 4, feats)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-3)
