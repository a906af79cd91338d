"""Look at what guides the encoder: predictions, the decoder's cross-attention map, encoder references.

usage: python scripts/visualize_refs.py [--resume CKPT|RUN_DIR] [--config FILE]
           --image PATH|synthetic[:N] --out DIR [--tokens 4] [--score_thresh 0.3] [any main.py flag]

Writes into DIR:
  predictions.png    the image with the top predictions of the last decoder layer
  attn_map.png       the cross-attention map of one decoder layer (default the last), one heat map
                     per feature level, summed over queries (``--map_queries top``: the top-scoring only)
  refs_token_K.png   for each chosen token, the reference points every encoder layer received,
                     drawn as arrows from the token to each reference, one colour per point
Nothing in the model is changed: decoder cross-attention and encoder inputs are recorded with
hooks (models/recording.py). ``--resume CKPT`` (a checkpoint file or a run directory) is loaded as
every script loads a run (``cli/run_loading.py``): its configuration is ``--config`` when given,
else its run directory's config.yaml, else the one it records, the other main.py flags over it;
the weights must fit exactly (a checkpoint drawn partly random would show nothing true). Without
``--resume`` the model is randomly initialised from ``--seed`` (the flags' configuration; the class
count from ``--num_classes`` or the dataset), which still shows the mechanics. ``synthetic:N`` takes
image N of the synthetic validation set (``--dataset_file synthetic``); a model whose guidance reads
the ground truth (the oracle control) runs on those only.
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

from cli.run_loading import (LoadedRun, build_loaded_run, load_run, random_init_configuration,  # noqa: E402
                              refuse_ground_truth_guidance)
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
    parser.add_argument("--score_thresh", type=float, default=0.3, help="predictions scoring at least this are drawn")
    parser.add_argument("--map_layer", type=int, default=-1, help="decoder layer whose map is drawn")
    parser.add_argument("--map_queries", choices=["all", "top"], default="all",
                        help="sum the map over all queries or only the top-scoring ones")
    parser.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                        help="pass a file image through the evaluation transform (eval_size, max_size)")


# ----------------------------------------------------------------------------- model and input

def load_model(main_argv: Sequence[str]) -> LoadedRun:
    """The model to draw, in eval mode on its device: the checkpoint ``--resume`` names (see the
    module's docstring), else a random initialisation of the flags' configuration."""
    starts = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, default in (("--resume", ""), ("--pretrained", ""), ("--config", None),
                          ("--unsafe_trust_checkpoint", "")):
        starts.add_argument(flag, default=default)
    given, flags = starts.parse_known_args(list(main_argv))
    if given.pretrained:
        raise InputError(f"--pretrained {given.pretrained}: name the checkpoint to draw with --resume (its weights "
                         "must fit the model exactly; --pretrained would load what fits and leave the rest random)")
    if given.resume:
        return load_run(given.resume, "--resume", given.config, flags, given.unsafe_trust_checkpoint)
    config = random_init_configuration((["--config", given.config] if given.config else []) + flags)
    return build_loaded_run(config, seed=config.seed)  # a random-init picture is reproducible


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
    reads it (the oracle source); else None. InputError (one line) when it is needed and absent."""
    from models.guidance import guidance_needs
    if not guidance_needs(args)[0]:
        return None
    if not spec.startswith("synthetic"):
        refuse_ground_truth_guidance(args, f"--image {spec}", "use --image synthetic[:N], whose ground truth it reads")
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
                     fallback: int = 5, class_names: Optional[Dict[int, str]] = None) -> None:
    """The prediction panel (``util.draw.prediction_panel``: boxes scoring at least ``score_thresh``;
    when none does, e.g. at random init, the top ``fallback`` dashed) of ``image`` (normalised (3, H, W))."""
    h, w = image.shape[-2:]
    result = postprocessors["bbox"](outputs, torch.tensor([[h, w]], device=outputs["pred_logits"].device))[0]
    result = {k: v.cpu() for k, v in result.items()}
    picture, scale = draw.enlarged(draw.to_pil(image))
    draw.prediction_panel(picture, scale, result, class_names, score_thresh, fallback).save(path)


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

def visualize(run: LoadedRun, image: torch.Tensor, out_dir: str, tokens: int = 4,
              token_ids: Optional[List[int]] = None, score_thresh: float = 0.3, map_layer: int = -1,
              map_queries: str = "all", target: Optional[Dict] = None) -> List[str]:
    """Run the model of ``run`` (``load_model``) on ``image`` (normalised (3, H, W)) and write the PNGs;
    returns their paths. ``target``: the image's ground truth, for a model whose guidance reads it
    (``load_target``)."""
    os.makedirs(out_dir, exist_ok=True)
    outputs, record = run_model(run.model, image, run.device, run.config, target)
    shapes = level_shapes(record)
    written = [os.path.join(out_dir, "predictions.png")]
    draw_predictions(image, outputs, run.postprocessors, score_thresh, written[-1], class_names=run.class_names)

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
        run = load_model(main_argv)
        target = load_target(own.image, run.config)
        image = load_image(own.image, run.config, resize=own.resize)
        paths = visualize(run, image, own.out, tokens=own.tokens, token_ids=own.token_ids,
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
