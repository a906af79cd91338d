"""Points, boxes and ground truth for the reference diagnostics (docs/design.md §9).

Everything is in normalised coordinates of an image's valid region (x right, y down, the image is
[0, 1] x [0, 1]); boxes are xyxy unless a name says cxcywh. IoU comes from ``util.box_ops``.
"""
from typing import Tuple

import torch

from util.box_ops import box_cxcywh_to_xyxy, box_iou

# elements of a (points x boxes) boolean block made at once; bounds the memory of ``inside_any_box``
_BLOCK_ELEMENTS = 1 << 24


def inside_box(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Whether each point lies in its own box (borders count as inside).

    points (..., 2) and boxes (..., 4) xyxy, broadcastable against each other over the leading dims.
    Returns (...) bool.
    """
    x, y = points[..., 0], points[..., 1]
    return (x >= boxes[..., 0]) & (x <= boxes[..., 2]) & (y >= boxes[..., 1]) & (y <= boxes[..., 3])


def inside_any_box(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """points (..., 2), boxes (G, 4) xyxy -> (...) bool, True where a point lies in at least one box.

    Processed in blocks so that no more than ~16M (point, box) pairs exist at once (COCO-scale
    encoders sample millions of locations per layer).
    """
    flat = points.reshape(-1, 2)
    if boxes.shape[0] == 0:
        return torch.zeros(points.shape[:-1], dtype=torch.bool, device=points.device)
    step = max(1, _BLOCK_ELEMENTS // boxes.shape[0])
    parts = [inside_box(chunk[:, None, :], boxes[None]).any(1) for chunk in flat.split(step)]
    return torch.cat(parts).view(points.shape[:-1])


def smallest_containing_box(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """points (N, 2), boxes (G, 4) xyxy -> (N,) int64 index of the smallest box containing the
    point (ties: the lower index), -1 where no box contains it."""
    if boxes.shape[0] == 0:
        return torch.full(points.shape[:1], -1, dtype=torch.int64, device=points.device)
    inside = inside_box(points[:, None, :], boxes[None])  # (N, G)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(torch.float64)
    masked_area = torch.where(inside, area[None], torch.inf)
    smallest = masked_area.argmin(1)
    return torch.where(inside.any(1), smallest, -1)


def covered_area_fraction(boxes: torch.Tensor) -> torch.Tensor:
    """boxes (G, 4) xyxy -> () float64 area of their union inside the image [0, 1]^2 (exact).

    The box edges cut the image into a grid of cells; each cell is either inside some box or not,
    so the union is the total area of the covered cells. O(G^3) work: fine for the tens of boxes
    of an image.
    """
    boxes = boxes.to(torch.float64).clamp(0, 1)
    if boxes.shape[0] == 0:
        return boxes.new_zeros(())
    xs = torch.cat([boxes[:, 0], boxes[:, 2]]).unique()  # sorted
    ys = torch.cat([boxes[:, 1], boxes[:, 3]]).unique()
    centre_x = (xs[1:] + xs[:-1]) / 2
    centre_y = (ys[1:] + ys[:-1]) / 2
    cells = torch.stack(torch.meshgrid(centre_x, centre_y, indexing="ij"), -1)  # (X-1, Y-1, 2)
    covered = inside_any_box(cells, boxes)
    cell_area = (xs[1:] - xs[:-1])[:, None] * (ys[1:] - ys[:-1])[None, :]
    return (cell_area * covered).sum()


def match_to_ground_truth(boxes: torch.Tensor, gt_boxes: torch.Tensor, threshold: float = 0.5
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each box's best ground-truth box (docs/design.md §9: a box matches when its best IoU is >= threshold).

    boxes (N, 4) cxcywh, gt_boxes (G, 4) cxcywh.
    Returns matched GT index (N,) int64 (argmax IoU, -1 below the threshold or without GT) and the
    best IoU (N,) float (0 without GT; degenerate boxes count as IoU 0).
    """
    if gt_boxes.shape[0] == 0:
        return (torch.full(boxes.shape[:1], -1, dtype=torch.int64, device=boxes.device),
                boxes.new_zeros(boxes.shape[:1], dtype=torch.float32))
    iou, _ = box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(gt_boxes.float()))
    best, index = iou.nan_to_num(0.0).max(1)
    return torch.where(best >= threshold, index, -1), best
