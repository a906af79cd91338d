"""A built-in synthetic detection dataset, written to disk as real COCO files.

Images show coloured shapes of six classes (rectangle, ellipse, triangle, cross, ring, star)
on cluttered backgrounds (colour gradient, thin random lines, soft blurred blobs, pixel noise).
Shapes vary in size (about 9% to 45% of the image side, so some are COCO-"small"), aspect
ratio, rotation and colour, and may overlap a little. Each image holds 1-6 objects; every
25th image holds none. Everything follows from the seed: image ``i`` of a split is drawn from
its own generator seeded by (seed, split, i), so the files are identical on every machine and
the first images do not change when more are asked for.

Written layout under ``root`` (what ``datasets.coco`` reads)::

    train2017/000000000001.jpg ...   val2017/...   annotations/instances_{train,val}2017.json
    synthetic.json                   (the generation parameters; a mismatch triggers regeneration)
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

# bump when the drawing changes, so data made by older code is regenerated
GENERATOR_VERSION = 1

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
    {"id": 5, "name": "ring", "supercategory": "shape"},
    {"id": 6, "name": "star", "supercategory": "shape"},
]
PARAMS_FILE = "synthetic.json"
DESCRIPTION = "synthetic shapes (datasets/synthetic.py)"
SPLITS = {"train": 0, "val": 1}
EMPTY_EVERY = 25  # image i with (i + 1) % EMPTY_EVERY == 0 has no objects
MAX_OVERLAP_IOU = 0.4  # between object boxes
MIN_VISIBLE = 0.6  # fraction of an object's pixels that later objects may not cover


def num_classes() -> int:
    """Classifier size for the synthetic categories: max category id + 1 (COCO convention)."""
    return max(c["id"] for c in CATEGORIES) + 1


# ----------------------------------------------------------------------------- drawing

def _random_colour(rng: np.random.Generator, saturated: bool) -> Tuple[int, int, int]:
    """An RGB colour: vivid for objects, muted for background clutter (so clutter is never an object)."""
    hue = rng.uniform(0, 6)
    sat = rng.uniform(0.6, 1.0) if saturated else rng.uniform(0.0, 0.3)
    val = rng.uniform(0.55, 1.0) if saturated else rng.uniform(0.25, 0.75)
    # hsv -> rgb by hand: one sextant of the hue circle
    i, f = int(hue) % 6, hue - int(hue)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return tuple(int(round(255 * c)) for c in rgb)


def _background(rng: np.random.Generator, width: int, height: int) -> PIL.Image.Image:
    """A muted gradient with thin lines and soft blobs."""
    c0 = np.array(_random_colour(rng, saturated=False), dtype=np.float32)
    c1 = np.array(_random_colour(rng, saturated=False), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    pixels = c0 + (c1 - c0) * ramp[..., None]
    image = PIL.Image.fromarray(pixels.astype(np.uint8), "RGB")

    blobs = PIL.Image.new("RGB", (width, height))
    blob_mask = PIL.Image.new("L", (width, height), 0)
    draw_c, draw_m = PIL.ImageDraw.Draw(blobs), PIL.ImageDraw.Draw(blob_mask)
    side = min(width, height)
    for _ in range(rng.integers(2, 6)):
        r = rng.uniform(0.05, 0.15) * side
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        colour = _random_colour(rng, saturated=False)
        draw_c.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw_m.ellipse([cx - r, cy - r, cx + r, cy + r], fill=int(rng.integers(60, 140)))
    # blurred, half-transparent blobs have no edges: texture, not shapes
    blur = PIL.ImageFilter.GaussianBlur(radius=0.04 * side)
    image = PIL.Image.composite(blobs.filter(blur), image, blob_mask.filter(blur))

    draw = PIL.ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 10)):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=_random_colour(rng, saturated=False), width=int(rng.integers(1, 3)))
    return image


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _polygon(draw: PIL.ImageDraw.ImageDraw, unit: np.ndarray, cx: float, cy: float, w: float, h: float,
             angle: float) -> None:
    """Fill ``unit`` (K, 2) points in [-1, 1]^2, rotated by ``angle``, scaled to fit a w x h box at (cx, cy)."""
    pts = _rotate(unit, angle)
    span = pts.max(0) - pts.min(0)
    pts = (pts - (pts.max(0) + pts.min(0)) / 2) / np.maximum(span, 1e-6) * np.array([w, h])
    draw.polygon([(float(x + cx), float(y + cy)) for x, y in pts], fill=255)


def _star(points: int, inner: float) -> np.ndarray:
    angles = np.arange(2 * points) * math.pi / points - math.pi / 2
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _draw_shape(mask: PIL.Image.Image, category: int, cx: float, cy: float, w: float, h: float,
                rng: np.random.Generator) -> None:
    """Draw category ``category`` filled with 255 into the 'L' ``mask``, roughly filling the w x h box."""
    draw = PIL.ImageDraw.Draw(mask)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    if category == 1:  # rectangle
        draw.rectangle(box, fill=255)
    elif category == 2:  # ellipse
        draw.ellipse(box, fill=255)
    elif category == 3:  # triangle, any rotation
        _polygon(draw, _star(3, 1.0)[::2], cx, cy, w, h, rng.uniform(0, 2 * math.pi))
    elif category == 4:  # plus-shaped cross with arms a quarter to 40% as thick as long
        t = rng.uniform(0.25, 0.4)
        draw.rectangle([cx - w / 2, cy - h * t / 2, cx + w / 2, cy + h * t / 2], fill=255)
        draw.rectangle([cx - w * t / 2, cy - h / 2, cx + w * t / 2, cy + h / 2], fill=255)
    elif category == 5:  # ring: an ellipse outline
        thickness = max(2, int(round(min(w, h) * rng.uniform(0.15, 0.25))))
        draw.ellipse(box, outline=255, width=thickness)
    elif category == 6:  # five-pointed star
        _polygon(draw, _star(5, rng.uniform(0.4, 0.5)), cx, cy, w, h, rng.uniform(0, 2 * math.pi / 5))
    else:
        raise ValueError(f"unknown synthetic category {category}")


def _mask_box(mask: np.ndarray) -> Optional[List[float]]:
    """Tight COCO xywh box of the nonzero pixels of an (H, W) mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def _iou(a: List[float], b: List[float]) -> float:
    """IoU of two xywh boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _object_size(rng: np.random.Generator, category: int, side: int) -> Tuple[float, float]:
    """(w, h) in pixels: log-uniform scale 9%-45% of the side; elongated shapes get aspect 0.5-2."""
    scale = math.exp(rng.uniform(math.log(0.09), math.log(0.45))) * side
    scale = max(scale, 8.0)  # below ~8 px no class is recognisable
    spread = 2.0 if category in (1, 2, 3) else 1.3
    aspect = math.exp(rng.uniform(-math.log(spread), math.log(spread)))
    return scale * math.sqrt(aspect), scale / math.sqrt(aspect)


def _place(rng: np.random.Generator, category: int, width: int, height: int):
    """A random (cx, cy, w, h) for one object that fits inside the image with a 1-pixel margin."""
    w, h = _object_size(rng, category, min(width, height))
    w, h = min(w, width - 2.0), min(h, height - 2.0)
    cx = rng.uniform(w / 2 + 1, width - w / 2 - 1)
    cy = rng.uniform(h / 2 + 1, height - h / 2 - 1)
    return cx, cy, w, h


def _keeps_others_visible(owner: np.ndarray, new_mask: np.ndarray, areas: List[float]) -> bool:
    """True when painting ``new_mask`` on the (H, W) ``owner`` map (object index + 1, 0 = background)
    leaves every earlier object at least MIN_VISIBLE of its pixels: a box must show its object."""
    for k, area in enumerate(areas):
        visible = np.count_nonzero((owner == k + 1) & ~new_mask)
        if visible < MIN_VISIBLE * area:
            return False
    return True


def draw_image(rng: np.random.Generator, image_size: int, num_objects: int):
    """One image: (PIL RGB image, list of (category_id, xywh box, pixel area of the whole shape))."""
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    width = max(16, int(round(image_size * math.sqrt(aspect))))
    height = max(16, int(round(image_size / math.sqrt(aspect))))
    image = _background(rng, width, height)
    owner = np.zeros((height, width), dtype=np.int32)
    objects: List[Tuple[int, List[float], float]] = []
    for _ in range(num_objects):
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        # a few tries to place it without hiding much of an earlier object; else leave it out
        for _attempt in range(10):
            cx, cy, w, h = _place(rng, category, width, height)
            if any(_iou([cx - w / 2, cy - h / 2, w, h], box) > MAX_OVERLAP_IOU for _, box, _ in objects):
                continue
            mask = PIL.Image.new("L", (width, height), 0)
            _draw_shape(mask, category, cx, cy, w, h, rng)
            pixels = np.asarray(mask) > 0
            box = _mask_box(pixels)
            if box is not None and _keeps_others_visible(owner, pixels, [a for _, _, a in objects]):
                break
        else:
            continue
        image.paste(_random_colour(rng, saturated=True), (0, 0, width, height), mask)
        owner[pixels] = len(objects) + 1
        objects.append((category, box, float(pixels.sum())))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(height, width, 3))
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), objects


# ----------------------------------------------------------------------------- writing a split

def _split_images(folder: str, split: str, count: int, image_size: int, seed: int) -> Dict:
    """Draw and save ``count`` images into ``folder``; returns the COCO dict of the split."""
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        num_objects = 0 if (i + 1) % EMPTY_EVERY == 0 else int(rng.integers(1, 7))
        image, objects = draw_image(rng, image_size, num_objects)
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        image.save(os.path.join(folder, file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for category, box, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [round(v, 2) for v in box], "area": area, "iscrowd": 0})
    return {"info": {"description": DESCRIPTION, "version": str(GENERATOR_VERSION)},
            "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}


def generate_synthetic_coco(root: str, num_train: int = 512, num_val: int = 128, image_size: int = 256,
                            seed: int = 0) -> None:
    """Write the synthetic dataset under ``root`` (train2017/, val2017/, annotations/), replacing any there.

    Not safe against a concurrent writer of the same ``root``; ``ensure_synthetic_coco`` is.
    """
    os.makedirs(root, exist_ok=True)
    # build everything in a scratch folder inside root, then move into place: a killed run
    # leaves no half-written split behind the parameters file
    scratch = tempfile.mkdtemp(prefix=".synthetic-", dir=root)
    try:
        os.makedirs(os.path.join(scratch, "annotations"))
        for split, count in (("train", num_train), ("val", num_val)):
            folder = os.path.join(scratch, f"{split}2017")
            os.makedirs(folder)
            coco = _split_images(folder, split, count, image_size, seed)
            with open(os.path.join(scratch, "annotations", f"instances_{split}2017.json"), "w") as f:
                json.dump(coco, f)
        for name in ("train2017", "val2017", "annotations"):
            target = os.path.join(root, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(scratch, name), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- first use

def _params(num_train: int, num_val: int, image_size: int, seed: int) -> Dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "image_size": int(image_size), "seed": int(seed)}


def _stored_params(root: str) -> Optional[Dict]:
    try:
        with open(os.path.join(root, PARAMS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _holds_foreign_data(root: str) -> bool:
    """True when ``root`` has a COCO annotation file this module did not write (never overwrite it)."""
    path = os.path.join(root, "annotations", "instances_train2017.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            head = f.read(512)
    except OSError:
        return False
    return DESCRIPTION not in head


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock on ``path`` across processes (fcntl; a lock-file poll where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: spin on an exclusively created file
        fcntl = None
    if fcntl is not None:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    while True:
        try:
            fd = os.open(path + ".excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(0.2)
    try:
        yield
    finally:
        os.close(fd)
        os.remove(path + ".excl")


def ensure_synthetic_coco(root: str, num_train: int = 512, num_val: int = 128, image_size: int = 256,
                          seed: int = 0, verbose: bool = True) -> bool:
    """Generate the dataset under ``root`` unless it is there with the same parameters.

    Safe when several processes call it at once (the first generates, the others wait and
    reuse). Returns True when this call generated the data.
    """
    wanted = _params(num_train, num_val, image_size, seed)
    if _stored_params(root) == wanted:
        return False
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, ".synthetic.lock")):
        if _stored_params(root) == wanted:  # another process made it while we waited
            return False
        if _stored_params(root) is None and _holds_foreign_data(root):
            raise FileExistsError(f"{root} holds a COCO dataset that is not synthetic; "
                                  "choose another --coco_path for --dataset_file synthetic")
        start = time.time()
        generate_synthetic_coco(root, num_train, num_val, image_size, seed)
        tmp = os.path.join(root, PARAMS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(wanted, f)
        os.replace(tmp, os.path.join(root, PARAMS_FILE))
        if verbose:
            print(f"synthetic dataset: {num_train} train + {num_val} val images of about {image_size} px "
                  f"written to {root} in {time.time() - start:.1f} s", flush=True)
    return True
