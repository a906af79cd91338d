"""Turn model outputs into COCO-style detections (top-k over queries x classes)."""
from typing import Dict, List

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-k detections per image from the one-to-one predictions.

    Every (query, class) pair is a candidate with score sigmoid(logit), so one query
    may yield several detections of different classes (as Deformable DETR evaluates).
    The one-to-many outputs are ignored: they are a training signal only.
    """

    def __init__(self, topk: int = 100):
        super().__init__()
        self.topk = topk

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """Args:
            outputs: 'pred_logits' (B, Q, K), 'pred_boxes' (B, Q, 4) cxcywh in [0, 1].
            target_sizes: (B, 2) image sizes as (h, w), the size the boxes are wanted in
                (the original image size for COCO evaluation).
        Returns:
            B dicts: 'scores' (n,), 'labels' (n,) int64, 'boxes' (n, 4) absolute xyxy,
            n = min(topk, Q * K), sorted by descending score.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"PostProcess: target_sizes must be ({len(logits)}, 2), got {tuple(target_sizes.shape)}")
        _, num_queries, num_classes = logits.shape
        k = min(self.topk, num_queries * num_classes)  # tiny test models may have fewer candidates
        scores, flat_idx = logits.sigmoid().flatten(1).topk(k, dim=1)
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes
        xyxy = box_cxcywh_to_xyxy(boxes).gather(1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        h, w = target_sizes.to(xyxy.dtype).unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)  # x scales with width, y with height
        xyxy = xyxy * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


def build_postprocessors(args) -> Dict[str, nn.Module]:
    """{'bbox': PostProcess(topk=args.topk_eval)}."""
    return {"bbox": PostProcess(topk=args.topk_eval)}
