"""The detector as one inference function: a preprocessed image batch in, boxes / scores / labels out.

What ``scripts/export.py`` hands to ``torch.export`` and ``scripts/bench_infer.py`` times: the model
in eval mode followed by its postprocessor, with plain tensors at both ends (no NestedTensor, no
dicts), so the exported program has a fixed signature.
"""
from typing import Tuple

import torch
from torch import Tensor, nn

from util.nested_tensor import NestedTensor


class InferenceModel(nn.Module):
    """``model`` + ``postprocess`` (models.postprocess.PostProcess) on tensors.

    forward(images, mask, target_sizes):
        images: (B, 3, H, W) normalised (the evaluation transform), padded at the bottom/right;
        mask: (B, H, W) bool, True on padding;
        target_sizes: (B, 2) (h, w) each image's size in the pixels the boxes are wanted in.
    Returns boxes (B, K, 4) absolute xyxy, scores (B, K), labels (B, K) int64, K = postprocess.topk
    (or Q * classes when smaller), sorted by score.
    """

    def __init__(self, model: nn.Module, postprocess: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.postprocess = postprocess

    def forward(self, images: Tensor, mask: Tensor, target_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        outputs = self.model(NestedTensor(images, mask))
        outputs = {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()}
        results = self.postprocess(outputs, target_sizes)
        return (torch.stack([r["boxes"] for r in results]), torch.stack([r["scores"] for r in results]),
                torch.stack([r["labels"] for r in results]))
