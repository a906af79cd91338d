"""Look at what guides the encoder: predictions, the decoder's cross-attention map, encoder references.

usage: python scripts/visualize_refs.py --config configs/v3.0.4.yaml [--resume ckpt.pth]
           --image PATH|synthetic[:N] --out DIR [--tokens 4] [--score_thresh 0.3] [any main.py flag]

Writes into DIR:
  predictions.png    the image with the top predictions of the last decoder layer
  attn_map.png       the cross-attention map of one decoder layer (default the last), one heat map
                     per feature level, summed over queries (``--map_queries top``: the top-scoring only)
  refs_token_K.png   for each chosen token, the reference points every encoder layer received,
                     drawn as arrows from the token to each reference, one colour per point
Nothing in the model is changed: decoder cross-attention and encoder inputs are captured with
hooks. Without ``--resume`` the model is randomly initialised, which still shows the mechanics.
``synthetic:N`` takes image N of the synthetic validation set (``--dataset_file synthetic``).
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli.config import parse_args  # noqa: E402



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The script's own flags; the rest are main.py flags (model configuration, --resume, --device)."""
    parser.add_argument("--image", required=True, help="image file, or synthetic[:N] for the synthetic val set")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    parser.add_argument("--tokens", type=int, default=4, help="tokens whose references are drawn")
    parser.add_argument("--token_ids", type=int, nargs="+", default=None,
                        help="flattened token indices to draw instead of the highest-map-weight ones")
    parser.add_argument("--score_thresh", type=float, default=0.3, help="predictions drawn above this score")
    parser.add_argument("--map_layer", type=int, default=-1, help="decoder layer whose map is drawn")
    parser.add_argument("--map_queries", choices=["all", "top"], default="all",
                        help="sum the map over all queries or only the top-scoring ones")
    parser.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                        help="pass a file image through the evaluation transform (eval_size, max_size)")


# ----------------------------------------------------------------------------- model and input

def build_args(main_argv: Sequence[str]) -> argparse.Namespace:
    """main.py flags -> validated args with num_classes set and a device that exists here."""
    args = parse_args(list(main_argv))
    if args.num_classes is None:
        try:
            from datasets import num_classes
            args.num_classes = int(num_classes(args))
        except (ImportError, AttributeError, FileNotFoundError):
            args.num_classes = 91  # COCO's id range
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        args.device = "cpu"
    return args


def load_model(args):
    """(model in eval mode on args.device, postprocessors); weights from --resume/--pretrained if given."""
    from models import build_model
    from models.weights import load_pretrained
    torch.manual_seed(args.seed)  # a random-init picture is reproducible
    model, _, postprocessors = build_model(args)
    weights = args.resume or args.pretrained
    if weights:
        load_pretrained(model, weights)
    return model.to(args.device).eval(), postprocessors


def load_image(spec: str, args, resize: bool = True) -> torch.Tensor:
    """A normalised (3, H, W) float tensor from a file or from the synthetic validation set.

    A file goes through the dataset's own evaluation transform for ``args`` (the one
    ``build_dataset('val', args)`` uses: eval_size, max_size), so the picture shows the input
    size evaluation sees; ``resize=False`` keeps the file's size and only normalises it.
    """
    if spec.startswith("synthetic"):
        return synthetic_image(args, int(spec.split(":", 1)[1]) if ":" in spec else 0)
    from PIL import Image
    image = Image.open(spec).convert("RGB")
    tensor, _ = image_transform(args, resize)(image, None)
    return tensor


def image_transform(args, resize: bool = True):
    """The evaluation pipeline of the data code: (PIL image, target) -> (normalised tensor, target)."""
    from datasets import transforms as T
    from datasets.coco import transforms_from_args
    if resize:
        return transforms_from_args("val", args)
    return T.Compose([T.ToTensor(), T.Normalize()])


def synthetic_image(args, index: int) -> torch.Tensor:
    """Image ``index`` of the synthetic validation split, as the evaluation pipeline yields it."""
    from datasets import build_dataset
    dataset = build_dataset("val", args)
    image = dataset[index][0]
    return image.tensors[0] if hasattr(image, "tensors") else image


def display_image(tensor: torch.Tensor):
    """Normalised (3, H, W) -> (H, W, 3) array in [0, 1] for matplotlib (undoes the data pipeline's Normalize)."""
    from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- capture

def _arg(args: tuple, kwargs: dict, index: int, name: str):
    """A forward argument that may have been passed positionally or by keyword."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


@dataclass
class Capture:
    """What the hooks saw during one forward pass."""
    encoder_refs: List[torch.Tensor] = field(default_factory=list)       # per encoder layer, as received
    decoder_sampling: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (locs, weights)
    spatial_shapes: Optional[torch.Tensor] = None
    level_start_index: Optional[torch.Tensor] = None
    padding_mask: Optional[torch.Tensor] = None
    handles: list = field(default_factory=list)

    def attach(self, model) -> "Capture":
        """Hook every encoder layer's input and every decoder layer's cross-attention."""
        transformer = model.transformer
        for layer in transformer.encoder.layers:
            self.handles.append(layer.register_forward_pre_hook(self._on_encoder, with_kwargs=True))
        for layer in transformer.decoder.layers:
            self.handles.append(layer.cross_attn.register_forward_hook(self._on_cross_attn, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_encoder(self, module, args, kwargs):
        # DeformableEncoderLayer.forward(src, pos, reference_points, layout)
        self.encoder_refs.append(_arg(args, kwargs, 2, "reference_points").detach())
        return None

    def _on_cross_attn(self, module, args, kwargs, output):
        # MSDeformAttn.forward(query, reference_points, input_flatten, layout) -> MSDeformAttnOutput
        self.decoder_sampling.append((output.sampling_locations.detach(), output.attention_weights.detach()))
        layout = _arg(args, kwargs, 3, "layout")
        self.spatial_shapes = layout.spatial_shapes
        self.level_start_index = layout.level_start_index
        self.padding_mask = layout.padding_mask
        return None


def run_model(model, image: torch.Tensor, device) -> Tuple[Dict, Capture]:
    """One inference pass on one image with the hooks attached; returns (outputs, capture)."""
    capture = Capture().attach(model)
    try:
        with torch.no_grad():
            outputs = model([image.to(device)])
    finally:
        capture.detach()
    return outputs, capture


# ----------------------------------------------------------------------------- analysis

def level_shapes(capture: Capture) -> List[Tuple[int, int]]:
    return [tuple(int(v) for v in hw) for hw in capture.spatial_shapes.tolist()]


def token_map(capture: Capture, layer: int = -1, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-attention map of decoder ``layer`` for image 0, summed over (the given) queries: (T,)."""
    from models.cross_attn_map import cross_attention_map
    locations, weights = capture.decoder_sampling[layer]
    dense = cross_attention_map(locations.float(), weights.float(), capture.spatial_shapes,
                                capture.level_start_index, capture.padding_mask)  # (bs, T, Q)
    dense = dense[0]
    if queries is not None:
        dense = dense[:, queries]
    return dense.sum(-1).cpu()


def top_queries(outputs: Dict, count: int) -> torch.Tensor:
    """Indices of the ``count`` one-to-one queries with the highest class score (image 0)."""
    scores = outputs["pred_logits"][0].sigmoid().max(-1).values
    return scores.topk(min(count, scores.numel())).indices.cpu()


def token_position(token: int, shapes: List[Tuple[int, int]]) -> Tuple[int, float, float]:
    """Flattened token index -> (level, x, y) of its centre, normalised to the padded input."""
    start = 0
    for level, (h, w) in enumerate(shapes):
        if token < start + h * w:
            row, col = divmod(token - start, w)
            return level, (col + 0.5) / w, (row + 0.5) / h
        start += h * w
    raise IndexError(f"token {token} is outside the {start} tokens of the feature levels")


def choose_tokens(weights: torch.Tensor, shapes: List[Tuple[int, int]], count: int,
                  min_separation: float = 0.08) -> List[int]:
    """High-map-weight tokens, taken from the levels in turn (finest first).

    Coarse tokens cover more image and so collect more weight; ranking all levels together would
    pick only them. A token closer than ``min_separation`` (normalised) to one already chosen is
    skipped: neighbouring tokens of one object would show the same picture.
    """
    ranked, start = [], 0
    for h, w in shapes:
        order = torch.argsort(weights[start:start + h * w], descending=True) + start
        ranked.append(order.tolist())
        start += h * w
    chosen: List[int] = []
    places: List[Tuple[float, float]] = []
    cursors = [0] * len(shapes)
    while len(chosen) < count and any(c < len(r) for c, r in zip(cursors, ranked)):
        for level, order in enumerate(ranked):
            while cursors[level] < len(order) and len(chosen) < count:
                token = order[cursors[level]]
                cursors[level] += 1
                _, x, y = token_position(token, shapes)
                if all(math.hypot(x - px, y - py) >= min_separation for px, py in places):
                    chosen.append(token)
                    places.append((x, y))
                    break
    return chosen


def reference_entries(refs: torch.Tensor, token: int) -> List[Tuple[float, float, int, str]]:
    """References one token received -> [(x, y, colour index, label)], normalised, duplicates dropped.

    Accepted shapes (batch first): (bs, T, L, 2) and (bs, T, L, 4) colour by level, as every level
    has its own reference there; (bs, T, L, P, 2) and (bs, T, H, L, P, 2) colour by sampling point.
    """
    per_token = refs[0, token].float().cpu()
    if per_token.dim() == 2:                        # (L, 2|4): one reference (box centre) per level
        items = [(per_token[l, 0], per_token[l, 1], l, f"level {l}") for l in range(per_token.shape[0])]
    elif per_token.dim() in (3, 4) and per_token.shape[-1] == 2:   # (L, P, 2) or (H, L, P, 2)
        points = per_token.reshape(-1, per_token.shape[-2], 2)    # (L or H*L, P, 2)
        items = [(points[i, p, 0], points[i, p, 1], p, f"point {p}")
                 for i in range(points.shape[0]) for p in range(points.shape[1])]
    else:
        raise ValueError(f"unsupported encoder reference shape {tuple(refs.shape)}")
    seen, entries = set(), []
    for x, y, colour, label in items:
        key = (round(float(x), 4), round(float(y), 4), colour)
        if key not in seen:
            seen.add(key)
            entries.append((float(x), float(y), colour, label))
    return entries


# ----------------------------------------------------------------------------- drawing

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def draw_predictions(image: torch.Tensor, outputs: Dict, postprocessors, score_thresh: float, path: str,
                     fallback: int = 5) -> int:
    """Boxes above ``score_thresh``; when none pass (e.g. random init), the top ``fallback`` dashed."""
    plt = _pyplot()
    h, w = image.shape[-2:]
    result = postprocessors["bbox"](outputs, torch.tensor([[h, w]], device=outputs["pred_logits"].device))[0]
    keep = result["scores"] > score_thresh
    dashed = not bool(keep.any())
    if dashed:
        keep = torch.arange(len(result["scores"])) < fallback
    fig, ax = plt.subplots(figsize=(8, 8 * h / w))
    ax.imshow(display_image(image))
    for (x0, y0, x1, y1), score, label in zip(result["boxes"][keep].tolist(), result["scores"][keep].tolist(),
                                              result["labels"][keep].tolist()):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5,
                                   ls="--" if dashed else "-"))
        ax.text(x0, y0, f"{label}: {score:.2f}", color="black", fontsize=7,
                bbox=dict(facecolor="lime", alpha=0.7, pad=1, lw=0))
    title = f"predictions > {score_thresh}" if not dashed else f"none > {score_thresh}; top {fallback} dashed"
    ax.set_title(title)
    ax.axis("off")
    _save(fig, path)
    return int(keep.sum())


def draw_attention_map(image: torch.Tensor, weights: torch.Tensor, shapes: List[Tuple[int, int]], path: str,
                       title: str) -> None:
    """One heat map per level over the (dimmed) image; each level has its own colour scale."""
    plt = _pyplot()
    h, w = image.shape[-2:]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 4 * h / w + 0.6), squeeze=False)
    start = 0
    for level, ((lh, lw), ax) in enumerate(zip(shapes, axes[0])):
        heat = weights[start:start + lh * lw].view(lh, lw).numpy()
        start += lh * lw
        ax.imshow(display_image(image), alpha=0.5)
        # extent spreads the level's grid over the whole input, as its normalised coordinates do
        shown = ax.imshow(heat, cmap="inferno", alpha=0.7, extent=(0, w, h, 0), interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(f"level {level} ({lh}x{lw}), sum {heat.sum():.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    _save(fig, path)


def draw_token_references(image: torch.Tensor, encoder_refs: List[torch.Tensor], token: int,
                          shapes: List[Tuple[int, int]], path: str) -> None:
    """One panel per encoder layer: arrows from the token to each reference, one colour per point."""
    plt = _pyplot()
    h, w = image.shape[-2:]
    level, tx, ty = token_position(token, shapes)
    cols = min(3, len(encoder_refs))
    rows = math.ceil(len(encoder_refs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows * h / w + 0.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for layer, ax in enumerate(axes.flat):
        if layer >= len(encoder_refs):
            ax.axis("off")
            continue
        ax.imshow(display_image(image), alpha=0.6)
        ax.plot(tx * w, ty * h, marker="*", color="white", markeredgecolor="black", markersize=14)
        refs = encoder_refs[layer]
        labelled = set()
        for x, y, colour, label in reference_entries(refs, token):
            c = colours(colour % 10)
            ax.annotate("", xy=(x * w, y * h), xytext=(tx * w, ty * h),
                        arrowprops=dict(arrowstyle="->", color=c, lw=1.2, alpha=0.8))
            # a marker too, so a reference at the token itself (zero-length arrow) stays visible
            ax.scatter([x * w], [y * h], color=[c], s=14, label=None if label in labelled else label, zorder=3)
            labelled.add(label)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"encoder layer {layer}: refs {tuple(refs.shape[2:])}", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
        ax.axis("off")
    fig.suptitle(f"token {token} (level {level})")
    _save(fig, path)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- driver

def visualize(args, image: torch.Tensor, out_dir: str, tokens: int = 4, token_ids: Optional[List[int]] = None,
              score_thresh: float = 0.3, map_layer: int = -1, map_queries: str = "all", model=None,
              postprocessors=None) -> List[str]:
    """Run the model on ``image`` (normalised (3, H, W)) and write the PNGs; returns their paths."""
    if model is None:
        model, postprocessors = load_model(args)
    os.makedirs(out_dir, exist_ok=True)
    outputs, capture = run_model(model, image, args.device)
    shapes = level_shapes(capture)
    written = [os.path.join(out_dir, "predictions.png")]
    draw_predictions(image, outputs, postprocessors, score_thresh, written[-1])

    queries = top_queries(outputs, 10) if map_queries == "top" else None
    weights = token_map(capture, map_layer, queries)
    layer_no = map_layer % len(capture.decoder_sampling)
    written.append(os.path.join(out_dir, "attn_map.png"))
    draw_attention_map(image, weights, shapes, written[-1],
                       f"decoder layer {layer_no} cross-attention map ({map_queries} queries)")

    for k, token in enumerate(token_ids or choose_tokens(weights, shapes, tokens)):
        written.append(os.path.join(out_dir, f"refs_token_{k}.png"))
        draw_token_references(image, capture.encoder_refs, token, shapes, written[-1])
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    own, main_argv = parser.parse_known_args(argv)
    args = build_args(main_argv)
    image = load_image(own.image, args, resize=own.resize)
    paths = visualize(args, image, own.out, tokens=own.tokens, token_ids=own.token_ids,
                      score_thresh=own.score_thresh, map_layer=own.map_layer, map_queries=own.map_queries)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
