"""COCO-format detection data read through pycocotools.

Layout under the data root (``--coco_path``)::

    train2017/  val2017/  annotations/instances_{train,val,minitrain}2017.json

The pycocotools object holds the annotation file as given, and evaluation scores against it,
as upstream Deformable-DETR's evaluator (and every published COCO number) does; only missing
``area`` / ``iscrowd`` fields get the COCO defaults (box width x height, 0), which COCOeval needs.
Training targets are cleaned per image as upstream's are (crowd regions left out, boxes clipped to
their image and dropped where that leaves no width or height); a box with a non-finite coordinate
is dropped as well. ``load_coco`` counts how many boxes of the file that clips and drops.
"""
import contextlib
import io
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import torch
from pycocotools.coco import COCO

from util.errors import InputError

from . import transforms as T


class BadImageError(InputError, RuntimeError):
    """An image file that is missing, cannot be decoded, or whose size is not the one its
    annotation file states. The message names the path and image id."""


class AnnotationError(InputError):
    """An annotation file that cannot be used: not JSON, keys missing, duplicate image ids,
    category ids outside ``categories`` or the classifier. The message names the file and entry."""


# ----------------------------------------------------------------------------- annotations

def _clean_box(bbox, width: Optional[float], height: Optional[float]) -> Optional[List[float]]:
    """COCO xywh ``bbox`` (four numbers) clipped to the image ([0, width] x [0, height]); None when
    degenerate or not finite."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), x + w, y + h
    if width is not None:
        x1 = min(x1, float(width))
    if height is not None:
        y1 = min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def count_cleaned_boxes(coco: COCO) -> Tuple[int, int]:
    """(boxes clipped, boxes dropped) when the annotations of ``coco`` become training targets.

    Counted against each image's listed width and height; the annotations are not changed.
    """
    clipped = dropped = 0
    for ann in coco.dataset.get("annotations", []):
        image = coco.imgs[ann["image_id"]]
        box = _clean_box(ann["bbox"], image.get("width"), image.get("height"))
        if box is None:
            dropped += 1
        elif box != [float(v) for v in ann["bbox"]]:
            clipped += 1
    return clipped, dropped


def fill_defaults(coco: COCO) -> None:
    """Give annotations without ``area`` the box's width x height and those without ``iscrowd`` 0,
    the values COCO assumes (COCOeval reads both); no value the file states is changed."""
    for ann in coco.dataset.get("annotations", []):
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)


def read_annotation_json(ann_file: str) -> Dict:
    """The parsed annotation file; ``AnnotationError`` naming the file when it is not a JSON object."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"annotation file {ann_file} is not valid JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"annotation file {ann_file} is not valid JSON (not UTF-8 text: {exc.reason})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"annotation file {ann_file}: the top level must be a JSON object with 'images', "
                              f"'annotations' and 'categories', not a {type(data).__name__}")
    return data


def _entry_id(entry, ann_file: str, what: str, index: int):
    if not isinstance(entry, dict) or "id" not in entry:
        raise AnnotationError(f"annotation file {ann_file}: {what} #{index} has no 'id'")
    return entry["id"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_box_fields(annotation: Dict, ann_file: str, ann_id) -> None:
    """``bbox`` must be four numbers and ``area``, when given, a number: COCOeval reads them as they are."""
    bbox = annotation["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise AnnotationError(f"annotation file {ann_file}: annotation id {ann_id} has bbox {bbox!r}; "
                              "it must be four numbers [x, y, width, height]")
    if "area" in annotation and not _is_number(annotation["area"]):
        raise AnnotationError(f"annotation file {ann_file}: annotation id {ann_id} has area "
                              f"{annotation['area']!r}; it must be a number")


def check_annotation_json(data: Dict, ann_file: str, num_classes: Optional[int] = None) -> None:
    """Structural checks, before any training, of a COCO annotation dict; raises ``AnnotationError``.

    'images', 'categories' and 'annotations' are required (an empty annotation list is allowed, with a
    warning); image ids are unique and every image names its file; every annotation refers to a listed
    image and a listed category, its bbox is four numbers and its area (if given) a number, and (given
    ``num_classes``) its category id is a valid classifier index in 0..num_classes-1 (a negative id
    would silently index from the end).
    """
    for key in ("images", "categories", "annotations"):
        if key not in data:
            raise AnnotationError(f"annotation file {ann_file} has no '{key}' key")
        if not isinstance(data[key], list):
            raise AnnotationError(f"annotation file {ann_file}: '{key}' must be a list")
    if not data["images"]:
        raise AnnotationError(f"annotation file {ann_file} lists no images")
    image_ids = set()
    for index, image in enumerate(data["images"]):
        image_id = _entry_id(image, ann_file, "image", index)
        if image_id in image_ids:
            raise AnnotationError(f"annotation file {ann_file}: image id {image_id} is listed twice")
        if "file_name" not in image:
            raise AnnotationError(f"annotation file {ann_file}: image id {image_id} has no 'file_name'")
        for key in ("width", "height"):
            value = image.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AnnotationError(f"annotation file {ann_file}: image id {image_id} has {key} {value!r}; "
                                      "it must be a positive integer (pixels)")
        image_ids.add(image_id)
    category_ids = set()
    for index, category in enumerate(data["categories"]):
        category_id = _entry_id(category, ann_file, "category", index)
        if category_id in category_ids:
            raise AnnotationError(f"annotation file {ann_file}: category id {category_id} is listed twice")
        category_ids.add(category_id)
    if not data["annotations"]:
        warnings.warn(f"annotation file {ann_file} has no annotations: every image is background", RuntimeWarning)
    for index, annotation in enumerate(data["annotations"]):
        ann_id = _entry_id(annotation, ann_file, "annotation", index)
        for key in ("image_id", "category_id", "bbox"):
            if key not in annotation:
                raise AnnotationError(f"annotation file {ann_file}: annotation id {ann_id} has no '{key}'")
        if annotation["image_id"] not in image_ids:
            raise AnnotationError(f"annotation file {ann_file}: annotation id {ann_id} refers to image id "
                                  f"{annotation['image_id']}, which is not in 'images'")
        _check_box_fields(annotation, ann_file, ann_id)
        category_id = annotation["category_id"]
        if category_id not in category_ids:
            raise AnnotationError(f"annotation file {ann_file}: annotation id {ann_id} has category_id "
                                  f"{category_id}, which is not in 'categories' (ids {sorted(category_ids)})")
        if num_classes is not None and not (isinstance(category_id, int) and 0 <= category_id < num_classes):
            raise AnnotationError(f"annotation file {ann_file}: annotation id {ann_id} has category_id "
                                  f"{category_id}, outside the classifier's range 0..{num_classes - 1} "
                                  f"(--num_classes {num_classes})")


def load_coco(ann_file: str, num_classes: Optional[int] = None) -> COCO:
    """The pycocotools object of ``ann_file`` as given (``check_annotation_json`` first; missing area /
    iscrowd filled by ``fill_defaults``); ``num_clipped`` / ``num_dropped`` count the boxes that
    training-target cleaning clips and drops (``count_cleaned_boxes``)."""
    data = read_annotation_json(ann_file)
    check_annotation_json(data, ann_file, num_classes)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines, once per process
        coco.createIndex()
    fill_defaults(coco)
    coco.num_clipped, coco.num_dropped = count_cleaned_boxes(coco)
    return coco


def coco_target(image_id: int, annotations: List[Dict], width: int, height: int) -> Dict[str, torch.Tensor]:
    """The training target of one image before transforms: boxes (N, 4) absolute xyxy, cleaned.

    Crowd regions are dropped, as in DETR: they are not objects to match one-to-one. Boxes are
    clipped to (width, height) and dropped where that leaves no area or a coordinate is not finite
    (the boxes ``count_cleaned_boxes`` counts); ``area`` is the file's.
    """
    anns = [a for a in annotations if not a.get("iscrowd", 0)]
    raw = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    raw[:, 2:] += raw[:, :2]
    boxes = T.clip_boxes_xyxy(raw, width, height)
    target = {
        "boxes": boxes,
        "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
        "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
        "iscrowd": torch.tensor([int(a["iscrowd"]) for a in anns], dtype=torch.int64),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
    # clamping turns an infinite side into the image edge: such a box is malformed, not clipped
    return T.filter_boxes(target, T.non_degenerate(boxes) & torch.isfinite(raw).all(dim=1))


# ----------------------------------------------------------------------------- images

def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB copy of ``image`` with its contrast kept.

    Pillow's ``convert("RGB")`` clips 16-bit grey values (modes ``I;16*``, and ``I`` as 16-bit PNGs
    open in older Pillow versions) at 255, which turns a normal 16-bit image all white; those are
    rescaled from 0..65535 to 0..255 first. A mode ``I`` image whose values already fit in 8 bits is
    kept as it is. Floating-point images have no defined range: ``ValueError``.
    """
    if image.mode == "F":
        raise ValueError("floating-point (mode F) images have no defined pixel range")
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        scale = 257.0 if image.mode != "I" or values.max(initial=0) > 255 else 1.0
        grey = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        image = PIL.Image.fromarray(grey, mode="L")
    return image.convert("RGB")


def read_image(path: str, image_id: int) -> PIL.Image.Image:
    """The RGB image at ``path``; ``BadImageError`` naming path and id when missing or undecodable."""
    if not os.path.isfile(path):
        raise BadImageError(f"image file not found: {path} (image id {image_id})")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not deep inside a transform
            return to_rgb(image)
    except Exception as exc:  # any decoder failure means the same thing: this file is unusable
        raise BadImageError(f"cannot read image file {path} (image id {image_id}): "
                            f"{type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- dataset

class CocoDetection(torch.utils.data.Dataset):
    """Images of ``img_folder`` listed in ``ann_file``; item ``i`` is ``(image, target)``.

    ``image``: (3, H, W) float tensor after ``transforms`` (normalised with the standard pipeline);
    ``target``: boxes (N, 4) cxcywh normalised by (W, H), labels (N,) int64 category ids,
    image_id () int64, orig_size (2,) int64 (h, w) of the file, size (2,) int64 (h, w) after
    transforms, area (N,), iscrowd (N,).

    With ``skip_bad_images`` an unreadable image is replaced by the next readable one (index
    order, wrapping around) with a warning; ``num_skipped`` counts the replacements made in this
    process (loader workers keep their own counts) and ``skipped_image_ids`` lists the ids.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms=None, skip_bad_images: bool = False,
                 num_classes: Optional[int] = None):
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.coco = load_coco(ann_file, num_classes)
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        self.num_skipped = 0
        self.skipped_image_ids: List[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.img_folder, self.coco.imgs[image_id]["file_name"])

    def load(self, index: int):
        """(PIL image, target before transforms) of item ``index``; ``BadImageError`` on a bad file."""
        image_id = self.ids[index]
        path = self.image_path(image_id)
        image = read_image(path, image_id)
        width, height = image.size
        listed = (self.coco.imgs[image_id].get("width"), self.coco.imgs[image_id].get("height"))
        if None not in listed and (int(listed[0]), int(listed[1])) != (width, height):
            # the boxes were clipped to the listed size: they would not fit this file
            raise BadImageError(f"image file {path} (image id {image_id}) is {width}x{height} pixels but "
                                f"{self.ann_file} says {listed[0]}x{listed[1]}")
        target = coco_target(image_id, self.coco.imgToAnns.get(image_id, []), width, height)
        return image, target

    def _load_or_replace(self, index: int):
        if not self.skip_bad_images:
            return self.load(index)
        skipped_here: List[int] = []
        for step in range(len(self.ids)):
            try:
                image, target = self.load((index + step) % len(self.ids))
                if skipped_here:
                    # travels with the batch, so the main process can count skips made in loader workers
                    target["skipped_ids"] = skipped_here
                return image, target
            except BadImageError as exc:
                skipped_here.append(self.ids[(index + step) % len(self.ids)])
                self.num_skipped += 1
                self.skipped_image_ids.append(self.ids[(index + step) % len(self.ids)])
                warnings.warn(f"skipping bad image ({exc}); using the next image instead", RuntimeWarning)
        raise BadImageError(f"no readable image among the {len(self.ids)} images of {self.ann_file}")

    def __getitem__(self, index: int):
        image, target = self._load_or_replace(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# ----------------------------------------------------------------------------- building from flags

def resolve_ann_file(root: str, name: str) -> str:
    """A bare file name is looked up in ``root/annotations``; a path with a directory part is used as is."""
    if os.sep in name or "/" in name:
        return name
    return os.path.join(root, "annotations", name)


def transforms_from_args(image_set: str, args) -> T.Compose:
    return T.make_coco_transforms(image_set, min_size=args.min_size, max_size=args.max_size,
                                  eval_size=args.eval_size, random_crop=args.random_crop,
                                  crop_min_size=args.crop_min_size, crop_size=args.crop_size)


def build(image_set: str, args, ann_file: Optional[str] = None) -> CocoDetection:
    """The ``image_set`` ('train' | 'val') split under ``args.coco_path`` with the standard transforms."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    root = args.coco_path
    if not root:
        raise ValueError("--coco_path is not set")
    if ann_file is None:
        ann_file = resolve_ann_file(root, args.train_ann if image_set == "train" else args.val_ann)
    img_folder = os.path.join(root, f"{image_set}2017")
    if not os.path.isdir(img_folder):
        raise FileNotFoundError(f"image folder not found: {img_folder} (expected under --coco_path {root})")
    return CocoDetection(img_folder, ann_file, transforms=transforms_from_args(image_set, args),
                         skip_bad_images=args.skip_bad_images, num_classes=args.num_classes)
