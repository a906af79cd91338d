"""Multi-scale deformable attention sampling in plain PyTorch (the reference and CPU path).

Sampling convention, shared with the CUDA operator and with the cross-attention map:
bilinear interpolation, zero padding, ``align_corners=False``. A normalised location
(x, y) on a level of size (H, W) lands on pixel coordinates (x * W - 0.5, y * H - 0.5);
each of the four neighbouring pixels that lies outside the map contributes zero.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_pytorch", "shapes_as_list", "check_shapes"]


def shapes_as_list(spatial_shapes: torch.Tensor,
                   spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None) -> List[Tuple[int, int]]:
    """Level sizes as python ints [(H, W), ...].

    ``spatial_shapes_list`` is preferred when given, because reading ``spatial_shapes``
    (levels, 2) from a GPU tensor forces a device-to-host synchronisation.
    """
    if spatial_shapes_list is not None:
        return [(int(h), int(w)) for h, w in spatial_shapes_list]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def check_shapes(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Metadata-only consistency checks (no device sync); raises ValueError naming the problem.

    value (bs, Lin, heads, C); spatial_shapes (levels, 2); level_start_index (levels,);
    sampling_locations (bs, Lq, heads, levels, points, 2); attention_weights (bs, Lq, heads, levels, points).
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (bs, Lin, heads, C), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (bs, Lq, heads, levels, points, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    bs, _, heads, _ = value.shape
    lbs, len_q, lheads, levels, points, _ = sampling_locations.shape
    if (lbs, lheads) != (bs, heads):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
                         f"{tuple(value.shape)} in batch size or heads")
    if tuple(attention_weights.shape) != (bs, len_q, heads, levels, points):
        raise ValueError(f"attention_weights must be {(bs, len_q, heads, levels, points)}, "
                         f"got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (levels, 2):
        raise ValueError(f"spatial_shapes must be ({levels}, 2), got {tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"level_start_index must be ({levels},), got {tuple(level_start_index.shape)}")


def ms_deform_attn_pytorch(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                           sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                           spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Deformable attention over several feature levels, built on ``F.grid_sample``.

    Args:
        value: (bs, Lin, heads, C), the levels flattened row-major and stored back to back.
        spatial_shapes: (levels, 2) int64, (H, W) of each level.
        level_start_index: (levels,) offset of each level in ``Lin``. This path assumes the
            levels are contiguous and in order (start = exclusive cumsum of H*W), which is how
            the model lays them out; it uses ``spatial_shapes_list`` instead of reading it.
        sampling_locations: (bs, Lq, heads, levels, points, 2), normalised (x, y); values
            outside [0, 1] are allowed and sample zeros beyond the border.
        attention_weights: (bs, Lq, heads, levels, points).
        spatial_shapes_list: optional [(H, W), ...] python ints, avoids a device sync.

    Returns:
        (bs, Lq, heads * C) in ``value``'s dtype. The arithmetic runs in the promoted dtype
        of the three inputs, so bf16 values with fp32 locations (what autocast produces)
        are sampled at full fp32 location precision.
    """
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    bs, len_in, heads, channels = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    shapes = shapes_as_list(spatial_shapes, spatial_shapes_list)
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != len_in:
        raise ValueError(f"value has {len_in} tokens but the level sizes {shapes} add up to {sum(sizes)}")

    compute_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                        attention_weights.dtype)
    n = bs * heads
    # grid_sample wants one (C, H, W) map per batch entry, so heads are folded into the batch:
    # maps (bs*heads, C, H, W), grids (bs*heads, Lq, points, 2) in [-1, 1], weights (bs*heads, 1, Lq, points).
    grids = (sampling_locations.to(compute_dtype) * 2 - 1).transpose(1, 2).reshape(n, len_q, levels, points, 2)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(n, 1, len_q, levels, points)

    output = None
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split(sizes, dim=1), shapes)):
        maps = value_l.to(compute_dtype).permute(0, 2, 3, 1).reshape(n, channels, h, w)
        sampled = F.grid_sample(maps, grids[:, :, lvl], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (n, C, Lq, points)
        # Summing level by level keeps only one level's samples alive outside autograd's saved tensors.
        contrib = (sampled * weights[..., lvl, :]).sum(-1)  # (n, C, Lq)
        output = contrib if output is None else output + contrib

    if output is None:  # zero levels: nothing to attend to
        output = value.new_zeros(n, channels, len_q, dtype=compute_dtype)
    # (bs*heads, C, Lq) -> (bs, Lq, heads*C), heads major within the channel dim.
    output = output.reshape(bs, heads * channels, len_q).transpose(1, 2).contiguous()
    return output.to(value.dtype)
