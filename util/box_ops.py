"""Bounding-box utilities: format conversion, IoU and generalized IoU (GIoU).

Box formats:
    cxcywh: (cx, cy, w, h)
    xyxy:   (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0
All functions operate on the last dimension and accept any leading batch shape
unless stated otherwise.
"""
from typing import Tuple

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w, 0.5 * h
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_well_formed(boxes: Tensor, name: str) -> None:
    # Degenerate (inverted) boxes make the enclosing-box area in GIoU meaningless,
    # so fail loudly instead of returning silently wrong values.
    assert (boxes[..., 2:] >= boxes[..., :2]).all(), f"{name}: boxes must satisfy x1 >= x0 and y1 >= y0"


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.
    Returns:
        iou (N, M) and union area (N, M).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    Args:
        boxes1: (N, 4) xyxy, well formed.
        boxes2: (M, 4) xyxy, well formed.
    Returns:
        (N, M) GIoU in [-1, 1].
    """
    _check_well_formed(boxes1, "boxes1")
    _check_well_formed(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """IoU of paired xyxy boxes.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (N, 4) xyxy.
    Returns:
        iou (N,) and union area (N,).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    return inter / union, union


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Generalized IoU of paired xyxy boxes.

    Cheaper than taking the diagonal of ``generalized_box_iou`` when only matched
    pairs are needed (the loss), since it avoids the (N, N) matrix.

    Args:
        boxes1: (N, 4) xyxy, well formed.
        boxes2: (N, 4) xyxy, well formed.
        check: assert well-formedness. The assertion reads a device tensor on the
            host (a GPU sync), so hot loss paths whose boxes are well formed by
            construction (cxcywh with w, h >= 0) pass False.
    Returns:
        (N,) GIoU.
    """
    if check:
        _check_well_formed(boxes1, "boxes1")
        _check_well_formed(boxes2, "boxes2")
    iou, union = elementwise_box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    return iou - (enclosing - union) / enclosing


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of x, clamped so that values at 0 or 1 give finite results.

    Used to turn normalised box coordinates back into the unbounded space
    where the box-refinement heads add their offsets.
    """
    x = x.clamp(min=0, max=1)
    numerator = x.clamp(min=eps)
    denominator = (1 - x).clamp(min=eps)
    return torch.log(numerator / denominator)


def box_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype box arithmetic runs in for inputs of ``dtype``: float32 or wider.

    Half types go up to float32 (a bf16 box in [0, 1] is only good to ~2^-9 of the image);
    float64 stays float64, so a float64 model (upstream-equivalence checks, gradcheck) keeps
    its precision on the box path too.
    """
    return torch.promote_types(dtype, torch.float32)
