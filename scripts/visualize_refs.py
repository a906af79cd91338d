"""Look at what guides the encoder: predictions, the decoder's cross-attention map, encoder references.

usage: python scripts/visualize_refs.py --config configs/v3.0.4.yaml [--resume ckpt.pth]
           --image PATH|synthetic[:N] --out DIR [--tokens 4] [--score_thresh 0.3] [any main.py flag]

Writes into DIR:
  predictions.png    the image with the top predictions of the last decoder layer
  attn_map.png       the cross-attention map of one decoder layer (default the last), one heat map
                     per feature level, summed over queries (``--map_queries top``: the top-scoring only)
  refs_token_K.png   for each chosen token, the reference points every encoder layer received,
                     drawn as arrows from the token to each reference, one colour per point
Nothing in the model is changed: decoder cross-attention and encoder inputs are recorded with
hooks (models/recording.py). Without ``--resume`` the model is randomly initialised, which still shows the mechanics.
``synthetic:N`` takes image N of the synthetic validation set (``--dataset_file synthetic``).
"""
import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ops  # noqa: E402
from cli.config import parse_args, resolve_device  # noqa: E402
from models.record_views import (choose_tokens, level_shapes, reference_entries, token_map,  # noqa: E402,F401
                                 token_position, top_queries)
from models.recording import ForwardRecord, run_recorded  # noqa: E402
from util import draw  # noqa: E402
from util.errors import InputError  # noqa: E402


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
    args.device = resolve_device(args.device)
    ops.check_impl(args.device)  # MSDA_IMPL against the device: one line now, not a traceback later
    return args


def load_model(args):
    """(model in eval mode on args.device, postprocessors); weights from --resume/--pretrained if given."""
    from models import build_model
    from models.weights import load_pretrained
    from util.checkpoint import load_checkpoint
    torch.manual_seed(args.seed)  # a random-init picture is reproducible
    model, _, postprocessors = build_model(args)
    weights = args.resume or args.pretrained
    if weights:
        flag = "--resume" if args.resume else "--pretrained"
        trusted = bool(args.unsafe_trust_checkpoint) and (os.path.realpath(args.unsafe_trust_checkpoint)
                                                          == os.path.realpath(weights))
        load_pretrained(model, weights, loaded=load_checkpoint(weights, trusted=trusted, flag=flag))
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
    try:
        image = Image.open(spec).convert("RGB")
    except OSError as exc:  # missing, unreadable or not an image
        raise InputError(f"--image {spec}: cannot read it as an image ({exc})") from None
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
    return synthetic_sample(args, index)[0]


def synthetic_sample(args, index: int) -> Tuple[torch.Tensor, Dict]:
    """(image, target) ``index`` of the synthetic validation split, as the evaluation pipeline yields them."""
    from datasets import build_dataset
    dataset = build_dataset("val", args)
    image, target = dataset[index]
    return (image.tensors[0] if hasattr(image, "tensors") else image), target


def load_target(spec: str, args) -> Optional[Dict]:
    """The ground truth of ``--image`` (synthetic images have it, files do not) when the model's guidance
    reads it (the oracle source); else None. ValueError (one line) when it is needed and absent."""
    from models.guidance import guidance_needs
    if not guidance_needs(args)[0]:
        return None
    if not spec.startswith("synthetic"):
        raise ValueError(f"--ref_source {args.ref_source} reads the image's ground-truth boxes: use --image "
                         "synthetic[:N] (an image file has none)")
    return synthetic_sample(args, int(spec.split(":", 1)[1]) if ":" in spec else 0)[1]


def display_image(tensor: torch.Tensor):
    """Normalised (3, H, W) -> (H, W, 3) array in [0, 1] for matplotlib (undoes the data pipeline's Normalize)."""
    return draw.display_array(tensor)


# ----------------------------------------------------------------------------- recording

def run_model(model, image: torch.Tensor, device, args=None, target: Optional[Dict] = None
              ) -> Tuple[Dict, ForwardRecord]:
    """One recorded inference pass on one image; returns (outputs, record). ``args``, ``target``: what
    the model's guidance reads beyond the image (the ground truth, a seed), if anything."""
    from engine import step_guidance
    guidance = step_guidance(args, None if target is None else [target], 0)
    return run_recorded(model, [image.to(device)], guidance=guidance)


# ----------------------------------------------------------------------------- drawing

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def draw_predictions(image: torch.Tensor, outputs: Dict, postprocessors, score_thresh: float, path: str,
                     fallback: int = 5, class_names: Optional[Dict[int, str]] = None) -> int:
    """Boxes above ``score_thresh`` (util.draw); when none pass (e.g. random init), the top ``fallback``
    dashed. Returns the number of boxes drawn."""
    h, w = image.shape[-2:]
    result = postprocessors["bbox"](outputs, torch.tensor([[h, w]], device=outputs["pred_logits"].device))[0]
    result = {k: v.cpu() for k, v in result.items()}
    keep = result["scores"] > score_thresh
    dashed = not bool(keep.any())
    if dashed:
        keep = torch.arange(len(result["scores"])) < fallback
    picture, scale = draw.enlarged(draw.to_pil(image))
    picture = draw.draw_boxes(picture, result["boxes"][keep] * scale, result["labels"][keep],
                              result["scores"][keep], class_names, dashed=dashed)
    title = f"predictions > {score_thresh}" if not dashed else f"none > {score_thresh}; top {fallback} dashed"
    draw.draw_caption(picture, title).save(path)
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
              postprocessors=None, target: Optional[Dict] = None) -> List[str]:
    """Run the model on ``image`` (normalised (3, H, W)) and write the PNGs; returns their paths.
    ``target``: the image's ground truth, for a model whose guidance reads it (``load_target``)."""
    if model is None:
        model, postprocessors = load_model(args)
    os.makedirs(out_dir, exist_ok=True)
    outputs, record = run_model(model, image, args.device, args, target)
    shapes = level_shapes(record)
    written = [os.path.join(out_dir, "predictions.png")]
    draw_predictions(image, outputs, postprocessors, score_thresh, written[-1])

    queries = top_queries(outputs, 10) if map_queries == "top" else None
    weights = token_map(record, map_layer, queries)
    layer_no = map_layer % len(record.decoder)
    written.append(os.path.join(out_dir, "attn_map.png"))
    draw_attention_map(image, weights, shapes, written[-1],
                       f"decoder layer {layer_no} cross-attention map ({map_queries} queries)")

    for k, token in enumerate(token_ids or choose_tokens(weights, shapes, tokens)):
        written.append(os.path.join(out_dir, f"refs_token_{k}.png"))
        draw_token_references(image, record.encoder_references, token, shapes, written[-1])
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    own, main_argv = parser.parse_known_args(argv)
    try:
        args = build_args(main_argv)
        target = load_target(own.image, args)
        image = load_image(own.image, args, resize=own.resize)
        paths = visualize(args, image, own.out, tokens=own.tokens, token_ids=own.token_ids,
                          score_thresh=own.score_thresh, map_layer=own.map_layer, map_queries=own.map_queries,
                          target=target)
    except (InputError, ValueError, FileNotFoundError) as exc:  # bad input: one line (exit 2), as main.py
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
