"""COCO box evaluation (pycocotools COCOeval) over one or several processes.

Usage::

    evaluator = CocoEvaluator(coco_gt)          # coco_gt: datasets.get_coco_api(dataset)
    evaluator.update({image_id: {"scores": (K,), "labels": (K,), "boxes": (K, 4) xyxy pixels}})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = evaluator.summarize()               # {'AP', 'AP50', ..., 'ARl'}
"""
import contextlib
import copy
import io
from typing import Dict, Iterable, List

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.dist import is_dist_avail_and_initialized, is_main_process

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _as_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    return np.asarray(values).tolist()


def to_coco_results(image_id: int, prediction: Dict) -> List[Dict]:
    """Detections of one image -> COCO result dicts (bbox xywh in pixels, category_id, score, image_id)."""
    boxes = _as_list(prediction["boxes"])
    scores = _as_list(prediction["scores"])
    labels = _as_list(prediction["labels"])
    results = []
    for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
        results.append({"image_id": int(image_id), "category_id": int(label),
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)})
    return results


def empty_results(coco_gt: COCO) -> COCO:
    """A COCO object with the images and categories of ``coco_gt`` and no detections.

    ``COCO.loadRes`` cannot take an empty list, but no detections is a valid (AP 0) outcome.
    """
    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                  "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


class CocoEvaluator:
    """Collects detections per image and scores them with COCOeval ('bbox' only).

    ``stats`` holds pycocotools' raw list of 12 numbers after ``summarize`` (-1 where the
    ground truth has nothing in that range, as pycocotools reports it).
    """

    def __init__(self, coco_gt: COCO, iou_types: Iterable[str] = ("bbox",)):
        iou_types = tuple(iou_types)
        unsupported = [t for t in iou_types if t != "bbox"]
        if unsupported:
            raise ValueError(f"CocoEvaluator supports iou_types ('bbox',) only, got {unsupported}")
        self.coco_gt = coco_gt
        self.iou_types = iou_types
        self.predictions: Dict[int, List[Dict]] = {}
        self.coco_eval: Dict[str, COCOeval] = {}
        self.stats: List[float] = []

    def update(self, results: Dict[int, Dict]) -> None:
        """Add detections: {image_id: {scores (K,), labels (K,), boxes (K, 4) xyxy in original pixels}}.

        An image seen again replaces its earlier detections (the distributed sampler repeats images).
        """
        for image_id, prediction in results.items():
            self.predictions[int(image_id)] = to_coco_results(int(image_id), prediction)

    def synchronize_between_processes(self) -> None:
        """Give every process the detections of all processes (no-op without torch.distributed)."""
        if not is_dist_avail_and_initialized():
            return
        gathered: List = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.predictions)
        merged: Dict[int, List[Dict]] = {}
        for part in gathered:
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)  # padding duplicates: first copy wins
        self.predictions = merged

    def coco_results(self) -> List[Dict]:
        """All detections as a COCO results list (image_id, category_id, bbox xywh, score), by image id."""
        return [det for image_id in sorted(self.predictions) for det in self.predictions[image_id]]

    def accumulate(self) -> None:
        """Run COCOeval's per-image evaluation and accumulation over the images seen."""
        detections = self.coco_results()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
            # loadRes writes area/id/segmentation into the dicts it gets: give it copies
            coco_dt = (self.coco_gt.loadRes([dict(d, bbox=list(d["bbox"])) for d in detections]) if detections
                        else empty_results(self.coco_gt))
            for iou_type in self.iou_types:
                evaluator = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
                # only the images that were evaluated count (a partial run must not score 0 on the rest)
                image_ids = sorted(self.predictions) or sorted(self.coco_gt.getImgIds())
                evaluator.params.imgIds = image_ids
                evaluator.evaluate()
                evaluator.accumulate()
                self.coco_eval[iou_type] = evaluator

    def summarize(self) -> Dict[str, float]:
        """Print pycocotools' 12-line table (main process) and return {'AP', 'AP50', ..., 'ARl'}."""
        if not self.coco_eval:
            raise RuntimeError("CocoEvaluator.summarize() called before accumulate()")
        evaluator = self.coco_eval["bbox"]
        if is_main_process():
            print("IoU metric: bbox")
            evaluator.summarize()
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator.summarize()
        self.stats = [float(v) for v in evaluator.stats]
        return dict(zip(STAT_NAMES, self.stats))
