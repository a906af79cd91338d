"""Pictures of fixed validation images after every evaluation of training (``--vis_images N`` > 0).

Per image, to TensorBoard under ``val_images/<index>``: ground truth | predictions [| with guided
references, the references of a few high-attention tokens of the last encoder layer]. The N
images are spread evenly over the validation split, the same ones every evaluation. Only a
training run with TensorBoard writes them (``--eval`` has none).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from engine import autocast, outputs_to_float, step_guidance
from models.record_views import choose_tokens, level_shapes, reference_entries, token_map, token_position
from models.recording import ForwardRecord, run_recorded
from runner.tail import EpochTail
from util import draw
from util.box_ops import box_cxcywh_to_xyxy
from util.interrupt import StopSignals

from .base import EvalExtra, register


@register
class ValidationPictures(EvalExtra):
    name = "pictures"

    def __init__(self, indices: List[int]):
        self.indices = indices

    @classmethod
    def build(cls, config, model, dataset) -> Optional["ValidationPictures"]:
        if config.vis_images == 0 or config.eval or not (config.tensorboard and config.output_dir):
            return None
        return cls(picture_indices(len(dataset), config.vis_images))

    def after_evaluation(self, tail: EpochTail, epoch: Optional[int]) -> Dict[str, object]:
        """The pictures, at TensorBoard step ``epoch + 1``; returns them by tag."""
        if not (tail.ctx.writes and tail.tb_logger.active):
            return {}
        pictures = validation_pictures(tail.model, tail.postprocessors, tail.val_loader.dataset, self.indices,
                                       tail.ctx.device, amp=tail.config.amp, class_names=tail.class_names,
                                       references=tail.config.enc_ref_mode != "none", guidance=tail.config,
                                       stop=tail.stop)
        logged = {f"val_images/{index}": picture for index, picture in pictures or ()}  # None: cut short
        for tag, picture in logged.items():
            tail.tb_logger.image(tag, picture, epoch + 1)
        return logged


def picture_indices(dataset_size: int, count: int) -> List[int]:
    """``count`` fixed dataset indices spread evenly over the split (the same ones every epoch)."""
    count = min(max(int(count), 0), dataset_size)
    if count <= 1:
        return list(range(count))
    return sorted({round(k * (dataset_size - 1) / (count - 1)) for k in range(count)})


def _reference_panel(base, record: ForwardRecord, tokens: int):
    """The last encoder layer's references of ``tokens`` high-attention tokens, over ``base``."""
    shapes = level_shapes(record)
    chosen = choose_tokens(token_map(record), shapes, tokens)
    last = record.encoder_references[-1]
    marks = [(*token_position(t, shapes)[1:], [(x, y) for x, y, _, _ in reference_entries(last, t)]) for t in chosen]
    caption = f"last encoder layer: references of {len(chosen)} tokens"
    return draw.draw_caption(draw.draw_references(base, marks), caption)


@torch.no_grad()
def validation_pictures(model: nn.Module, postprocessors: Dict, dataset, indices: List[int], device: torch.device,
                        *, amp: str = "off", class_names: Optional[Dict[int, str]] = None, score_thr: float = 0.3,
                        references: bool = False, tokens: int = 3, guidance=None,
                        stop: Optional[StopSignals] = None) -> Optional[List[Tuple[int, "object"]]]:
    """One picture (PIL image) per validation image ``indices``: ground truth | predictions above
    ``score_thr`` [| with ``references``, the encoder references of ``tokens`` tokens of the last
    encoder layer]. Returns [(index, picture)]; None when a stop signal (``stop``) cut it short.

    Each image runs alone through the eager model in eval mode at its evaluation-transform size, so
    the boxes are those the evaluation scores (up to batch padding). ``guidance``: the run's
    configuration, as in ``engine.evaluate`` (the seed: --seed, the dataset index).
    """
    model.eval()
    pictures = []
    for index in indices:
        image, target = dataset[index]  # image (3, h, w) normalised; target boxes cxcywh in [0, 1]
        h, w = image.shape[-2:]
        with autocast(device, amp):
            outputs, record = run_recorded(model, [image.to(device)], guidance=step_guidance(guidance, [target], index))
        result = postprocessors["bbox"](outputs_to_float(outputs), torch.tensor([[h, w]], device=device))[0]
        result = {k: v.cpu() for k, v in result.items()}
        base, scale = draw.enlarged(draw.to_pil(image))
        truth = box_cxcywh_to_xyxy(target["boxes"].float()) * torch.tensor([w, h, w, h]) * scale
        panels = [draw.draw_caption(draw.draw_boxes(base, truth, target["labels"], None, class_names), "ground truth"),
                  draw.prediction_panel(base, scale, result, class_names, score_thr)]
        if references and record.encoder:
            panels.append(_reference_panel(base, record, tokens))
        pictures.append((index, draw.side_by_side(panels)))
        if stop is not None and stop.requested:
            return None
    return pictures
