"""Run a trained detector on your images: detections in COCO results format and annotated pictures.

usage: python scripts/predict.py --checkpoint RUN_DIR|CKPT.pth --images PATH [PATH ...] --out DIR
           [--config FILE] [--score_thr 0.3] [--topk N] [--batch_size 4] [--device cuda|cpu] [--amp off|bf16|fp16]

--checkpoint: a run directory (its config.yaml and latest checkpoint, as --auto_resume picks it) or
a checkpoint file (with the config.yaml beside it, else the configuration the checkpoint records).
--config FILE replaces either; an upstream-style checkpoint (Deformable-DETR / H-DETR releases, whose
``args`` is an argparse.Namespace of upstream's flags) needs it, or a config.yaml beside it.
--images: image files, folders (their image files, not recursive) and globs ('data/*/val/*.jpg').
Every image goes through the evaluation transform of the run's configuration, and boxes come back in
the file's own pixels, exactly as ``main.py --eval`` scores them. Writes into --out:

  detections.json   COCO results: [{image_id, file_name, category_id, bbox [x, y, w, h], score}]
                    (image_id: 1-based position of the file among the inputs), scores >= --score_thr
  <name>.png        one annotated picture per readable image: boxes, class names and scores, one
                    colour per class (class names stored with the checkpoint; older ones: class ids)

Unreadable images are skipped, counted and named at the end. A path that does not exist, a folder
without images or a checkpoint that does not fit its configuration is a one-line error (exit 2).
"""
import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.errors import InputError  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="the run's YAML configuration (default: the run directory's config.yaml, else the "
                             "one the checkpoint records); needed for an upstream-style checkpoint")
    parser.add_argument("--images", required=True, nargs="+", help="image files, folders and globs")
    parser.add_argument("--out", required=True, help="folder for detections.json and the annotated images")
    parser.add_argument("--score_thr", type=float, default=0.3,
                        help="detections below this score are neither saved nor drawn")
    parser.add_argument("--topk", type=int, default=None,
                        help="detections per image before the threshold (default: the run's --topk_eval)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (cuda falls back to cpu if absent)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision")
    parser.add_argument("--no_pictures", action="store_true", help="write detections.json only")
    parser.add_argument("--unsafe_trust_checkpoint", default="", metavar="FILE",
                        help="load FILE (the checkpoint) with full pickle, which can run code in it; only for a "
                             "legacy checkpoint you trust that the safe loader refuses")


# ----------------------------------------------------------------------------- inputs

def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _did_you_mean(path: str) -> str:
    """' (did you mean X?)' when the parent folder has one entry whose name starts with the missing name."""
    parent, name = os.path.split(os.path.normpath(path))
    if not name or not os.path.isdir(parent or "."):
        return ""
    close = [n for n in os.listdir(parent or ".") if n.startswith(name) and n != name]
    return f" (did you mean {os.path.join(parent, close[0])}?)" if len(close) == 1 else ""


def collect_images(specs: Sequence[str]) -> List[str]:
    """Files, folders (their image files, sorted) and globs -> image paths in the given order, each once.

    ``InputError`` for a path that does not exist, a glob that matches nothing, a folder without images.
    """
    paths: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, n) for n in os.listdir(spec)
                           if _is_image_name(n) and os.path.isfile(os.path.join(spec, n)))
            if not found:
                raise InputError(f"--images {spec}: the folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(spec):
            found = [spec]
        elif os.path.exists(spec):  # a FIFO, a device such as /dev/zero, a socket: nothing to decode
            raise InputError(f"--images {spec}: not a regular file or a folder")
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise InputError(f"--images {spec}: the pattern matches no files")
        else:
            raise InputError(f"--images {spec}: no such file or folder{_did_you_mean(spec)}")
        paths.extend(found)
    seen = set()  # real paths: a file reached twice (through a link, or a folder and a glob) is read once
    return [p for p in paths if not (os.path.realpath(p) in seen or seen.add(os.path.realpath(p)))]


def read_rgb(path: str):
    """The decoded RGB PIL image, or (None, reason) when the file cannot be read as an image."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here
            return image.convert("RGB"), None
    except Exception as exc:  # any decoder failure means one thing here: skip this file
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- the model

@dataclass
class Predictor:
    """A trained model ready for inference, with what it needs around it."""
    model: torch.nn.Module
    postprocess: torch.nn.Module
    args: argparse.Namespace        # the run's configuration (evaluation transform, classes)
    device: torch.device
    class_names: Dict[int, str]
    checkpoint_path: str


def load_predictor(checkpoint: str, device: str = "cuda", topk: Optional[int] = None, trusted: str = "",
                   config: Optional[str] = None) -> Predictor:
    """The model of ``checkpoint`` (run directory or file) in eval mode on ``device`` (cuda falls back
    to cpu), loaded as every script loads a run (``cli.run_loading``). ``InputError`` when the
    checkpoint cannot be read, does not fit its configuration, or is a control that reads the ground
    truth. ``trusted``: a file the user vouches for (--unsafe_trust_checkpoint), read with full
    pickle. ``config``: a YAML configuration (--config) instead of the run directory's or the
    checkpoint's."""
    from cli.run_loading import load_run
    from models.postprocess import PostProcess

    run = load_run(checkpoint, "--checkpoint", config, ["--device", device], trusted, images_only=True)
    postprocess = PostProcess(topk) if topk is not None else run.postprocessors["bbox"]
    return Predictor(run.model, postprocess, run.config, run.device, run.class_names, run.checkpoint)


# ----------------------------------------------------------------------------- running

@torch.no_grad()
def predict_batch(predictor: Predictor, images: List, amp: str = "off", batch_index: int = 0
                  ) -> List[Dict[str, torch.Tensor]]:
    """RGB PIL images -> per image {'scores' (K,), 'labels' (K,), 'boxes' (K, 4) xyxy in the image's
    pixels}, through the run's evaluation transform, the model and its postprocessor (as evaluation).
    A random ranking (--ref_rank random) draws from (the run's --seed, ``batch_index``)."""
    from datasets.coco import transforms_from_args
    from engine import autocast, outputs_to_float, step_guidance
    from util.nested_tensor import nested_tensor_from_tensor_list
    transform = transforms_from_args("val", predictor.args)
    tensors = [transform(image, None)[0] for image in images]
    samples = nested_tensor_from_tensor_list(tensors).to(predictor.device)
    with autocast(predictor.device, amp):
        outputs = predictor.model(samples, guidance=step_guidance(predictor.args, None, batch_index))
    outputs = outputs_to_float(outputs)
    sizes = torch.tensor([[image.height, image.width] for image in images], device=predictor.device)
    return [{k: v.cpu() for k, v in r.items()} for r in predictor.postprocess(outputs, sizes)]


def annotate(image, result: Dict[str, torch.Tensor], class_names: Dict[int, str], score_thr: float):
    """The image with its detections scoring at least ``score_thr`` drawn (enlarged first when small);
    none drawn when none does."""
    from util import draw
    picture, scale = draw.enlarged(image)
    return draw.prediction_panel(picture, scale, result, class_names, score_thr, fallback=0, caption=False)


def picture_name(path: str, used: set) -> str:
    """'<stem>.png', with '_2', '_3' ... added when two inputs share a stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.png"
    used.add(name)
    return name


def predict(predictor: Predictor, paths: List[str], out_dir: str, score_thr: float = 0.3, batch_size: int = 4,
            amp: str = "off", pictures: bool = True) -> Dict:
    """Detections of every readable image in ``paths``; writes detections.json (and the pictures).

    Returns {'detections': [...], 'skipped': [(path, reason)], 'pictures': [paths], 'images': n}.
    """
    from datasets.coco_eval import to_coco_results
    from util.checkpoint import atomic_write_text
    from util.logger import ProgressBar

    os.makedirs(out_dir, exist_ok=True)
    detections, skipped, written, used = [], [], [], set()
    batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    bar = ProgressBar(len(batches), "Predict", enabled=len(batches) > 1)
    every, start = max(len(batches) // 20, 1), time.time()  # about 20 lines in a log file
    for done, batch in enumerate(batches, 1):
        loaded = []
        for index in batch:
            image, reason = read_rgb(paths[index])
            if image is None:
                skipped.append((paths[index], reason))
            else:
                loaded.append((index, image))
        results = predict_batch(predictor, [image for _, image in loaded], amp, done - 1) if loaded else []
        for (index, image), result in zip(loaded, results):
            for det in to_coco_results(index + 1, result):
                if det["score"] >= score_thr:
                    detections.append({"image_id": det["image_id"], "file_name": paths[index],
                                       **{k: det[k] for k in ("category_id", "bbox", "score")}})
            if pictures:
                written.append(os.path.join(out_dir, picture_name(paths[index], used)))
                annotate(image, result, predictor.class_names, score_thr).save(written[-1])
        bar.tick(done)
        if done % every == 0 or done == len(batches):
            bar.update(done, {"images": str(batch[-1] + 1)}, rate=done / max(time.time() - start, 1e-9))
    bar.close()
    atomic_write_text(os.path.join(out_dir, "detections.json"), json.dumps(detections))
    return {"detections": detections, "skipped": skipped, "pictures": written, "images": len(paths) - len(skipped)}


def check_out_folder(out: str) -> None:
    """``InputError`` when ``--out`` exists but is not a folder (checked before any work)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} exists and is not a folder")


def check_options(opts: argparse.Namespace) -> None:
    check_out_folder(opts.out)
    if opts.batch_size < 1:
        raise InputError(f"--batch_size {opts.batch_size} must be >= 1")
    if opts.topk is not None and opts.topk < 1:
        raise InputError(f"--topk {opts.topk} must be >= 1")
    if not 0.0 <= opts.score_thr <= 1.0:
        raise InputError(f"--score_thr {opts.score_thr} must be in [0, 1]")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    opts = parser.parse_args(argv)
    try:
        from cli.config import check_amp_device
        check_options(opts)
        paths = collect_images(opts.images)
        predictor = load_predictor(opts.checkpoint, opts.device, opts.topk, opts.unsafe_trust_checkpoint,
                                   opts.config)
        check_amp_device(opts.amp, str(predictor.device))
        summary = predict(predictor, paths, opts.out, opts.score_thr, opts.batch_size, opts.amp,
                          pictures=not opts.no_pictures)
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    names = "" if predictor.class_names else " (the checkpoint stores no class names: labels are class ids)"
    print(f"{summary['images']} images, {len(summary['detections'])} detections with score >= {opts.score_thr} "
          f"-> {os.path.join(opts.out, 'detections.json')}; {len(summary['pictures'])} annotated images in "
          f"{opts.out}{names}", flush=True)
    if summary["skipped"]:
        count = len(summary["skipped"])
        print(f"skipped {count} unreadable image{'' if count == 1 else 's'}:", flush=True)
        for path, reason in summary["skipped"]:
            print(f"  {path}: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
