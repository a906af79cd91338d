"""Markdown table of every main.py flag, generated from the parser so the README stays true.

usage:
    python scripts/flags_table.py                 print the table
    python scripts/flags_table.py --write README.md   replace the table between the markers
    python scripts/flags_table.py --check README.md   exit 1 if the README's table is stale
The README holds the table between the lines ``<!-- flags:start -->`` and ``<!-- flags:end -->``.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.config import get_args_parser  # noqa: E402

START, END = "<!-- flags:start -->", "<!-- flags:end -->"

# Descriptions for flags whose parser entry has no help text yet (the parser's text wins when present).
FALLBACK_HELP = {
    "lr": "learning rate of the transformer and heads (AdamW)",
    "lr_backbone_names": "parameter-name substrings trained at --lr_backbone",
    "lr_backbone": "backbone learning rate; 0 freezes the backbone",
    "lr_linear_proj_names": "parameter-name substrings trained at --lr x --lr_linear_proj_mult",
    "lr_linear_proj_mult": "lr multiplier of sampling-offset and reference-point projections",
    "weight_decay": "AdamW weight decay",
    "epochs": "number of training epochs",
    "lr_drop": "StepLR: lr x0.1 every this many epochs",
    "sgd": "SGD with momentum 0.9 instead of AdamW",
    "amp": "mixed precision: bf16 (GPU or CPU), fp16 (GPU, with loss scaling) or off",
    "backbone": "torchvision ResNet",
    "dilation": "dilate the last ResNet stage (stride 16 instead of 32)",
    "position_embedding": "position encoding type",
    "position_embedding_scale": "scale of the normalised sine position encoding",
    "num_feature_levels": "feature levels (strides 8/16/32 and extra stride-64 levels)",
    "enc_layers": "encoder layers",
    "dec_layers": "decoder layers",
    "dim_feedforward": "FFN hidden size",
    "hidden_dim": "transformer width (d_model)",
    "dropout": "dropout in the transformer",
    "nheads": "attention heads",
    "num_queries_one2one": "one-to-one queries (the detections at inference)",
    "num_queries_one2many": "hybrid (H-DETR) one-to-many queries; 0 disables",
    "dec_n_points": "sampling points per head and level in decoder cross-attention",
    "enc_n_points": "sampling points per head and level in encoder self-attention",
    "with_box_refine": "iterative bounding-box refinement",
    "two_stage": "two-stage proposals from the encoder",
    "mixed_selection": "positional queries from proposals, content queries learned (needs --two_stage)",
    "look_forward_twice": "box refinement gradients look forward twice (needs --with_box_refine)",
    "aux_loss": "auxiliary losses on every decoder layer (on unless --no_aux_loss)",
    "set_cost_class": "matching cost weight: classification",
    "set_cost_bbox": "matching cost weight: L1 box",
    "set_cost_giou": "matching cost weight: GIoU",
    "cls_loss_coef": "loss weight: focal classification",
    "bbox_loss_coef": "loss weight: L1 box",
    "giou_loss_coef": "loss weight: GIoU",
    "focal_alpha": "alpha of the sigmoid focal loss",
    "k_one2many": "hybrid: ground truth repeated this many times for the one-to-many queries",
    "lambda_one2many": "hybrid: weight of the one-to-many losses",
    "o2m_matcher_threshold": "mixed (MS-DETR): IoU threshold of the top-k assigner",
    "o2m_matcher_k": "mixed (MS-DETR): predictions assigned per ground-truth box",
    "o2m_cls_loss_coef": "mixed: one-to-many classification loss weight",
    "o2m_bbox_loss_coef": "mixed: one-to-many L1 loss weight",
    "o2m_giou_loss_coef": "mixed: one-to-many GIoU loss weight",
    "topk_eval": "detections kept per image at evaluation",
    "ref_rank": "how candidates are ranked for encoder references: class score, map weight, or both",
    "ref_queries": "candidate queries for encoder references: all or one-to-one only",
    "ref_keep_self": "point 0 keeps the token's own location (v3.0.4)",
    "ref_grad": "keep the gradient of the box centres used as encoder references",
    "enc_ref_progressive": "encoder layers use the previous layer's sampling locations as references",
    "attn_map_accum": "combine the cross-attention maps of the decoder layers run so far",
    "dataset_file": "coco (files under --coco_path) or synthetic (generated there on first use)",
    "coco_path": "dataset root: train2017/, val2017/, annotations/",
    "train_ann": "training annotation file (in annotations/, or a path)",
    "val_ann": "validation annotation file (in annotations/, or a path)",
    "min_size": "training shorter-side sizes (one is drawn per image)",
    "max_size": "longest side after resizing",
    "random_crop": "DETR's random resize-crop augmentation",
    "crop_min_size": "shorter sides before the random crop",
    "crop_size": "min and max side of the random crop",
    "skip_bad_images": "skip unreadable images with a warning instead of stopping",
    "synthetic_num_train": "synthetic dataset: training images",
    "synthetic_num_val": "synthetic dataset: validation images",
    "synthetic_image_size": "synthetic dataset: image side in pixels",
    "synthetic_seed": "synthetic dataset: generator seed",
    "num_workers": "data-loading worker processes per training process",
    "output_dir": "where checkpoints, log.jsonl, config.yaml, detections and TensorBoard go; empty: write nothing",
    "seed": "random seed (each process adds its rank)",
    "start_epoch": "first epoch when not resuming",
    "eval": "evaluate (--resume or --pretrained weights) and exit",
    "tensorboard": "TensorBoard scalars under output_dir/tensorboard",
}


def _default(action: argparse.Action) -> str:
    value = action.default
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, float) and math.isclose(value, 2 * math.pi):
        return "2π"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value) if value != "" else '""'


def _values(action: argparse.Action) -> str:
    """What the flag takes: its choices, a type name, or nothing for a switch."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch (`--no-…` to turn off)"
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return " | ".join(str(c) for c in action.choices)
    kind = getattr(action.type, "__name__", "str") if action.type else "str"
    if action.nargs in ("+", "*"):
        return f"{kind} list"
    if isinstance(action.nargs, int):
        return f"{action.nargs} × {kind}"
    return kind


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flags_table() -> str:
    """One table per argument group, in the parser's order."""
    parser = get_args_parser()
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = {"positional arguments": "general", "options": "general"}.get(group.title, group.title)
        lines += [f"**{title}**", "", "| flag | values | default | description |", "|---|---|---|---|"]
        for action in actions:
            names = ", ".join(f"`{s}`" for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse.BooleanOptionalAction):
                names = ", ".join(f"`{s}`" for s in action.option_strings if not s.startswith("--no-"))
            lines.append(f"| {names} | {_escape(_values(action))} | {_escape(_default(action))} | "
                         f"{_escape(action.help or FALLBACK_HELP.get(action.dest, ''))} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="README", help="replace the table in this file")
    parser.add_argument("--check", metavar="README", help="exit 1 if this file's table is stale")
    opts = parser.parse_args()
    table = flags_table()
    if opts.write:
        with open(opts.write) as f:
            text = f.read()
        with open(opts.write, "w") as f:
            f.write(replace_block(text, table))
        return 0
    if opts.check:
        with open(opts.check) as f:
            text = f.read()
        if replace_block(text, table) != text:
            print(f"{opts.check}: the flags table is stale; run python scripts/flags_table.py --write {opts.check}",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
