"""COCO loading, DETR transforms, batching, bad input and COCO evaluation on tiny hand-made data."""
import argparse
import json
import os
import random

import numpy as np
import PIL.Image
import pytest
import torch

import datasets
from datasets import transforms as T
from datasets.coco import BadImageError, CocoDetection
from datasets.coco_eval import STAT_NAMES, CocoEvaluator
from cli.config import get_args_parser

MEAN = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)


# ----------------------------------------------------------------------------- builders

def rectangle_image(width, height, box, colour=(255, 0, 0)):
    """A black image with the pixels [x0, x1) x [y0, y1) of ``box`` filled."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = colour
    return PIL.Image.fromarray(pixels, "RGB")


def xyxy_target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    return {"boxes": boxes, "labels": torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64)}


def red_pixel_box(image):
    """xyxy bounds of the clearly red pixels of a PIL image or an unnormalised (3, H, W) tensor; None if none."""
    if isinstance(image, torch.Tensor):
        red = (image[0] > 0.5) & (image[1] < 0.5)
        ys, xs = torch.nonzero(red, as_tuple=True)
        ys, xs = ys.numpy(), xs.numpy()
    else:
        arr = np.asarray(image)
        ys, xs = np.nonzero((arr[..., 0] > 127) & (arr[..., 1] < 128))
    if len(xs) == 0:
        return None
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def write_coco(root, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"}),
               split="val", ann_name=None):
    """Save ``images`` [(image_id, PIL image or None)] and a COCO json; returns the annotation path."""
    folder = os.path.join(root, f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    entries = []
    for image_id, image, size in images:
        name = f"{image_id:06d}.png"
        if image is not None:
            image.save(os.path.join(folder, name))
        entries.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    anns = [dict(a, id=i + 1) for i, a in enumerate(annotations)]
    path = os.path.join(root, "annotations", ann_name or f"instances_{split}2017.json")
    with open(path, "w") as f:
        json.dump({"images": entries, "annotations": anns, "categories": list(categories)}, f)
    return path


def ann(image_id, bbox, category=1, iscrowd=0):
    return {"image_id": image_id, "category_id": category, "bbox": list(bbox), "area": float(bbox[2] * bbox[3]),
            "iscrowd": iscrowd}


def three_image_set(root):
    """Images 1 (one rectangle), 2 (no objects), 3 (two rectangles); 'val' split under ``root``."""
    images = [(1, rectangle_image(40, 30, (5, 6, 20, 16)), (40, 30)),
              (2, rectangle_image(32, 48, (0, 0, 0, 0)), (32, 48)),
              (3, rectangle_image(50, 40, (10, 10, 30, 25)), (50, 40))]
    anns = [ann(1, (5, 6, 15, 10)), ann(3, (10, 10, 20, 15), 2), ann(3, (30, 30, 10, 5), 1)]
    return write_coco(root, images, anns)


def make_args(root, **overrides):
    """The parser's complete namespace (defaults) with a small COCO layout at ``root``."""
    values = dict(dataset_file="coco", coco_path=str(root), min_size=[32], max_size=64)
    values.update(overrides)
    return argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **values})


# ----------------------------------------------------------------------------- transforms keep boxes on their pixels

def assert_box_bounds_pixels(image, target, tol):
    found = red_pixel_box(image)
    assert target["boxes"].shape == (1, 4)
    np.testing.assert_allclose(target["boxes"][0].numpy(), np.array(found, dtype=np.float32), atol=tol)


def test_hflip_keeps_box_on_pixels():
    image, target = rectangle_image(40, 30, (3, 5, 17, 12)), xyxy_target([[3, 5, 17, 12]])
    out_image, out_target = T.hflip(image, target)
    assert_box_bounds_pixels(out_image, out_target, tol=0)
    np.testing.assert_allclose(out_target["boxes"][0].numpy(), [23, 5, 37, 12])
    # flipping twice is the identity
    back_image, back_target = T.hflip(out_image, out_target)
    assert torch.equal(back_target["boxes"], target["boxes"])
    assert np.array_equal(np.asarray(back_image), np.asarray(image))


@pytest.mark.parametrize("size,max_size,expected_hw", [
    (60, None, (60, 80)),       # 40 x 30: h = 60, w = int(60 * 40 / 30) = 80
    (17, None, (17, 22)),       # w = int(17 * 40 / 30) = int(22.67) = 22 (floored, not rounded to 23)
    (64, 70, (52, 69)),         # 40 / 30 * 64 = 85.3 > 70: h = round(70 * 30 / 40) = round(52.5) = 52
                                # (half to even), w = int(52 * 40 / 30) = int(69.33) = 69
    ((45, 20), None, (45, 20)),  # an explicit (h, w)
])
def test_resize_keeps_box_on_pixels(size, max_size, expected_hw):
    image, target = rectangle_image(40, 30, (8, 6, 28, 22)), xyxy_target([[8, 6, 28, 22]])
    out_image, out_target = T.resize(image, target, size, max_size)
    w, h = out_image.size
    assert (h, w) == expected_hw and out_target["size"].tolist() == [h, w]
    # interpolation blurs the edges by up to about a pixel
    assert_box_bounds_pixels(out_image, out_target, tol=1.0)
    sx, sy = w / 40, h / 30
    assert out_target["area"][0].item() == pytest.approx(20 * 16 * sx * sy, rel=1e-5)


# Upstream Deformable-DETR's rule, worked by hand. With max_size, if long / short * size > max_size the
# shorter side becomes round(max_size * short / long) (Python's round: half to even); then the shorter
# side is that size and the longer side int(size * long / short) (floored). An image whose shorter side
# already equals the size keeps its size. Only where the shorter side would round to 0 pixels does this
# codebase differ: one pixel across and max_size along.
UPSTREAM_SIZES = [
    # (w, h, size, max_size) -> (h, w)
    ((640, 480, 800, 1333), (800, 1066)),   # 640/480*800 = 1066.7 <= 1333; w = int(800*640/480) = int(1066.67)
    ((480, 640, 800, 1333), (1066, 800)),   # the same, portrait
    ((640, 424, 800, 1333), (800, 1207)),   # w = int(800*640/424) = int(1207.55) = 1207
    ((500, 375, 600, 1000), (600, 800)),    # w = int(600*500/375) = int(800.0) = 800 exactly
    ((40, 30, 30, None), (30, 40)),         # shorter side already 30: unchanged
    ((640, 200, 800, 1333), (417, 1334)),   # 3.2*800 = 2560 > 1333: h = round(1333*200/640) = round(416.56)
                                            # = 417, w = int(417*640/200) = int(1334.4) = 1334 (past max_size)
    ((1000, 200, 400, 1333), (267, 1335)),  # 5*400 = 2000 > 1333: h = round(266.6) = 267, w = int(267*5) = 1335
    ((400, 200, 800, 1333), (666, 1332)),   # 2*800 > 1333: h = round(1333*200/400) = round(666.5) = 666
                                            # (half to even), w = int(666*2) = 1332
    ((400, 200, 800, 1335), (668, 1336)),   # h = round(1335*200/400) = round(667.5) = 668 (even), w = 1336
    ((100, 100, 800, 600), (600, 600)),     # 1*800 > 600: size = round(600*100/100) = 600, square
    ((1333, 400, 800, 1333), (400, 1333)),  # 1333/400*800 = 2666 > 1333: h = round(400.0) = 400 = the
                                            # shorter side already: unchanged
    ((1, 2000, 800, 1333), (2000, 1)),      # round(1333*1/2000) = round(0.67) = 1 = the shorter side: unchanged
    ((1, 5000, 800, 1333), (1333, 1)),      # round(1333*1/5000) = round(0.27) = 0: guard, 1 across, 1333 along
    ((5000, 1, 800, 1333), (1, 1333)),      # the same, landscape
]


@pytest.mark.parametrize("case,expected_hw", UPSTREAM_SIZES)
def test_scaled_size_follows_upstream_rounding(case, expected_hw):
    w, h, size, max_size = case
    assert T.scaled_size((w, h), size, max_size) == expected_hw


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_training_and_evaluation_resize_to_the_same_sizes(image_set):
    """Both pipelines resize a 640 x 200 image at 800 / 1333 to upstream's 1334 x 417, boxes scaled to match."""
    random.seed(0)
    image, target = rectangle_image(640, 200, (64, 20, 320, 100)), xyxy_target([[64, 20, 320, 100]])
    pipeline = T.make_coco_transforms(image_set, min_size=[800], max_size=1333, eval_size=800, random_crop=False)
    if image_set == "train":
        pipeline.transforms[0] = T.RandomHorizontalFlip(p=0.0)  # keep the box where it is, to check it by hand
    out_image, out_target = pipeline(image, target)
    assert tuple(out_image.shape) == (3, 417, 1334) and out_target["size"].tolist() == [417, 1334]
    # (64, 20, 320, 100) * (1334 / 640, 417 / 200) = (133.4, 41.7, 667, 208.5) -> cxcywh / (1334, 417)
    expected = torch.tensor([400.2 / 1334, 125.1 / 417, 533.6 / 1334, 166.8 / 417])
    torch.testing.assert_close(out_target["boxes"][0], expected)


def test_crop_shifts_clips_and_drops_boxes():
    image = rectangle_image(40, 30, (10, 8, 30, 20))
    target = xyxy_target([[10, 8, 30, 20], [0, 0, 4, 4]], labels=[1, 2])
    out_image, out_target = T.crop(image, target, (5, 15, 20, 20))  # top, left, h, w
    assert out_image.size == (20, 20)
    assert out_target["labels"].tolist() == [1]  # the second box lies outside the crop
    np.testing.assert_allclose(out_target["boxes"][0].numpy(), [0, 3, 15, 15])
    assert out_target["area"].tolist() == [15 * 12]
    assert_box_bounds_pixels(out_image, out_target, tol=0)


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_round_trip(seed):
    """Random flip / resize / crop then ToTensor + Normalize: the normalised box still bounds the red pixels."""
    random.seed(seed)
    box = (30, 20, 90, 60)
    image, target = rectangle_image(128, 96, box), xyxy_target([box])
    pipeline = T.make_coco_transforms("train", min_size=[64, 80, 96], max_size=160, random_crop=True,
                                      crop_min_size=[96, 112], crop_size=[48, 96])
    tensor, out = pipeline(image, target)
    h, w = tensor.shape[-2:]
    assert out["size"].tolist() == [h, w]
    pixels = tensor * STD + MEAN
    found = red_pixel_box(pixels)
    if found is None:  # cropped away: the box must be gone too
        assert out["boxes"].shape == (0, 4)
        return
    assert out["boxes"].shape == (1, 4)
    cx, cy, bw, bh = (out["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
    np.testing.assert_allclose([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], found, atol=1.5)


def test_normalize_boxes_to_cxcywh():
    image = torch.zeros(3, 20, 40)
    _, out = T.Normalize()(image, xyxy_target([[4, 2, 12, 10]]))
    torch.testing.assert_close(out["boxes"], torch.tensor([[8 / 40, 6 / 20, 8 / 40, 8 / 20]]))
    torch.testing.assert_close(T.Normalize()(torch.ones(3, 2, 2), None)[0][:, 0, 0], (1 - MEAN.view(3)) / STD.view(3))


@pytest.mark.parametrize("seed", range(4))
def test_empty_target_through_transforms_and_collate(seed):
    random.seed(seed)
    pipeline = T.make_coco_transforms("train", min_size=[32, 48], max_size=64, random_crop=True,
                                      crop_min_size=[40], crop_size=[20, 40])
    empty = xyxy_target([])
    image, target = pipeline(rectangle_image(50, 40, (0, 0, 0, 0)), empty)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    other, other_target = pipeline(rectangle_image(50, 40, (5, 5, 45, 35)), xyxy_target([[5, 5, 45, 35]]))
    samples, targets = datasets.collate_fn([(image, target), (other, other_target)])
    assert samples.tensors.shape[0] == 2 and targets[0]["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------- batching

def test_collate_pads_and_masks():
    a, b = torch.ones(3, 10, 20), torch.full((3, 16, 8), 2.0)
    samples, targets = datasets.collate_fn([(a, {"id": 0}), (b, {"id": 1})])
    assert samples.tensors.shape == (2, 3, 16, 20) and samples.mask.shape == (2, 16, 20)
    assert not samples.mask[0, :10, :20].any() and samples.mask[0, 10:].all()
    assert not samples.mask[1, :16, :8].any() and samples.mask[1, :, 8:].all()
    assert (samples.tensors[0, :, 10:] == 0).all() and (samples.tensors[1, :, :, 8:] == 0).all()
    assert torch.equal(samples.tensors[0, :, :10, :20], a) and [t["id"] for t in targets] == [0, 1]


# ----------------------------------------------------------------------------- the dataset

def test_dataset_items_and_targets(tmp_path):
    three_image_set(tmp_path)
    dataset = datasets.build_dataset("val", make_args(tmp_path, eval_size=30))
    assert len(dataset) == 3
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert target["image_id"].item() == 1 and target["image_id"].dtype == torch.int64
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    torch.testing.assert_close(target["boxes"], torch.tensor([[12.5 / 40, 11 / 30, 15 / 40, 10 / 30]]))
    assert target["labels"].dtype == torch.int64
    # image 2 has no objects
    image, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["size"].tolist() == [45, 30]  # shorter side 30, aspect kept
    samples, targets = datasets.collate_fn([dataset[i] for i in range(3)])
    assert samples.tensors.shape == (3, 3, 45, 40) and len(targets) == 3
    assert datasets.get_coco_api(torch.utils.data.Subset(dataset, [0, 2])) is dataset.coco
    # the training split runs through the random pipeline too
    write_coco(tmp_path, [(1, rectangle_image(40, 30, (5, 6, 20, 16)), (40, 30))], [ann(1, (5, 6, 15, 10))],
               split="train")
    train = datasets.build_dataset("train", make_args(tmp_path, crop_min_size=[32], crop_size=[16, 32]))
    for _ in range(5):
        image, target = train[0]
        assert target["boxes"].shape[1] == 4 and ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_annotation_file_resolution(tmp_path):
    three_image_set(tmp_path)
    write_coco(tmp_path, [(1, rectangle_image(8, 8, (1, 1, 3, 3)), (8, 8))], [ann(1, (1, 1, 2, 2))],
               split="train", ann_name="instances_minitrain2017.json")
    mini = datasets.build_dataset("train", make_args(tmp_path, train_ann="instances_minitrain2017.json"))
    assert len(mini) == 1 and mini.ann_file == os.path.join(str(tmp_path), "annotations",
                                                            "instances_minitrain2017.json")
    elsewhere = tmp_path / "other.json"
    os.replace(tmp_path / "annotations" / "instances_val2017.json", elsewhere)
    assert len(datasets.build_dataset("val", make_args(tmp_path, val_ann=str(elsewhere)))) == 3
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        datasets.build_dataset("val", make_args(tmp_path))
    with pytest.raises(ValueError, match="image_set"):
        datasets.build_dataset("test", make_args(tmp_path))


def test_num_classes():
    defaults = get_args_parser().parse_args([])
    assert datasets.num_classes(argparse.Namespace(**{**vars(defaults), "dataset_file": "coco"})) == 91
    assert datasets.num_classes(defaults) == 91  # the parser's default dataset is COCO
    assert datasets.num_classes(argparse.Namespace(**{**vars(defaults), "dataset_file": "synthetic"})) == 7


# ----------------------------------------------------------------------------- bad input

def test_missing_image_names_file_and_id(tmp_path):
    three_image_set(tmp_path)
    path = tmp_path / "val2017" / "000003.png"
    os.remove(path)
    dataset = datasets.build_dataset("val", make_args(tmp_path))
    with pytest.raises(BadImageError, match=r"000003\.png.*image id 3"):
        dataset[2]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_file_and_id(tmp_path, damage):
    three_image_set(tmp_path)
    path = tmp_path / "val2017" / "000001.png"
    data = path.read_bytes()
    path.write_bytes(b"this is not an image" if damage == "garbage" else data[: len(data) // 2])
    dataset = datasets.build_dataset("val", make_args(tmp_path))
    with pytest.raises(BadImageError, match=r"000001\.png.*image id 1"):
        dataset[0]


def test_skip_bad_images_replaces_counts_and_warns(tmp_path):
    three_image_set(tmp_path)
    (tmp_path / "val2017" / "000001.png").write_bytes(b"broken")
    os.remove(tmp_path / "val2017" / "000002.png")
    dataset = datasets.build_dataset("val", make_args(tmp_path, skip_bad_images=True))
    with pytest.warns(RuntimeWarning) as record:
        image, target = dataset[0]
    messages = [str(w.message) for w in record]
    assert any("000001.png" in m and "image id 1" in m for m in messages)
    assert any("000002.png" in m and "image id 2" in m for m in messages)
    # images 1 and 2 are bad: the next readable one in index order is image 3, every time
    assert target["image_id"].item() == 3 and image.shape[0] == 3
    assert dataset.num_skipped == 2 and dataset.skipped_image_ids == [1, 2]
    with pytest.warns(RuntimeWarning):
        assert dataset[1][1]["image_id"].item() == 3
    assert dataset.num_skipped == 3
    assert dataset[2][1]["image_id"].item() == 3  # a good image is never replaced
    os.remove(tmp_path / "val2017" / "000003.png")
    with pytest.warns(RuntimeWarning), pytest.raises(BadImageError, match="no readable image"):
        dataset[0]


def test_degenerate_and_outside_annotations(tmp_path):
    anns = [ann(1, (5, 5, 10, 10)),            # fine
            ann(1, (30, 20, 20, 20), 2),       # partly outside (image 40 x 30): clipped to (30, 20, 10, 10)
            ann(1, (-4, -2, 8, 6)),            # partly outside at the top-left: clipped to (0, 0, 4, 4)
            ann(1, (10, 10, 0, 5)),            # zero width: dropped
            ann(1, (10, 10, 5, -3)),           # negative height: dropped
            ann(1, (45, 5, 5, 5)),             # entirely outside: dropped
            ann(1, (2, 2, float("inf"), 3)),   # not finite (JSON Infinity): dropped, not clipped to the edge
            ann(1, (1, 1, 30, 20), iscrowd=1)]  # crowd: kept for evaluation, not a training target
    write_coco(tmp_path, [(1, rectangle_image(40, 30, (0, 0, 0, 0)), (40, 30))], anns)
    dataset = CocoDetection(str(tmp_path / "val2017"), str(tmp_path / "annotations" / "instances_val2017.json"))
    coco = datasets.get_coco_api(dataset)
    assert (coco.num_clipped, coco.num_dropped) == (2, 4)
    # the evaluation ground truth is the file's: every box and area as written
    assert [(a["bbox"], a["area"]) for a in coco.dataset["annotations"]] == [
        (list(a["bbox"]), a["area"]) for a in anns]
    assert [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[1]))] == [list(a["bbox"]) for a in anns]
    # the training target is cleaned
    _, target = dataset.load(0)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5, 15, 15], [30, 20, 40, 30], [0, 0, 4, 4]]))
    assert target["labels"].tolist() == [1, 2, 1] and target["iscrowd"].tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- evaluation

def eval_set(tmp_path):
    images = [(i, None, (64, 48)) for i in (1, 2, 3)]
    anns = [ann(1, (2, 3, 20, 10)), ann(1, (30, 20, 25, 25), 2), ann(2, (10, 10, 40, 30), 2),
            ann(3, (0, 0, 8, 8))]
    path = write_coco(tmp_path, images, anns)
    return CocoDetection(str(tmp_path / "val2017"), path)


def gt_as_detections(coco):
    results = {}
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns]).reshape(-1, 4)
        results[image_id] = {"boxes": boxes, "scores": torch.ones(len(anns)),
                             "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}
    return results


def test_evaluator_ground_truth_scores_one(tmp_path, capsys):
    coco = datasets.get_coco_api(eval_set(tmp_path))
    evaluator = CocoEvaluator(coco, ("bbox",))
    evaluator.update(gt_as_detections(coco))
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = evaluator.summarize()
    assert list(stats) == list(STAT_NAMES) and len(evaluator.stats) == 12
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out
    results = evaluator.coco_results()
    assert len(results) == 4 and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert results[0] == {"image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 20.0, 10.0], "score": 1.0}
    json.dumps(results)


def test_evaluator_without_detections(tmp_path):
    coco = datasets.get_coco_api(eval_set(tmp_path))
    empty = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
             for i in coco.getImgIds()}
    for updates in (empty, {}):
        evaluator = CocoEvaluator(coco)
        evaluator.update(updates)
        evaluator.accumulate()
        stats = evaluator.summarize()
        assert stats["AP"] == 0.0 and stats["AP50"] == 0.0 and stats["AR100"] == 0.0
        assert evaluator.coco_results() == []


def test_evaluator_wrong_class_and_partial_images(tmp_path):
    coco = datasets.get_coco_api(eval_set(tmp_path))
    detections = gt_as_detections(coco)
    evaluator = CocoEvaluator(coco)
    # only image 2 was evaluated (e.g. one process's share): the others must not count as misses
    evaluator.update({2: detections[2]})
    evaluator.accumulate()
    assert evaluator.summarize()["AP"] == pytest.approx(1.0)
    wrong = {i: dict(d, labels=3 - d["labels"]) for i, d in detections.items()}
    evaluator = CocoEvaluator(coco)
    evaluator.update(wrong)
    evaluator.accumulate()
    assert evaluator.summarize()["AP50"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="bbox"):
        CocoEvaluator(coco, ("segm",))



def pycocotools_stats(ann_file, detections):
    """The 12 COCOeval numbers of ``detections`` (COCO result dicts) scored by pycocotools alone, on the
    annotation file as it is (what upstream Deformable-DETR's evaluator and published numbers do)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        evaluator = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_evaluation_scores_against_the_annotation_file_as_given(tmp_path):
    """Out-of-image and degenerate ground truth is scored as the file gives it, as pycocotools does on
    the raw file; the clipped/dropped counts are still reported and training targets still cleaned."""
    anns = [ann(1, (10, 10, 30, 20)),   # inside the 100 x 80 image
            ann(1, (80, 50, 40, 40)),   # reaches to (120, 90): clipping would leave (80, 50, 20, 30)
            ann(1, (50, 20, 0, 10))]    # zero width: no detection can overlap it
    path = write_coco(str(tmp_path), [(1, rectangle_image(100, 80, (0, 0, 0, 0)), (100, 80))], anns)
    xywh = [(10, 10, 30, 20, 0.9), (80, 50, 40, 40, 0.8), (50, 20, 1, 10, 0.7)]  # one per ground-truth box
    detections = {1: {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in xywh], dtype=torch.float32),
                      "scores": torch.tensor([s for *_, s in xywh]), "labels": torch.ones(3, dtype=torch.int64)}}
    dataset = datasets.build_dataset("val", make_args(tmp_path))  # what main.py builds; engine.evaluate's path:
    evaluator = CocoEvaluator(datasets.get_coco_api(dataset), ("bbox",))
    evaluator.update(detections)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = evaluator.summarize()
    assert [stats[name] for name in STAT_NAMES] == pycocotools_stats(path, evaluator.coco_results())
    # by hand: the first two detections hit their boxes exactly (IoU 1), the third misses the zero-width
    # box; 3 ground-truth boxes -> recall 1/3, 2/3 at precision 1, so precision 1 at the recall points
    # 0, 0.01, ..., 0.66 and 0 above: AP = 67 / 101 at every IoU threshold. (Against clipped ground truth
    # the second detection would miss (IoU 600 / 1600) and the third box be gone: AP 51 / 101.)
    assert stats["AP"] == pytest.approx(67 / 101) and stats["AP50"] == pytest.approx(67 / 101)
    summary = datasets.data_summary(dataset, "val")
    assert (summary["annotations"], summary["clipped_boxes"], summary["dropped_boxes"]) == (3, 1, 1)
    _, target = dataset.load(0)
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 40, 30], [80, 50, 100, 80]]))
