"""Multi-scale deformable attention sampling in plain PyTorch (the reference and CPU path).

Sampling convention, shared with the CUDA operator and with the cross-attention map:
bilinear interpolation, zero padding, ``align_corners=False``. A normalised location
(x, y) on a level of size (H, W) lands on pixel coordinates (x * W - 0.5, y * H - 0.5);
each of the four neighbouring pixels that lies outside the map contributes zero.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_pytorch", "ms_deform_attn_pytorch_backward", "shapes_as_list", "check_shapes",
           "check_level_sizes"]


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


def check_level_sizes(len_in: int, shapes: Sequence[Tuple[int, int]]) -> None:
    """Raises ValueError unless the levels [(H, W), ...] tile value's ``len_in`` tokens exactly.

    Shared by both implementations so that a level layout that does not fit ``value`` gets the
    same one-line error whichever path runs (the compiled kernels would otherwise read, and
    atomically write, past the end of value or clip silently).
    """
    total = sum(int(h) * int(w) for h, w in shapes)
    if total != len_in:
        raise ValueError(f"value has {len_in} tokens but the level sizes {[tuple(s) for s in shapes]} "
                         f"add up to {total}")


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
    job = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   spatial_shapes_list)
    bs, _, heads, channels = value.shape
    len_q = sampling_locations.shape[1]
    output = None
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split(job.sizes, dim=1), job.shapes)):
        maps = _level_maps(value_l, h, w, job.dtype)
        sampled = F.grid_sample(maps, job.grids[:, :, lvl], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (n, C, Lq, points)
        # Summing level by level keeps only one level's samples alive outside autograd's saved tensors.
        contrib = (sampled * job.weights[..., lvl, :]).sum(-1)  # (n, C, Lq)
        output = contrib if output is None else output + contrib

    if output is None:  # zero levels: nothing to attend to
        output = value.new_zeros(bs * heads, channels, len_q, dtype=job.dtype)
    # (bs*heads, C, Lq) -> (bs, Lq, heads*C), heads major within the channel dim.
    output = output.reshape(bs, heads * channels, len_q).transpose(1, 2).contiguous()
    return output.to(value.dtype)


class _Sampling(NamedTuple):
    """What forward and backward both derive from their inputs (see ``_prepare``)."""
    shapes: List[Tuple[int, int]]   # [(H, W), ...] python ints
    sizes: List[int]                # H * W per level
    dtype: torch.dtype              # promoted compute dtype
    grids: torch.Tensor             # (bs*heads, Lq, levels, points, 2) in [-1, 1]
    weights: torch.Tensor           # (bs*heads, 1, Lq, levels, points)


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             spatial_shapes_list) -> _Sampling:
    """Checks the inputs (same errors on every path) and lays them out for grid_sample."""
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    shapes = shapes_as_list(spatial_shapes, spatial_shapes_list)
    check_level_sizes(value.shape[1], shapes)
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    grids, weights = _grids_and_weights(sampling_locations, attention_weights, dtype)
    return _Sampling(shapes, [h * w for h, w in shapes], dtype, grids, weights)


def _compute_dtype(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)


def _grids_and_weights(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                       compute_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Heads folded into the batch, as grid_sample wants one (C, H, W) map per batch entry.

    sampling_locations (bs, Lq, heads, levels, points, 2) -> grids (bs*heads, Lq, levels, points, 2)
    in [-1, 1]; attention_weights (bs, Lq, heads, levels, points) -> (bs*heads, 1, Lq, levels, points).
    """
    bs, len_q, heads, levels, points, _ = sampling_locations.shape
    n = bs * heads
    grids = (sampling_locations.to(compute_dtype) * 2 - 1).transpose(1, 2).reshape(n, len_q, levels, points, 2)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(n, 1, len_q, levels, points)
    return grids, weights


def _level_maps(value_l: torch.Tensor, h: int, w: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """One level's tokens (bs, H*W, heads, C) as maps (bs*heads, C, H, W)."""
    bs, _, heads, channels = value_l.shape
    return value_l.to(compute_dtype).permute(0, 2, 3, 1).reshape(bs * heads, channels, h, w)


def ms_deform_attn_pytorch_backward(
        value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor, attention_weights: torch.Tensor, grad_output: torch.Tensor,
        need_grad_value: bool = True, spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of ``ms_deform_attn_pytorch`` without autograd (the registered op's CPU backward).

    A custom operator's kernel runs below autograd, so it cannot differentiate the forward by
    recording it; instead this replays the forward level by level and calls grid_sample's own
    backward. Inputs as in the forward plus grad_output (bs, Lq, heads * C). Returns
    (grad_value (bs, Lin, heads, C) or None when not ``need_grad_value``,
    grad_locations (bs, Lq, heads, levels, points, 2), grad_weights (bs, Lq, heads, levels, points)),
    each contiguous and in the dtype of its input.
    """
    job = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   spatial_shapes_list)
    bs, _, heads, channels = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    shapes, sizes, compute_dtype, grids, weights = job
    n = bs * heads
    # (bs, Lq, heads*C) -> (bs*heads, C, Lq, 1), the layout of one level's weighted samples
    grad_out = grad_output.to(compute_dtype).reshape(bs, len_q, heads, channels).permute(0, 2, 3, 1)
    grad_out = grad_out.reshape(n, channels, len_q, 1)

    grad_value_levels, grad_loc_levels, grad_attn_levels = [], [], []
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split(sizes, dim=1), shapes)):
        maps = _level_maps(value_l, h, w, compute_dtype)
        grid = grids[:, :, lvl]  # (n, Lq, points, 2)
        sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        grad_attn_levels.append((grad_out * sampled).sum(1))  # (n, Lq, points)
        grad_sampled = grad_out * weights[..., lvl, :]  # (n, C, Lq, points)
        # interpolation 0 = bilinear, padding 0 = zeros, as in the forward
        grad_maps, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled, maps, grid, 0, 0, False, [need_grad_value, True])
        grad_loc_levels.append(grad_grid * 2)  # grid = 2 * location - 1
        if need_grad_value:  # (n, C, H, W) -> (bs, H*W, heads, C)
            grad_value_levels.append(grad_maps.reshape(bs, heads, channels, h * w).permute(0, 3, 1, 2))

    # (bs*heads, Lq, levels, points[, 2]) -> (bs, Lq, heads, levels, points[, 2])
    grad_loc = sampling_locations.new_zeros(n, len_q, levels, points, 2, dtype=compute_dtype)
    grad_attn = attention_weights.new_zeros(n, len_q, levels, points, dtype=compute_dtype)
    if levels:
        grad_loc = torch.stack(grad_loc_levels, 2)
        grad_attn = torch.stack(grad_attn_levels, 2)
    grad_loc = grad_loc.reshape(bs, heads, len_q, levels, points, 2).transpose(1, 2)
    grad_attn = grad_attn.reshape(bs, heads, len_q, levels, points).transpose(1, 2)
    grad_value = None
    if need_grad_value:
        grad_value = (torch.cat(grad_value_levels, 1) if levels else value.new_zeros(value.shape, dtype=compute_dtype))
        grad_value = grad_value.to(value.dtype).contiguous()
    return (grad_value, grad_loc.to(sampling_locations.dtype).contiguous(),
            grad_attn.to(attention_weights.dtype).contiguous())
