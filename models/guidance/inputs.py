"""What the guidance reads beyond the decoder's outputs, passed to the model's forward explicitly.

    outputs = model(samples, targets, guidance=guidance_inputs(config, targets, (config.seed, epoch, it, rank)))

``guidance_inputs`` returns None unless the configured source or ranking rule needs something:
the ground-truth boxes (``--ref_source gt``) or a seed for this step (``--ref_rank random``). The
seed is a function of the parts it is given, never of a global random state, so a resumed run
draws the same numbers and the model's global generator is untouched. Callers: training
(seed, epoch, iteration, rank); evaluation (seed, batch index, rank); the diagnostics and
pictures (seed, batch or image index).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from util.seeding import mix_seed

from .registry import RANKINGS, SOURCES


@dataclass
class GuidanceInputs:
    """gt_boxes (bs, G, 4) cxcywh normalised to each image's valid region, padded to the batch's
    largest count G; gt_valid (bs, G) bool, False on padding; seed: this step's seed of the random
    ranking. Each is None when the configured guidance does not read it."""
    gt_boxes: Optional[torch.Tensor] = None
    gt_valid: Optional[torch.Tensor] = None
    seed: Optional[int] = None


def guidance_needs(settings) -> Tuple[bool, bool]:
    """(targets, seed): whether the guidance configured by ``settings`` reads the ground truth and a
    per-step seed. settings: the flags (``enc_ref_mode``, ``ref_source``, ``ref_rank``), or the model's
    ``EncoderReferenceGenerator`` (same attribute names); None or 'none' mode: nothing."""
    if settings is None or getattr(settings, "enc_ref_mode", "none") == "none":
        return False, False
    return SOURCES.get(settings.ref_source).needs_targets, RANKINGS.get(settings.ref_rank).reads_seed


def guidance_inputs(settings, targets: Optional[List[Dict]] = None, seed_parts: Sequence[int] = ()
                    ) -> Optional[GuidanceInputs]:
    """The forward's ``guidance`` argument: None when the guidance of ``settings`` (see
    ``guidance_needs``) reads nothing beyond the decoder; else the padded ground truth of
    ``targets`` (per image 'boxes' (G_i, 4)) and/or the seed ``mix_seed(*seed_parts)``."""
    needs_targets, needs_seed = guidance_needs(settings)
    if not (needs_targets or needs_seed):
        return None
    inputs = GuidanceInputs()
    if needs_targets:
        if targets is None:
            raise ValueError(f"--ref_source {settings.ref_source} reads the ground-truth boxes, but no targets "
                             "were given")
        inputs.gt_boxes, inputs.gt_valid = padded_boxes(targets)
    if needs_seed:
        if not seed_parts:
            raise ValueError(f"--ref_rank {settings.ref_rank} draws random numbers: give the step's seed parts")
        inputs.seed = mix_seed(*seed_parts)
    return inputs


def padded_boxes(targets: List[Dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image 'boxes' (G_i, 4) -> (bs, G, 4) float32 with G = max G_i (zeros on padding) and
    validity (bs, G) bool, on the first image's device. A Python loop over images, no host sync."""
    boxes = [torch.as_tensor(t["boxes"]).reshape(-1, 4) for t in targets]
    device = boxes[0].device if boxes else torch.device("cpu")
    most = max((b.shape[0] for b in boxes), default=0)
    padded = torch.zeros(len(boxes), most, 4, dtype=torch.float32, device=device)
    valid = torch.zeros(len(boxes), most, dtype=torch.bool, device=device)
    for i, image_boxes in enumerate(boxes):
        padded[i, :image_boxes.shape[0]] = image_boxes.to(device=device, dtype=torch.float32)
        valid[i, :image_boxes.shape[0]] = True
    return padded, valid
