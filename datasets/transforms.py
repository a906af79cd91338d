"""DETR-style joint transforms of an image and its detection target.

Every transform is a callable ``(image, target) -> (image, target)``. ``image`` is a PIL image
until ``ToTensor`` and a (3, H, W) float tensor afterwards. ``target`` is a dict (or None) with

    boxes    (N, 4) float, absolute pixel xyxy (continuous coordinates: a box covering pixel
             columns x0..x1-1 is [x0, x1)) until ``Normalize``, then cxcywh divided by (W, H, W, H)
    labels   (N,) int64
    area     (N,) float
    iscrowd  (N,) int64
    size     (2,) int64 (h, w) of the current image
    ...      any other key is passed through untouched (image_id, orig_size)

The per-box keys (boxes, labels, area, iscrowd) are filtered together when boxes disappear.
Randomness comes from python's ``random`` module, which the training entry point seeds per
worker and saves in checkpoints.
"""
import random
from typing import List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.functional as F

PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- box helpers

def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy -> (N, 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def clip_boxes_xyxy(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """(N, 4) xyxy clipped to the image rectangle [0, width] x [0, height]."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(min=0, max=width)
    out[:, 1::2] = out[:, 1::2].clamp(min=0, max=height)
    return out


def non_degenerate(boxes: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where an (N, 4) xyxy box has positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def filter_boxes(target: dict, keep: torch.Tensor) -> dict:
    """Keep the boxes where ``keep`` (N,) bool is True, in every per-box field."""
    for key in PER_BOX_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


def image_size_wh(image) -> Tuple[int, int]:
    """(width, height) of a PIL image or a (C, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


# ----------------------------------------------------------------------------- functional forms

def crop(image, target: Optional[dict], region: Tuple[int, int, int, int]):
    """Crop ``region`` = (top, left, height, width); boxes are shifted, clipped, and dropped if empty."""
    top, left, height, width = region
    image = F.crop(image, top, left, height, width)
    if target is None:
        return image, None
    target = target.copy()
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        shift = torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        boxes = clip_boxes_xyxy(target["boxes"] - shift, width, height)
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target = filter_boxes(target, non_degenerate(boxes))
    return image, target


def hflip(image, target: Optional[dict]):
    """Mirror left-right; a box [x0, x1) becomes [W - x1, W - x0)."""
    width, _ = image_size_wh(image)
    image = F.hflip(image)
    if target is None or "boxes" not in target:
        return image, target
    target = target.copy()
    boxes = target["boxes"]
    target["boxes"] = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=-1)
    return image, target


def scaled_size(image_wh: Tuple[int, int], size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """(h, w) after scaling the shorter side to ``size``, with upstream Deformable-DETR's rounding.

    When the longer side would pass ``max_size``, the shorter side becomes round(max_size * short / long)
    instead (Python's round, half to even). The longer side is then int(size * long / short), floored,
    so it can end a pixel or two past ``max_size``, as upstream's does. An image whose shorter side
    already has that size keeps its size exactly. The float expressions are upstream's, in its order,
    so every size is bit-for-bit the one upstream trains and evaluates on.

    One difference: where upstream's shorter side rounds to 0 pixels (the longer side at least
    2 * max_size times the shorter, e.g. 1 x 5000, on which upstream fails), it is one pixel and the
    longer side is ``max_size``; the aspect ratio gives way, not max_size.
    """
    w, h = image_wh
    short, long = float(min(w, h)), float(max(w, h))
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
        if size == 0:
            return (max_size, 1) if w < h else (1, max_size)
    if min(w, h) == size:
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target: Optional[dict], size, max_size: Optional[int] = None):
    """Resize to ``size``: an int (shorter side, see ``scaled_size``) or an explicit (h, w)."""
    if isinstance(size, (list, tuple)):
        new_h, new_w = int(size[0]), int(size[1])
    else:
        new_h, new_w = scaled_size(image_size_wh(image), int(size), max_size)
    old_w, old_h = image_size_wh(image)
    image = F.resize(image, [new_h, new_w])
    if target is None:
        return image, None
    target = target.copy()
    sx, sy = new_w / old_w, new_h / old_h
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
    if "area" in target:
        target["area"] = target["area"] * (sx * sy)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image, target


# ----------------------------------------------------------------------------- transform classes

class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the shorter side to a size drawn uniformly from ``sizes``, longer side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region with width in [min_size, min(W, max_size)] (same for height), anywhere."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = int(min_size), int(max_size)

    def __call__(self, image, target):
        width, height = image_size_wh(image)
        # an image smaller than min_size is cropped to its own size (no-op) instead of failing
        crop_w = random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = random.randint(min(self.min_size, height), min(height, self.max_size))
        top = random.randint(0, height - crop_h)
        left = random.randint(0, width - crop_w)
        return crop(image, target, (top, left, crop_h, crop_w))


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL image -> (3, H, W) float tensor in [0, 1]; the target is unchanged."""

    def __call__(self, image, target):
        return F.to_tensor(image), target


class Normalize:
    """Subtract ``mean`` / divide by ``std`` per channel; boxes xyxy-absolute -> cxcywh in [0, 1]."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor, target):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None or "boxes" not in target:
            return image, target
        target = target.copy()
        h, w = image.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        target["boxes"] = xyxy_to_cxcywh(target["boxes"].float()) / scale
        return image, target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: List):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "\n".join(f"    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}(\n{inner}\n)"


# ----------------------------------------------------------------------------- the standard pipelines

def make_coco_transforms(image_set: str, min_size: Sequence[int], max_size: int, eval_size: Optional[int] = None,
                         random_crop: bool = True, crop_min_size: Sequence[int] = (400, 500, 600),
                         crop_size: Sequence[int] = (384, 600)) -> Compose:
    """The DETR training / evaluation pipeline ending in ``ToTensor`` + ``Normalize``.

    train: flip, then either multi-scale resize or (with ``random_crop``, half the time)
    resize to ``crop_min_size`` -> random crop in ``crop_size`` -> multi-scale resize.
    val: resize the shorter side to ``eval_size`` (default ``max(min_size)``).
    """
    finish = Compose([ToTensor(), Normalize()])
    min_size = [int(s) for s in min_size]
    if image_set == "train":
        scales = RandomResize(min_size, max_size=max_size)
        if random_crop:
            cropped = Compose([RandomResize([int(s) for s in crop_min_size]),
                               RandomSizeCrop(int(crop_size[0]), int(crop_size[1])),
                               RandomResize(min_size, max_size=max_size)])
            scales = RandomSelect(scales, cropped)
        return Compose([RandomHorizontalFlip(), scales, finish])
    if image_set == "val":
        size = int(eval_size) if eval_size is not None else max(min_size)
        return Compose([RandomResize([size], max_size=max_size), finish])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
