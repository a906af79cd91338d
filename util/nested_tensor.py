"""Batches of differently sized images: a padded tensor plus a padding mask."""
from typing import List, Optional

import torch
from torch import Tensor


class NestedTensor:
    """A padded batch. ``tensors``: (B, C, H, W); ``mask``: (B, H, W), True on padding."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor], size_divisibility: int = 1) -> NestedTensor:
    """Pad a list of (C, H_i, W_i) images to a common (B, C, H, W) at the top-left corner.

    The mask is True where a pixel is padding. ``size_divisibility`` rounds H and W up.
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: empty list of images")
    for i, t in enumerate(tensor_list):
        if t.dim() != 3:
            raise ValueError(f"image {i} must be a 3-D (C, H, W) tensor, got shape {tuple(t.shape)}")
    channels = tensor_list[0].shape[0]
    max_h = max(t.shape[1] for t in tensor_list)
    max_w = max(t.shape[2] for t in tensor_list)
    if size_divisibility > 1:
        max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
        max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, max_h, max_w))
    mask = torch.ones((len(tensor_list), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensors, mask):
        if img.shape[0] != channels:
            raise ValueError(f"all images need {channels} channels, got {img.shape[0]}")
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)
