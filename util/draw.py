"""Pictures of detections: boxes with class names and scores, encoder references, panels side by side.

The one place boxes are drawn: scripts/predict.py (annotated images), the validation pictures
that training sends to TensorBoard (extras/validation_pictures.py) and scripts/visualize_refs.py all
draw a model's detections with ``prediction_panel`` (ground truth with ``draw_boxes``). Drawing
uses PIL only (no matplotlib), so it is cheap enough to run during training. Line widths and fonts
grow with the image, so a label is readable at the image's own size; images smaller than
``MIN_SIDE`` are enlarged first (a 128-pixel image has no room for text).
"""
import colorsys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 384  # shorter side below which a picture is enlarged before drawing
_GOLDEN = 0.6180339887  # hue step: consecutive class ids land far apart on the colour circle

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the data pipeline's Normalize (datasets.transforms)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- images

def display_array(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) tensor -> (H, W, 3) float array in [0, 1] (undoes the pipeline's Normalize)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    """Normalised (3, H, W) tensor -> RGB PIL image."""
    return Image.fromarray((display_array(image) * 255 + 0.5).astype(np.uint8), "RGB")


def enlarged(image: Image.Image, min_side: int = MIN_SIDE) -> Tuple[Image.Image, float]:
    """(image scaled up so its shorter side is at least ``min_side``, the scale factor); larger images
    are returned as they are with scale 1."""
    short = min(image.size)
    if short >= min_side:
        return image, 1.0
    scale = min_side / short
    size = (int(round(image.width * scale)), int(round(image.height * scale)))
    return image.resize(size, Image.BILINEAR), scale


def side_by_side(panels: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Panels in one row on a white background, tops aligned."""
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    return canvas


# ----------------------------------------------------------------------------- style

def class_colour(label: int) -> Tuple[int, int, int]:
    """A vivid RGB colour per class id; the same id always gets the same colour."""
    r, g, b = colorsys.hsv_to_rgb((int(label) * _GOLDEN) % 1.0, 0.8, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def line_width(image: Image.Image) -> int:
    return max(2, round(min(image.size) / 160))


def font_for(image: Image.Image):
    """A font about 1/26 of the shorter side (at least 11 px); PIL's bitmap font without FreeType."""
    size = max(11, round(min(image.size) / 26))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_colour(background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Black on light colours, white on dark ones (perceived luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def label_text(label: int, score: Optional[float], class_names: Optional[Dict[int, str]]) -> str:
    """'name 0.87' (the id when the class has no name; no score for ground truth)."""
    name = (class_names or {}).get(int(label), str(int(label)))
    return name if score is None else f"{name} {score:.2f}"


# ----------------------------------------------------------------------------- drawing

def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], colour, width: int) -> None:
    x0, y0, x1, y1 = box
    dash = 4 * width
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(int(length // (2 * dash)), 1)
        for i in range(steps + 1):
            t0, t1 = min(2 * i * dash / max(length, 1e-6), 1.0), min((2 * i + 1) * dash / max(length, 1e-6), 1.0)
            if t0 < t1:
                draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                          fill=colour, width=width)


def draw_boxes(image: Image.Image, boxes, labels, scores=None, class_names: Optional[Dict[int, str]] = None,
               dashed: bool = False) -> Image.Image:
    """A copy of ``image`` with boxes and labels drawn on it.

    Args:
        image: RGB PIL image; the boxes are in its pixels.
        boxes: (N, 4) absolute xyxy (tensor, array or nested list).
        labels: (N,) class ids (colour and name).
        scores: (N,) or None (ground truth: names only).
        class_names: {id: name}; ids without a name are written as numbers.
        dashed: dashed outlines (low-confidence boxes shown for lack of better ones).
    Lower-scoring boxes are drawn first, so the best ones stay on top.
    """
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width, font = line_width(out), font_for(out)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    score_list = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    order = range(len(boxes)) if score_list is None else np.argsort(score_list, kind="stable")
    for i in order:
        colour = class_colour(labels[i])
        box = [float(v) for v in boxes[i]]
        if dashed:
            _dashed_rectangle(draw, box, colour, width)
        else:
            draw.rectangle(box, outline=colour, width=width)
        text = label_text(labels[i], None if score_list is None else float(score_list[i]), class_names)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        # above the box, or inside its top edge when the box touches the image top
        x = min(max(box[0], 0), max(out.width - tw, 0))
        y = box[1] - th if box[1] - th >= 0 else max(box[1], 0)
        draw.rectangle([x, y, x + tw, y + th], fill=colour)
        draw.text((x + 2 - left, y + 2 - top), text, fill=_text_colour(colour), font=font)
    return out


def draw_caption(image: Image.Image, text: str) -> Image.Image:
    """A copy with ``text`` in a dark band over the top-left corner (panel titles)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = font_for(out)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.rectangle([0, 0, right - left + 8, bottom - top + 8], fill=(0, 0, 0))
    draw.text((4 - left, 4 - top), text, fill=(255, 255, 255), font=font)
    return out


def draw_references(image: Image.Image, tokens: List[Tuple[float, float, List[Tuple[float, float]]]]
                    ) -> Image.Image:
    """A copy with each token's encoder references: a line from the token to each reference, a dot at
    the reference, a ringed dot at the token; one colour per token.

    tokens: [(x, y, [(ref_x, ref_y), ...])], all normalised to the image (0..1).
    """
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(1, line_width(out) // 2)
    radius = max(3, round(min(w, h) / 90))
    for k, (tx, ty, refs) in enumerate(tokens):
        colour = class_colour(k + 3)  # token colours, not class meaning
        for rx, ry in refs:
            draw.line([(tx * w, ty * h), (rx * w, ry * h)], fill=colour, width=width)
            draw.ellipse([rx * w - radius, ry * h - radius, rx * w + radius, ry * h + radius], fill=colour,
                         outline=(0, 0, 0))
        r = 2 * radius
        draw.ellipse([tx * w - r, ty * h - r, tx * w + r, ty * h + r], fill=colour, outline=(255, 255, 255),
                     width=max(2, width))
    return out


def prediction_panel(picture: Image.Image, scale: float, result: Dict[str, torch.Tensor],
                     class_names: Optional[Dict[int, str]], score_thr: float, fallback: int = 3,
                     caption: bool = True) -> Image.Image:
    """The one picture of a model's detections (predict.py, the validation pictures, visualize_refs).

    Args:
        picture: the image (RGB PIL), ``scale`` times the size the boxes are in (see ``enlarged``).
        result: {'scores' (K,), 'labels' (K,), 'boxes' (K, 4) absolute xyxy} on the CPU, as the
            postprocessor gives them.
        score_thr: detections scoring at least this are drawn (predict.py saves the same ones).
        fallback: when none does, the ``fallback`` best are drawn dashed instead, so that an
            untrained model still shows where it looks; 0: nothing then.
        caption: a band saying what is drawn.
    """
    scores = result["scores"]
    keep = scores >= score_thr
    dashed = fallback > 0 and not bool(keep.any())
    if dashed:
        keep = torch.zeros_like(keep)
        keep[scores.argsort(descending=True)[:fallback]] = True
    drawn = draw_boxes(picture, result["boxes"][keep] * scale, result["labels"][keep], scores[keep], class_names,
                       dashed=dashed)
    if not caption:
        return drawn
    return draw_caption(drawn, f"none >= {score_thr}: top {fallback} dashed" if dashed
                        else f"predictions >= {score_thr}")
