"""Command-line flags, YAML config files, variant presets and the one place that validates them.

Precedence, lowest first: parser defaults < variant preset (``configs/variants.yaml``) <
``--config FILE`` (and the files it names in ``_base_``) < flags on the command line.
YAML keys are flag names; values are type-checked by the same parser as the command line.
"""
import argparse
import functools
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from datasets.coco import resolve_ann_file
from models.research_settings import (ACCUM_MODES, ENC_REF_MODES, REF_QUERY_SETS, REF_RANKS, REF_SOURCES,
                                      check_research_settings, guidance_control, reads_decoder_queries)
from models.backbone import tokens_of_square_image
from models.stages import expand_stages, guided_encoder_layers, parse_stages
from cli.roles import (EVALUATION, MODEL, ROLE_MEANING, RUN, SCHEDULE, START, TRAINING, flag_roles,
                       group_by_role, with_roles)
from util.checkpoint import atomic_write_text

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
VARIANTS_FILE = os.path.join(CONFIG_DIR, "variants.yaml")

BOOL = argparse.BooleanOptionalAction
# probe images of the reference diagnostics when unset; their cost: docs/research.md "Reference diagnostics"
DIAG_IMAGES_DEFAULT = 0


def get_args_parser() -> argparse.ArgumentParser:
    """All flags of training, evaluation, the model and the research variants (upstream names)."""
    p = argparse.ArgumentParser("Deformable DETR with cross-attention-guided encoder references", add_help=True)
    top = with_roles(p)
    top.add_argument("--config", role=START, default=None, type=str, help="YAML file whose keys are flag names")
    top.add_argument("--variant", role=EVALUATION, default=None, type=str,
                     help="preset from configs/variants.yaml: baseline|cascade|v3.0.1|v3.0.2|v3.0.3|v3.0.4|"
                          "v3.0.2_upstream_eval|v3.0.4_upstream_eval; controls: v3.0.4_gt|v3.0.4_gt_distance "
                          "(oracle: references from ground-truth boxes)|v3.0.4_random (candidates drawn at random)")

    g = with_roles(p.add_argument_group("optimisation"))
    g.add_argument("--lr", role=SCHEDULE, default=2e-4, type=float,
                   help="learning rate of the transformer and heads (AdamW)")
    g.add_argument("--lr_backbone_names", role=SCHEDULE, default=["backbone.0"], type=str, nargs="+",
                   help="parameter-name substrings trained at --lr_backbone")
    g.add_argument("--lr_backbone", role=SCHEDULE, default=2e-5, type=float,
                   help="backbone learning rate; 0 freezes the backbone")
    g.add_argument("--lr_linear_proj_names", role=SCHEDULE, default=["reference_points", "sampling_offsets"],
                   type=str, nargs="+", help="parameter-name substrings trained at --lr x --lr_linear_proj_mult")
    g.add_argument("--lr_linear_proj_mult", role=SCHEDULE, default=0.1, type=float,
                   help="lr multiplier of sampling-offset and reference-point projections")
    g.add_argument("--batch_size", role=RUN, default=2, type=int, help="per process")
    g.add_argument("--weight_decay", role=SCHEDULE, default=1e-4, type=float, help="AdamW weight decay")
    g.add_argument("--epochs", role=RUN, default=50, type=int, help="number of training epochs")
    g.add_argument("--lr_drop", role=SCHEDULE, default=40, type=int, help="StepLR: lr x0.1 every this many epochs")
    g.add_argument("--lr_drop_epochs", role=SCHEDULE, default=None, type=int, nargs="+",
                   help="multi-step drops; overrides --lr_drop")
    g.add_argument("--clip_max_norm", role=SCHEDULE, default=0.1, type=float, help="0 disables clipping")
    g.add_argument("--sgd", role=SCHEDULE, action="store_true", help="SGD with momentum 0.9 instead of AdamW")
    g.add_argument("--amp", role=RUN, default="off", choices=["off", "bf16", "fp16"],
                   help="mixed precision: bf16 (GPU or CPU), fp16 (GPU, with loss scaling) or off")

    g = with_roles(p.add_argument_group("backbone"))
    g.add_argument("--backbone", role=MODEL, default="resnet50",
                   choices=["resnet18", "resnet34", "resnet50", "resnet101"], help="torchvision ResNet")
    g.add_argument("--backbone_weights", role=RUN, default=None, type=str,
                   help="ImageNet weights file; 'none' for random init; unset: torchvision's cache")
    g.add_argument("--backbone_norm", role=MODEL, default="frozen_bn", choices=["frozen_bn", "bn"],
                   help="backbone BatchNorm: frozen (ImageNet statistics, upstream) or trained (for random init)")
    g.add_argument("--dilation", role=MODEL, action=BOOL, default=False,
                   help="dilate the last ResNet stage (stride 16 instead of 32)")
    g.add_argument("--position_embedding", role=MODEL, default="sine", choices=["sine"],
                   help="position encoding type")
    g.add_argument("--position_embedding_scale", role=MODEL, default=2 * math.pi, type=float,
                   help="scale of the normalised sine position encoding")
    g.add_argument("--num_feature_levels", role=MODEL, default=4, type=int,
                   help="feature levels (strides 8/16/32 and extra stride-64 levels)")

    g = with_roles(p.add_argument_group("transformer"))
    g.add_argument("--enc_layers", role=MODEL, default=6, type=int, help="encoder layers")
    g.add_argument("--dec_layers", role=MODEL, default=6, type=int, help="decoder layers")
    g.add_argument("--stages", role=MODEL, default=None, type=str,
                   help="comma-separated E:D stages, e.g. '6:6' (stock) or '1:1,1:1,1:1,1:1,1:1,1:1'; "
                        "'stock' and 'cascade' name those two for any depth (unset: stock)")
    g.add_argument("--dim_feedforward", role=MODEL, default=1024, type=int, help="FFN hidden size")
    g.add_argument("--hidden_dim", role=MODEL, default=256, type=int, help="transformer width (d_model)")
    g.add_argument("--dropout", role=TRAINING, default=0.1, type=float, help="dropout in the transformer")
    g.add_argument("--nheads", role=MODEL, default=8, type=int, help="attention heads")
    g.add_argument("--num_queries_one2one", "--num_queries", role=MODEL, dest="num_queries_one2one",
                   default=300, type=int, help="one-to-one queries (the detections at inference)")
    g.add_argument("--num_queries_one2many", role=MODEL, default=0, type=int,
                   help="hybrid (H-DETR) one-to-many queries; 0 disables")
    g.add_argument("--dec_n_points", role=MODEL, default=4, type=int,
                   help="sampling points per head and level in decoder cross-attention")
    g.add_argument("--enc_n_points", role=MODEL, default=4, type=int,
                   help="sampling points per head and level in encoder self-attention")
    g.add_argument("--with_box_refine", role=MODEL, action=BOOL, default=False,
                   help="iterative bounding-box refinement")
    g.add_argument("--two_stage", role=MODEL, action=BOOL, default=False,
                   help="two-stage proposals from the encoder")
    g.add_argument("--mixed_selection", role=MODEL, action=BOOL, default=False,
                   help="positional queries from proposals, content queries learned (needs --two_stage)")
    g.add_argument("--look_forward_twice", role=MODEL, action=BOOL, default=False,
                   help="box refinement gradients look forward twice (needs --with_box_refine)")
    g.add_argument("--use_ms_detr", role=MODEL, action=BOOL, default=False, help="MS-DETR mixed supervision")
    g.add_argument("--use_aux_ffn", role=MODEL, action=BOOL, default=True,
                   help="MS-DETR auxiliary FFN for one-to-many")

    g = with_roles(p.add_argument_group("matching and losses"))
    g.add_argument("--no_aux_loss", role=MODEL, dest="aux_loss", action="store_false",
                   help="no auxiliary losses on the intermediate decoder layers")
    g.add_argument("--set_cost_class", role=TRAINING, default=2.0, type=float,
                   help="matching cost weight: classification")
    g.add_argument("--set_cost_bbox", role=TRAINING, default=5.0, type=float, help="matching cost weight: L1 box")
    g.add_argument("--set_cost_giou", role=TRAINING, default=2.0, type=float, help="matching cost weight: GIoU")
    g.add_argument("--cls_loss_coef", role=TRAINING, default=2.0, type=float,
                   help="loss weight: focal classification")
    g.add_argument("--bbox_loss_coef", role=TRAINING, default=5.0, type=float, help="loss weight: L1 box")
    g.add_argument("--giou_loss_coef", role=TRAINING, default=2.0, type=float, help="loss weight: GIoU")
    g.add_argument("--enc_cls_loss_coef", role=TRAINING, default=None, type=float,
                   help="two-stage proposals' loss weight: classification; unset: --cls_loss_coef, or 2 with "
                        "--use_ms_detr (MS-DETR's default)")
    g.add_argument("--enc_bbox_loss_coef", role=TRAINING, default=None, type=float,
                   help="two-stage proposals' loss weight: L1 box; unset: --bbox_loss_coef, or 5 with --use_ms_detr")
    g.add_argument("--enc_giou_loss_coef", role=TRAINING, default=None, type=float,
                   help="two-stage proposals' loss weight: GIoU; unset: --giou_loss_coef, or 2 with --use_ms_detr")
    g.add_argument("--focal_alpha", role=TRAINING, default=0.25, type=float, help="alpha of the sigmoid focal loss")
    g.add_argument("--k_one2many", role=TRAINING, default=6, type=int,
                   help="hybrid: ground truth repeated this many times for the one-to-many queries")
    g.add_argument("--lambda_one2many", role=TRAINING, default=1.0, type=float,
                   help="hybrid: weight of the one-to-many losses")
    g.add_argument("--o2m_matcher_threshold", role=TRAINING, default=0.4, type=float,
                   help="mixed (MS-DETR): IoU threshold of the top-k assigner")
    g.add_argument("--o2m_matcher_k", role=TRAINING, default=6, type=int,
                   help="mixed (MS-DETR): predictions assigned per ground-truth box")
    g.add_argument("--o2m_cls_loss_coef", role=TRAINING, default=2.0, type=float,
                   help="mixed: one-to-many classification loss weight")
    g.add_argument("--o2m_bbox_loss_coef", role=TRAINING, default=5.0, type=float,
                   help="mixed: one-to-many L1 loss weight")
    g.add_argument("--o2m_giou_loss_coef", role=TRAINING, default=2.0, type=float,
                   help="mixed: one-to-many GIoU loss weight")
    g.add_argument("--topk_eval", role=EVALUATION, default=100, type=int,
                   help="detections kept per image at evaluation")

    g = with_roles(p.add_argument_group("contrastive denoising (DINO CDN, training only)"))
    g.add_argument("--use_dn", role=MODEL, action=BOOL, default=False,
                   help="noised ground-truth queries in positive/negative groups, trained with the known assignment")
    g.add_argument("--dn_number", role=TRAINING, default=100, type=int,
                   help="denoising queries per half: groups = dn_number // (most boxes of an image in the batch)")
    g.add_argument("--dn_label_noise_ratio", role=TRAINING, default=0.5, type=float,
                   help="input labels resampled uniformly with probability ratio / 2 (DINO's convention)")
    g.add_argument("--dn_box_noise_scale", role=TRAINING, default=0.4, type=float,
                   help="lambda: corner noise in half box sizes, < lambda for positives, [lambda, 2 lambda) "
                        "for negatives (DINO 4-scale: 0.4)")
    g.add_argument("--dn_cls_loss_coef", role=TRAINING, default=None, type=float, help="unset: --cls_loss_coef")
    g.add_argument("--dn_bbox_loss_coef", role=TRAINING, default=None, type=float, help="unset: --bbox_loss_coef")
    g.add_argument("--dn_giou_loss_coef", role=TRAINING, default=None, type=float, help="unset: --giou_loss_coef")

    g = with_roles(p.add_argument_group("cross-attention-guided encoder references (research)"))
    g.add_argument("--enc_ref_mode", role=MODEL, default="none", choices=("none",) + ENC_REF_MODES,
                   help="none: stock token grid; per_level: v3.0.1; per_point: v3.0.2-4")
    g.add_argument("--ref_source", role=MODEL, default="decoder", choices=REF_SOURCES,
                   help="candidates for encoder references: the decoder's predictions, or the ground-truth "
                        "boxes (gt: an oracle control that reads the targets, also at evaluation; never a detector)")
    g.add_argument("--ref_rank", role=MODEL, default="attn", choices=REF_RANKS,
                   help="how candidates are ranked per token: class score (v3.0.1), map weight, both, random "
                        "(a control: uniform without the map, seeded per step), distance (own box, then nearest)")
    g.add_argument("--ref_queries", role=MODEL, default="all", choices=REF_QUERY_SETS,
                   help="candidate queries for encoder references: all or one-to-one only")
    g.add_argument("--ref_keep_self", role=MODEL, action=BOOL, default=False,
                   help="point 0 keeps the token's own location (v3.0.4)")
    g.add_argument("--ref_grad", role=TRAINING, action=BOOL, default=False,
                   help="keep the gradient of the box centres used as encoder references")
    g.add_argument("--ref_eval_one2many", role=EVALUATION, action=BOOL, default=True,
                   help="with --ref_queries all, run the one-to-many queries (hybrid) or predictions (mixed) "
                        "at inference too, as guidance candidates only, so inference sees the candidates "
                        "training saw; --no-ref_eval_one2many drops them as upstream does (measures the "
                        "train/inference shift)")
    g.add_argument("--enc_ref_progressive", role=MODEL, action=BOOL, default=False,
                   help="encoder layers use the previous encoder layer's sampling locations (per head) as "
                        "references, across decoder layers too; not combinable with --enc_ref_mode")
    g.add_argument("--attn_map_accum", role=MODEL, default="none", choices=ACCUM_MODES,
                   help="combine the cross-attention maps of the decoder layers run so far: none (latest "
                        "layer), sum, or max (per token and query)")

    g = with_roles(p.add_argument_group("data"))
    g.add_argument("--dataset_file", role=EVALUATION, default="coco", choices=["coco", "synthetic"],
                   help="coco (files under --coco_path) or synthetic (generated there on first use)")
    g.add_argument("--coco_path", role=RUN, default="data/coco", type=str,
                   help="dataset root: train2017/, val2017/, annotations/")
    g.add_argument("--train_ann", role=TRAINING, default="instances_train2017.json", type=str,
                   help="training annotation file (in annotations/, or a path)")
    g.add_argument("--val_ann", role=EVALUATION, default="instances_val2017.json", type=str,
                   help="validation annotation file (in annotations/, or a path)")
    g.add_argument("--num_classes", role=MODEL, default=None, type=int,
                   help="unset: from the dataset (91 for COCO)")
    g.add_argument("--min_size", role=TRAINING, default=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                   type=int, nargs="+", help="training shorter-side sizes (one is drawn per image)")
    g.add_argument("--max_size", role=EVALUATION, default=1333, type=int, help="longest side after resizing")
    g.add_argument("--eval_size", role=EVALUATION, default=None, type=int, help="unset: max(--min_size)")
    g.add_argument("--random_crop", role=TRAINING, action=BOOL, default=True,
                   help="DETR's random resize-crop augmentation")
    g.add_argument("--crop_min_size", role=TRAINING, default=[400, 500, 600], type=int, nargs="+",
                   help="shorter sides before the random crop")
    g.add_argument("--crop_size", role=TRAINING, default=[384, 600], type=int, nargs=2,
                   help="min and max side of the random crop")
    g.add_argument("--skip_bad_images", role=RUN, action=BOOL, default=False,
                   help="skip unreadable images with a warning instead of stopping")
    g.add_argument("--synthetic_num_train", role=TRAINING, default=512, type=int,
                   help="synthetic dataset: training images")
    g.add_argument("--synthetic_num_val", role=EVALUATION, default=128, type=int,
                   help="synthetic dataset: validation images")
    g.add_argument("--synthetic_image_size", role=EVALUATION, default=256, type=int,
                   help="synthetic dataset: image side in pixels")
    g.add_argument("--synthetic_seed", role=EVALUATION, default=0, type=int, help="synthetic dataset: generator seed")
    g.add_argument("--num_workers", role=RUN, default=2, type=int,
                   help="data-loading worker processes per training process")

    g = with_roles(p.add_argument_group("reference diagnostics (docs/design.md §9)"))
    g.add_argument("--diag_images", role=RUN, default=DIAG_IMAGES_DEFAULT, type=int,
                   help="probe set of the reference diagnostics (D1-D6): the first N validation images by "
                        "image id, measured once per evaluation on the main process (log.jsonl 'diag' "
                        "records, TensorBoard); 0 turns them off")

    g = with_roles(p.add_argument_group("run"))
    g.add_argument("--output_dir", role=RUN, default="", type=str,
                   help="where checkpoints, log.jsonl, config.yaml, detections and TensorBoard go; empty: write nothing")
    g.add_argument("--device", role=RUN, default="cuda", type=str,
                   help="cuda or cpu (cuda falls back to cpu if absent)")
    g.add_argument("--seed", role=TRAINING, default=42, type=int, help="random seed (each process adds its rank)")
    g.add_argument("--resume", role=START, default="", type=str,
                   help="checkpoint to resume training (or evaluate) from")
    g.add_argument("--auto_resume", role=START, action=BOOL, default=False,
                   help="resume from the latest checkpoint in output_dir")
    g.add_argument("--pretrained", role=RUN, default="", type=str,
                   help="weights only (state dict or checkpoint with 'model')")
    g.add_argument("--unsafe_trust_checkpoint", role=START, default="", type=str, metavar="FILE",
                   help="load FILE (a --resume/--pretrained file) with full pickle, which can run code in it; only "
                        "for a legacy checkpoint you trust that the safe loader refuses")
    g.add_argument("--start_epoch", role=RUN, default=0, type=int, help="first epoch when not resuming")
    g.add_argument("--eval", role=RUN, action="store_true", help="evaluate (--resume or --pretrained weights) and exit")
    g.add_argument("--eval_every", role=RUN, default=1, type=int, help="evaluate every N epochs (and after the last)")
    g.add_argument("--print_freq", role=RUN, default=10, type=int, help="iterations per progress/log window")
    g.add_argument("--max_iters_per_epoch", role=TRAINING, default=None, type=int, help="cap iterations (smoke runs)")
    g.add_argument("--tensorboard", role=RUN, action=BOOL, default=True,
                   help="TensorBoard scalars under output_dir/tensorboard")
    g.add_argument("--vis_images", role=RUN, default=4, type=int,
                   help="at each evaluation, this many fixed validation images with ground truth and predictions "
                        "(and, for guided variants, the encoder references of a few tokens) go to TensorBoard; 0: off")
    g.add_argument("--compile", role=RUN, action=BOOL, default=False,
                   help="torch.compile the training model (evaluation and checkpoints use the eager module); "
                        "the deformable attention op is one graph node on CUDA")
    g.add_argument("--find_unused_parameters", role=RUN, action=BOOL, default=False,
                   help="DistributedDataParallel option; only for experiments that leave parameters unused")
    g.add_argument("--local_rank", "--local-rank", role=RUN, dest="local_rank", default=0, type=int,
                   help="set by torch.distributed.launch")
    return p


# ----------------------------------------------------------------------------- config files

class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (the plain
    loader silently keeps the last value, so a config could set a flag and quietly undo it)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml_config(path: str, _seen: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    """Read a YAML config, merging the files listed under ``_base_`` (paths relative to it) first."""
    path = os.path.abspath(path)
    _seen = _seen or ()
    if os.path.realpath(path) in {os.path.realpath(seen) for seen in _seen}:  # a link to a file of the chain too
        raise ValueError(f"config {path}: circular _base_ chain {' -> '.join(_seen + (path,))}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ValueError(_yaml_error_line(path, exc)) from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: top level must be a mapping of flag names to values")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: Dict[str, Any] = {}
    for base in bases:
        merged.update(load_yaml_config(os.path.join(os.path.dirname(path), base), _seen + (path,)))
    merged.update(data)
    return merged


def _yaml_error_line(path: str, exc: "yaml.YAMLError") -> str:
    """'config FILE: line N column C: what is wrong' from a PyYAML error (one line)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"config {path}: malformed YAML at {where}{problem}"


def _flag_table(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _to_tokens(values: Dict[str, Any], parser: argparse.ArgumentParser, source: str) -> List[str]:
    """Turn {flag: value} into command-line tokens so the parser type-checks config values too."""
    table = _flag_table(parser)
    tokens: List[str] = []
    for key, value in values.items():
        if key not in table:
            raise ValueError(f"{source}: unknown key '{key}' (not a flag of main.py)")
        action = table[key]
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if isinstance(action, BOOL):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: '{key}' must be true or false, got {value!r}")
            tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction) or isinstance(action, argparse._StoreFalseAction):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: '{key}' must be true or false, got {value!r}")
            store_true = isinstance(action, argparse._StoreTrueAction)
            if value != action.default and (value is store_true):
                tokens.append(flag)
            elif value != action.default:
                raise ValueError(f"{source}: '{key}: {value}' cannot be expressed with flag {flag}")
        elif value is None:
            if action.default is not None:
                raise ValueError(f"{source}: '{key}' cannot be null")
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = value if isinstance(value, (list, tuple)) else [value]
            tokens.append(flag)
            tokens.extend(str(v) for v in items)
        else:
            if isinstance(value, (list, dict)):
                raise ValueError(f"{source}: '{key}' takes a single value, got {value!r}")
            tokens.extend([flag, str(value)])
    return tokens


def load_variants(path: str = VARIANTS_FILE) -> Dict[str, Dict[str, Any]]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def parse_args(argv: Optional[Sequence[str]] = None, config_values: Optional[Dict[str, Any]] = None,
               config_source: str = "the recorded configuration") -> argparse.Namespace:
    """Parse flags with presets and config files applied, then validate. Raises SystemExit/ValueError.

    ``config_values``: {flag: value} read already (a checkpoint's recorded configuration), taken
    as a ``--config`` file would be when ``argv`` names none; ``config_source`` names it in errors."""
    parser = get_args_parser()
    cli = list(argv) if argv is not None else None
    first = parser.parse_args(cli)
    if first.config:
        file_values, config_source = load_yaml_config(first.config), f"config {first.config}"
    else:
        file_values = dict(config_values or {})
    for key in DERIVED_KEYS:  # a run's config.yaml: recomputed from the flags, never read back
        file_values.pop(key, None)
    variant = first.variant if first.variant is not None else file_values.get("variant")
    preset_tokens: List[str] = []
    if variant is not None:
        variants = load_variants()
        if variant not in variants:
            raise ValueError(f"--variant {variant}: unknown; choose from {', '.join(variants)}")
        preset_tokens = _to_tokens(variants[variant], parser, f"variant preset '{variant}'")
    file_tokens = _to_tokens(file_values, parser, config_source) if file_values else []
    import sys
    cli_tokens = cli if cli is not None else sys.argv[1:]
    args = parser.parse_args(preset_tokens + file_tokens + cli_tokens)
    args.variant = variant
    # stored expanded, so logs, config.yaml and run summaries show the actual schedule
    args.stages = expand_stages(args.stages or "stock", args.enc_layers, args.dec_layers)
    validate_args(args)
    return args


# ----------------------------------------------------------------------------- the resolved configuration

@functools.lru_cache(maxsize=1)
def _roles() -> Tuple[Tuple[str, str], ...]:
    return tuple(flag_roles(get_args_parser()).items())


def roles_of_flags() -> Dict[str, str]:
    """{flag name: role} as each flag declares it in ``get_args_parser`` (see ``cli.roles``)."""
    return dict(_roles())


class Config(argparse.Namespace):
    """The resolved configuration of a run, read-only: exactly the values ``config.yaml`` saves.

    Attribute access as on the parsed namespace (``models.build_model(config)`` reads ``config.x``);
    list values are stored as tuples. Run state (rank, device of this process, resume path)
    lives in the run context, not here.
    """

    def __init__(self, values: Dict[str, Any]):
        super().__init__()
        for name, value in values.items():
            object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the configuration is read-only (setting '{name}')")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the configuration is read-only (deleting '{name}')")

    def replace(self, **values: Any) -> "Config":
        """A copy with ``values`` changed (the configuration itself never changes)."""
        return Config({**vars(self), **values})


def configuration_flags() -> List[str]:
    """Names of the flags that make up the configuration, in the parser's order: all but the start
    flags, which say where a run's state comes from, not what the run is (config.yaml must reproduce
    the run from scratch with --config)."""
    return [name for name, role in roles_of_flags().items() if role != START]


def resolve_device(device: str) -> str:
    """The device the run gets: 'cuda...' falls back to 'cpu' (with a message) when CUDA is absent.
    ValueError (one line) for a name that is no torch device."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"invalid configuration: --device {device} is not a device (cuda, cuda:N or cpu)") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on the CPU", flush=True)
        return "cpu"
    return device


def resolve_config(args: argparse.Namespace, num_classes: int) -> Config:
    """The read-only configuration of validated ``args``: the device after the CPU fallback,
    ``num_classes`` (the flag's, else the dataset's). Raises ValueError when the fallback makes
    the configuration invalid (--amp fp16 on the CPU)."""
    values = {name: getattr(args, name) for name in configuration_flags()}
    values["device"] = resolve_device(args.device)
    values["num_classes"] = num_classes
    check_amp_device(values["amp"], values["device"])
    return Config(values)


def config_dict(config: argparse.Namespace) -> Dict[str, Any]:
    """The configuration as {flag name: value} (lists, not tuples), loadable again with ``--config``."""
    out = {}
    for name in configuration_flags():
        if hasattr(config, name):
            value = getattr(config, name)
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def derived_keys(config: argparse.Namespace) -> Dict[str, Any]:
    """Keys ``config.yaml`` carries besides the flags, for readers of a run directory (scripts/summarize.py):
    ``control: oracle`` when the encoder guidance reads the ground truth (a control, never a detector).
    Derived from the flags, so ``--config`` drops them (``DERIVED_KEYS``) and derives them again."""
    control = guidance_control(config.enc_ref_mode, config.ref_source)
    return {"control": control} if control else {}


DERIVED_KEYS = ("control",)


def save_config(config: argparse.Namespace, path: str, evaluated: Optional[str] = None) -> None:
    """``config.yaml``: the resolved configuration, written atomically, one section per role (a
    comment line says what the role means), then its ``derived_keys``. ``evaluated``: the checkpoint
    an ``--eval`` run evaluated."""
    if evaluated:
        header = (f"# resolved configuration of an --eval of {evaluated} (python main.py --config config.yaml "
                  f"--resume {evaluated} reproduces it)\n")
    else:
        header = "# resolved configuration of this run (python main.py --config config.yaml reproduces it)\n"
    values = config_dict(config)
    sections = [f"# {role}: {ROLE_MEANING[role]}\n" + yaml.safe_dump({n: values[n] for n in names}, sort_keys=False)
                for role, names in group_by_role(values, roles_of_flags()).items()]
    derived = derived_keys(config)
    if derived:
        sections.append("# derived from the flags above (not a flag; --config ignores it)\n"
                        + yaml.safe_dump(derived, sort_keys=False))
    atomic_write_text(path, header + "".join(sections))


# ----------------------------------------------------------------------------- validation

def _warn(message: str) -> None:
    """A configuration warning, printed once per job: by the process that will be rank 0."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank == "0":
        print(f"warning: {message}", flush=True)


# (flag, lowest allowed, highest allowed): None is no bound; a flag whose value is None (unset) is not checked
_NUMERIC_DOMAINS = (
    ("lr", 0.0, None), ("lr_backbone", 0.0, None), ("lr_linear_proj_mult", 0.0, None), ("weight_decay", 0.0, None),
    ("clip_max_norm", 0.0, None), ("batch_size", 1, None), ("epochs", 0, None), ("lr_drop", 1, None),
    ("lr_drop_epochs", 1, None), ("start_epoch", 0, None), ("num_workers", 0, None), ("min_size", 1, None),
    ("max_size", 1, None), ("eval_size", 1, None), ("crop_min_size", 1, None), ("crop_size", 1, None),
    ("hidden_dim", 1, None), ("nheads", 1, None), ("dim_feedforward", 1, None), ("dropout", 0.0, 1.0),
    ("enc_n_points", 1, None), ("dec_n_points", 1, None), ("position_embedding_scale", 0.0, None),
    ("set_cost_class", 0.0, None), ("set_cost_bbox", 0.0, None), ("set_cost_giou", 0.0, None),
    ("cls_loss_coef", 0.0, None), ("bbox_loss_coef", 0.0, None), ("giou_loss_coef", 0.0, None),
    ("enc_cls_loss_coef", 0.0, None), ("enc_bbox_loss_coef", 0.0, None), ("enc_giou_loss_coef", 0.0, None),
    ("focal_alpha", 0.0, 1.0), ("lambda_one2many", 0.0, None), ("o2m_cls_loss_coef", 0.0, None),
    ("o2m_bbox_loss_coef", 0.0, None), ("o2m_giou_loss_coef", 0.0, None), ("num_classes", 1, None),
    ("eval_every", 1, None), ("print_freq", 1, None), ("max_iters_per_epoch", 1, None), ("vis_images", 0, None),
    ("synthetic_num_train", 1, None), ("synthetic_num_val", 1, None), ("synthetic_image_size", 16, None),
    ("diag_images", 0, None),
)
# strictly positive, not just >= 0: a zero learning rate trains nothing
_POSITIVE = {"lr", "position_embedding_scale"}


def check_numeric_domains(args: argparse.Namespace) -> None:
    """Every numeric flag with a domain is inside it (and finite); raises ValueError naming the flag."""
    for name, low, high in _NUMERIC_DOMAINS:
        value = getattr(args, name, None)
        if value is None:
            continue
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            # written so that NaN fails every comparison
            ok = item > low if name in _POSITIVE else item >= low
            ok = ok and (high is None or item <= high) and math.isfinite(item)
            if not ok:
                bound = (f"> {low}" if name in _POSITIVE else f">= {low}") + (f" and <= {high}" if high is not None
                                                                                 else "")
                extra = " (0 freezes the backbone)" if name == "lr_backbone" else ""
                raise ValueError(f"invalid configuration: --{name} {item} must be {bound}{extra}")
    if args.crop_size[0] > args.crop_size[1]:
        raise ValueError(f"invalid configuration: --crop_size {args.crop_size[0]} {args.crop_size[1]}: "
                         "the minimum is larger than the maximum")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def validate_paths(args: argparse.Namespace) -> None:
    """Files and folders the run reads or writes, checked before any work (main.py calls it after
    ``parse_args``; kept apart so that parsing alone never depends on the file system).

    --coco_path: for COCO, the root, its image folders and annotation files exist (only 'val'
    for --eval); for the synthetic data, a folder that exists or can be made. --output_dir: a
    writable folder, or one that can be made. Raises ValueError (or FileNotFoundError) naming it.
    """
    def fail(msg: str):
        raise ValueError(f"invalid configuration: {msg}")

    def creatable(path: str, flag: str) -> None:
        if os.path.exists(path):
            if not os.path.isdir(path):
                fail(f"{flag} {path} exists and is not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                fail(f"{flag} {path} is not writable")
            return
        anchor = _nearest_existing(path)
        if not os.path.isdir(anchor):
            fail(f"{flag} {path} cannot be created: {anchor} is not a folder")
        if not os.access(anchor, os.W_OK | os.X_OK):
            fail(f"{flag} {path} cannot be created: {anchor} is not writable")

    if args.output_dir:
        creatable(args.output_dir, "--output_dir")
    if args.dataset_file == "synthetic":
        creatable(args.coco_path, "--coco_path")
    elif args.dataset_file == "coco":
        root = args.coco_path
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--coco_path {root}: folder not found (expected train2017/, val2017/, "
                                    "annotations/ in it)")
        splits = [("val", args.val_ann)] + ([] if args.eval else [("train", args.train_ann)])
        for split, ann in splits:
            folder = os.path.join(root, f"{split}2017")
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--coco_path {root}: image folder {folder} not found")
            ann_file = resolve_ann_file(root, ann)
            if not os.path.isfile(ann_file):
                raise FileNotFoundError(f"--coco_path {root}: annotation file {ann_file} not found "
                                        f"(--{split}_ann {ann})")


def validate_args(args: argparse.Namespace) -> None:
    """The one place that checks the whole configuration; raises ValueError naming the flags."""
    def fail(msg: str):
        raise ValueError(f"invalid configuration: {msg}")

    check_numeric_domains(args)

    pairs = parse_stages(args.stages or "stock", args.enc_layers, args.dec_layers)
    if args.enc_layers < 1 or args.dec_layers < 1:
        fail("--enc_layers and --dec_layers must be >= 1")
    if args.hidden_dim % args.nheads != 0:
        fail(f"--hidden_dim {args.hidden_dim} is not divisible by --nheads {args.nheads}")
    if args.hidden_dim % 32 != 0:
        fail(f"--hidden_dim {args.hidden_dim} must be a multiple of 32 (GroupNorm(32) input projections)")
    if not 1 <= args.num_feature_levels <= 5:
        fail(f"--num_feature_levels {args.num_feature_levels} must be in 1..5")
    if args.mixed_selection and not args.two_stage:
        fail("--mixed_selection needs --two_stage (queries' positions come from encoder proposals)")
    if args.look_forward_twice and not args.with_box_refine:
        fail("--look_forward_twice needs --with_box_refine")
    if args.num_queries_one2one < 1:
        fail("--num_queries_one2one must be >= 1")
    if args.num_queries_one2many < 0:
        fail("--num_queries_one2many must be >= 0")
    if args.use_ms_detr and args.num_queries_one2many > 0:
        fail("--use_ms_detr (mixed supervision on the same queries) and --num_queries_one2many > 0 "
             "(hybrid extra query group) are two different one-to-many forms; pick one")
    if args.num_queries_one2many > 0 and args.k_one2many < 1:
        fail("--k_one2many must be >= 1 with --num_queries_one2many > 0")
    if args.use_ms_detr and (args.o2m_matcher_k < 1 or not 0.0 <= args.o2m_matcher_threshold <= 1.0):
        fail("--o2m_matcher_k must be >= 1 and --o2m_matcher_threshold in [0, 1]")
    if args.use_ms_detr and args.set_cost_bbox == 0 and args.set_cost_giou == 0:
        fail("--use_ms_detr matches encoder proposals by box costs alone (no class cost, as MS-DETR): "
             "--set_cost_bbox and --set_cost_giou cannot both be 0")
    if args.topk_eval < 1:
        fail("--topk_eval must be >= 1")
    if args.backbone_weights not in (None, "none") and not os.path.isfile(args.backbone_weights):
        fail(f"--backbone_weights {args.backbone_weights}: file not found")
    if args.pretrained and not os.path.isfile(args.pretrained):
        fail(f"--pretrained {args.pretrained}: file not found")
    if args.resume and not args.resume.startswith("https://") and not os.path.isfile(args.resume):
        fail(f"--resume {args.resume}: file not found")
    if args.eval and not (args.resume or args.pretrained or args.auto_resume):
        # with --auto_resume the checkpoint is looked up later (main.resume_path warns if none is found)
        _warn("--eval without --resume/--pretrained evaluates an untrained model")
    if args.batch_size < 1 or args.epochs < 0:
        fail("--batch_size must be >= 1 and --epochs >= 0")

    guided_mode = args.enc_ref_mode != "none"
    if guided_mode:
        if not guided_encoder_layers(pairs):
            fail(f"--enc_ref_mode {args.enc_ref_mode} guides encoder layers that run after a decoder layer, "
                 f"but --stages {args.stages} runs no encoder layer after a decoder layer")
        n_candidates = args.num_queries_one2one + (args.num_queries_one2many if args.ref_queries == "all" else 0)
        if args.enc_ref_mode == "per_level" and n_candidates < args.num_feature_levels:
            fail(f"--enc_ref_mode per_level picks {args.num_feature_levels} queries but only {n_candidates} "
                 "are candidates")
        try:  # the rules the generator itself enforces, written once in the research module
            check_research_settings(args.enc_ref_mode, args.ref_rank, args.ref_keep_self, args.attn_map_accum,
                                    args.ref_queries, args.enc_n_points, args.ref_source, args.ref_grad)
        except ValueError as error:
            fail(str(error))
        if args.enc_ref_progressive:
            # in every schedule a guided encoder layer directly follows a decoder layer, whose
            # fresh guidance would replace the progressive chain: the flag would do nothing
            fail(f"--enc_ref_progressive and --enc_ref_mode {args.enc_ref_mode} both set the encoder's "
                 "references (previous encoder layer's sampling vs the decoder's guidance); use one")
    else:
        for flag, value, default in (("--ref_keep_self", args.ref_keep_self, False), ("--ref_grad", args.ref_grad, False),
                                     ("--ref_source", args.ref_source, "decoder"),
                                     ("--attn_map_accum", args.attn_map_accum, "none"),
                                     ("--ref_queries", args.ref_queries, "all"),
                                     ("--ref_eval_one2many", args.ref_eval_one2many, True)):
            if value != default:
                fail(f"{flag} {value} has no effect without --enc_ref_mode per_level|per_point")
    has_one2many = args.num_queries_one2many > 0 or args.use_ms_detr
    if not args.ref_eval_one2many and (args.ref_queries != "all" or not has_one2many):
        fail("--no-ref_eval_one2many drops one-to-many guidance candidates at inference, but there are none: "
             "it needs --ref_queries all and a one-to-many form (--num_queries_one2many > 0 or --use_ms_detr)")
    if not args.ref_eval_one2many and guided_mode and not reads_decoder_queries(args.ref_source, args.ref_rank):
        fail(f"--no-ref_eval_one2many drops one-to-many queries from the guidance at inference, but --ref_source "
             f"{args.ref_source} with --ref_rank {args.ref_rank} reads no decoder query")
    if args.ref_queries == "o2o" and args.num_queries_one2many == 0 and not args.use_ms_detr:
        _warn("--ref_queries o2o without a one-to-many form: all queries are one-to-one already")
    if args.two_stage:
        _check_two_stage_fits(args, fail)
    late_drops = [e for e in (args.lr_drop_epochs or ()) if e >= args.epochs]
    if late_drops:
        _warn(f"--lr_drop_epochs {' '.join(map(str, late_drops))}: not before --epochs {args.epochs}, so the "
              "learning rate never drops there")
    _validate_denoising(args, fail)
    check_amp_device(args.amp, args.device)


def _check_two_stage_fits(args: argparse.Namespace, fail) -> None:
    """Two-stage proposals pick every query from the encoder's tokens: the smallest image the run
    feeds the model (its shorter side: the smallest of --min_size and --eval_size, at most
    --max_size) must have at least as many tokens as there are queries."""
    side = min(min(args.min_size), args.eval_size or max(args.min_size), args.max_size)
    tokens = tokens_of_square_image(side, args.num_feature_levels, args.dilation)
    queries = args.num_queries_one2one + args.num_queries_one2many
    if queries > tokens:
        fail(f"--two_stage selects {queries} queries (--num_queries_one2one {args.num_queries_one2one} + "
             f"--num_queries_one2many {args.num_queries_one2many}) from the encoder's tokens, but a {side}x{side} "
             f"image (the smallest size of --min_size/--eval_size/--max_size) has only {tokens}; use fewer "
             "queries or larger images")


def check_amp_device(amp: str, device: str) -> None:
    """fp16 autocast with loss scaling exists only on CUDA; checked on the flag (validate_args)
    and again on the device the run actually gets (resolve_config's CPU fallback)."""
    if amp == "fp16" and not str(device).startswith("cuda"):
        raise ValueError(f"invalid configuration: --amp fp16 needs a CUDA device (--device {device}); "
                         "use --amp bf16 or off on the CPU")


def _validate_denoising(args: argparse.Namespace, fail) -> None:
    """DINO CDN flags: ranges with --use_dn, and no denoising flag changed without it."""
    if not args.use_dn:
        for flag, value, default in (("--dn_number", args.dn_number, 100),
                                     ("--dn_label_noise_ratio", args.dn_label_noise_ratio, 0.5),
                                     ("--dn_box_noise_scale", args.dn_box_noise_scale, 0.4),
                                     ("--dn_cls_loss_coef", args.dn_cls_loss_coef, None),
                                     ("--dn_bbox_loss_coef", args.dn_bbox_loss_coef, None),
                                     ("--dn_giou_loss_coef", args.dn_giou_loss_coef, None)):
            if value != default:
                fail(f"{flag} {value} has no effect without --use_dn")
        return
    if args.dn_number < 1:
        fail(f"--dn_number {args.dn_number} must be >= 1 with --use_dn")
    if not 0.0 <= args.dn_label_noise_ratio <= 1.0:
        fail(f"--dn_label_noise_ratio {args.dn_label_noise_ratio} must be in [0, 1]")
    if args.dn_box_noise_scale < 0.0:
        fail(f"--dn_box_noise_scale {args.dn_box_noise_scale} must be >= 0")
