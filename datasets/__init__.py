"""Detection datasets: COCO (pycocotools) and the built-in synthetic shapes, plus batching.

Entry points used by the training code:
    build_dataset(image_set, args) -> Dataset of (image (3, H, W) float normalised, target dict)
    collate_fn(batch)              -> (NestedTensor (B, 3, H, W) + mask (B, H, W) True on padding, [targets])
    num_classes(args)              -> classifier size (max category id + 1)
    get_coco_api(dataset)          -> the pycocotools COCO object of a dataset (Subset unwrapped)
    data_summary(dataset, split)   -> counts of images, annotations and cleaned training boxes of a split
    class_names(dataset)           -> {category id: name} of a dataset's annotation file
"""
import os
from typing import Dict, List, Tuple

import torch.utils.data

from util.dist import is_main_process
from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

from . import synthetic
from .coco import AnnotationError, BadImageError, CocoDetection, build as build_coco

__all__ = ["build_dataset", "collate_fn", "num_classes", "get_coco_api", "data_summary", "class_names",
           "AnnotationError",
           "BadImageError", "CocoDetection"]

COCO_NUM_CLASSES = 91  # upstream convention: largest COCO category id (90) + 1


def _synthetic_root(args) -> str:
    """Generate the synthetic data under ``args.coco_path`` if absent or made with other parameters."""
    root = args.coco_path
    if not root:
        raise ValueError("--coco_path is not set (the synthetic dataset is generated there)")
    synthetic.ensure_synthetic_coco(root, num_train=args.synthetic_num_train, num_val=args.synthetic_num_val,
                                    image_size=args.synthetic_image_size, seed=args.synthetic_seed,
                                    verbose=is_main_process())
    return root


def build_dataset(image_set: str, args) -> CocoDetection:
    """The 'train' or 'val' split selected by ``args.dataset_file`` ('coco' | 'synthetic')."""
    kind = args.dataset_file
    if kind == "coco":
        return build_coco(image_set, args)
    if kind == "synthetic":
        root = _synthetic_root(args)
        # the generated file names, whatever --train_ann / --val_ann say (those name real COCO files)
        ann = os.path.join(root, "annotations", f"instances_{image_set}2017.json")
        return build_coco(image_set, args, ann_file=ann)
    raise ValueError(f"unknown dataset_file {kind!r}: expected 'coco' or 'synthetic'")


def num_classes(args) -> int:
    """Classifier size: 91 for COCO, max synthetic category id + 1 for the synthetic shapes."""
    kind = args.dataset_file
    if kind == "coco":
        return COCO_NUM_CLASSES
    if kind == "synthetic":
        return synthetic.num_classes()
    raise ValueError(f"unknown dataset_file {kind!r}: expected 'coco' or 'synthetic'")


def get_coco_api(dataset):
    """The pycocotools COCO object behind ``dataset`` (through any nesting of ``Subset``)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO annotations")
    return dataset.coco


def class_names(dataset) -> Dict[int, str]:
    """{category id: name} from the ``categories`` of the dataset's annotation file (the labels the
    classifier is trained on); a category without a name keeps its id as text."""
    categories = get_coco_api(dataset).dataset.get("categories", [])
    return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}


def data_summary(dataset, split: str) -> Dict:
    """{'split', 'images', 'annotations', 'clipped_boxes', 'dropped_boxes', 'ann_file'} of a loaded split.

    'annotations' counts the file's annotations (all of them are evaluation ground truth);
    clipped/dropped count the boxes that become clipped or are left out as training targets, when
    the file is loaded. Images skipped as unreadable are only known while reading them, so epoch
    and evaluation records count those.
    """
    coco = get_coco_api(dataset)
    return {"split": split, "images": len(coco.imgs), "annotations": len(coco.anns),
            "clipped_boxes": int(getattr(coco, "num_clipped", 0)),
            "dropped_boxes": int(getattr(coco, "num_dropped", 0)),
            "ann_file": getattr(dataset, "ann_file", None)}


def collate_fn(batch: List[Tuple]) -> Tuple[NestedTensor, List[dict]]:
    """[(image (3, H_i, W_i), target)] -> (NestedTensor padded at bottom/right, list of targets)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), list(targets)
