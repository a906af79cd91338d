"""Export a trained detector with ``torch.export``: a preprocessed image batch in, boxes/scores/labels out.

usage: python scripts/export.py --checkpoint RUN_DIR|CKPT.pth --out model.pt2 [--config FILE]
           [--image_size H W] [--batch_size 1] [--device cpu|cuda] [--topk N] [--no-check]

The program is models.inference.InferenceModel (the model in eval mode + its postprocessor):

    boxes (B, K, 4) xyxy, scores (B, K), labels (B, K) = program(images (B, 3, H, W), mask (B, H, W),
                                                                target_sizes (B, 2))

images: the run's evaluation transform (resize, ImageNet normalisation) padded at the bottom/right to
the exported H x W (default: eval_size x max_size, which every evaluation-size image fits), mask True
on that padding, target_sizes (h, w) the pixels the boxes are wanted in. Shapes are fixed at export.
The multi-scale deformable attention stays one node per attention call (``torch.ops.msda.ms_deform_attn``),
so to load the file elsewhere this repository's ``ops`` package must be imported first (it registers
the operator; its CPU kernel is the PyTorch path, on CUDA the compiled kernels):

    import torch, ops                      # registers torch.ops.msda.*
    program = torch.export.load("model.pt2").module()

Class names and the input size are stored in the file's extra file ``meta.json``. With --check (the
default) the saved file is reloaded and its outputs compared with the eager model's.
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

from util.errors import InputError  # noqa: E402

META_NAME = "meta.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    parser.add_argument("--out", required=True, help="the .pt2 file to write")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="the run's YAML configuration (as scripts/predict.py --config)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="padded input size the program is specialised to (default: eval_size x max_size)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per call (fixed at export)")
    parser.add_argument("--device", default="cpu", help="device the program runs on (cuda falls back to cpu)")
    parser.add_argument("--topk", type=int, default=None, help="detections per image (default: --topk_eval)")
    parser.add_argument("--unsafe_trust_checkpoint", default="", metavar="FILE",
                        help="load FILE (the checkpoint) with full pickle; only for a legacy file you trust")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="reload the file and compare its outputs with the eager model's")


def example_inputs(batch_size: int, size: Tuple[int, int], device, seed: int = 0, padded: bool = False):
    """(images (B, 3, H, W), mask (B, H, W), target_sizes (B, 2)); with ``padded`` the last image covers
    only part of the canvas, so the mask is exercised."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randn(batch_size, 3, h, w, generator=g)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
    sizes = torch.tensor([[h, w]] * batch_size)
    if padded:
        vh, vw = max(h * 3 // 4, 1), max(w * 2 // 3, 1)
        images[-1, :, vh:, :] = 0
        images[-1, :, :, vw:] = 0
        mask[-1, vh:, :] = True
        mask[-1, :, vw:] = True
        sizes[-1] = torch.tensor([vh * 2, vw * 2])  # boxes in the pixels of a twice larger original
    return images.to(device), mask.to(device), sizes.to(device)


def export_program(inference_model: torch.nn.Module, inputs) -> "torch.export.ExportedProgram":
    """``torch.export`` of the inference model with every attention call as one registered-op node."""
    import ops
    with ops.through_registered_op(), torch.no_grad():
        return torch.export.export(inference_model, tuple(inputs))


def max_differences(program, eager: torch.nn.Module, inputs) -> Dict[str, float]:
    """Largest absolute difference of boxes and scores, and the number of differing labels."""
    with torch.no_grad():
        got, expected = program(*inputs), eager(*inputs)
    return {"boxes": float((got[0] - expected[0]).abs().max()), "scores": float((got[1] - expected[1]).abs().max()),
            "labels": int((got[2] != expected[2]).sum())}


def count_nodes(program, name: str) -> int:
    return sum(1 for node in program.graph.nodes if name in str(node.target))


def export(checkpoint: str, out: str, image_size: Optional[Sequence[int]] = None, batch_size: int = 1,
           device: str = "cpu", topk: Optional[int] = None, check: bool = True, trusted: str = "",
           config: Optional[str] = None) -> Dict:
    """Export, save and (``check``) reload and compare; returns a summary dict."""
    from models.guidance import guidance_needs
    from models.inference import InferenceModel
    from predict import load_predictor

    if os.path.isdir(out):
        raise InputError(f"--out {out} is a folder: name the .pt2 file to write")
    if batch_size < 1:
        raise InputError(f"--batch_size {batch_size} must be >= 1")
    if image_size and min(image_size) < 32:
        raise InputError(f"--image_size {image_size[0]} {image_size[1]} must be at least 32 x 32")
    predictor = load_predictor(checkpoint, device, topk, trusted, config)  # refuses a model that reads the ground truth
    args = predictor.args
    if guidance_needs(args)[1]:
        raise InputError(f"--checkpoint {checkpoint}: --ref_rank {args.ref_rank} draws from a generator seeded per "
                         "call, and an exported program has no seed input; export refuses it")
    size = tuple(image_size) if image_size else (args.eval_size or max(args.min_size),
                                                 max(args.eval_size or max(args.min_size), args.max_size))
    if min(size) < 32:
        raise InputError(f"the run's evaluation size {size[0]} x {size[1]} is below 32 x 32: pass --image_size H W")
    model = InferenceModel(predictor.model, predictor.postprocess).to(predictor.device).eval()
    inputs = example_inputs(batch_size, size, predictor.device)
    program = export_program(model, inputs)
    meta = {"checkpoint": os.path.abspath(predictor.checkpoint_path), "image_size": list(size),
            "batch_size": batch_size, "device": str(predictor.device), "class_names": predictor.class_names,
            "inputs": "images (B,3,H,W) normalised with ImageNet mean/std, mask (B,H,W) True on padding, "
                      "target_sizes (B,2) (h,w)", "outputs": "boxes (B,K,4) xyxy, scores (B,K), labels (B,K)"}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.export.save(program, out, extra_files={META_NAME: json.dumps(meta)})
    summary = {"out": out, "image_size": list(size), "batch_size": batch_size,
               "msda_nodes": count_nodes(program, "msda.ms_deform_attn"),
               "grid_sampler_nodes": count_nodes(program, "grid_sampler")}
    if check:
        reloaded = torch.export.load(out).module()
        summary["max_diff"] = max_differences(reloaded, model, example_inputs(batch_size, size, predictor.device,
                                                                             seed=1, padded=True))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_arguments(parser)
    opts = parser.parse_args(argv)
    try:
        summary = export(opts.checkpoint, opts.out, opts.image_size, opts.batch_size, opts.device, opts.topk,
                         opts.check, opts.unsafe_trust_checkpoint, opts.config)
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
