"""How the feature levels lie in the flattened token axis, and the padding masks of the levels.

Level l of H_l x W_l tokens occupies tokens [start_l, start_l + H_l * W_l) of the axis,
row-major; T = sum of H_l * W_l. ``LevelLayout`` carries this arrangement, built once per
forward pass, to everything that reads the token axis: the attention module, the encoder and
decoder layers, the encoder guidance and the cross-attention map.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Image padding mask (bs, H, W) bool -> (bs, h, w) bool at a feature map's ``size`` (nearest)."""
    return F.interpolate(mask[None].float(), size=size)[0].to(torch.bool)


def valid_size(mask: torch.Tensor) -> torch.Tensor:
    """mask (bs, H, W) True on padding -> (bs, 2) float32 number of image (columns, rows).

    Images sit in the top-left corner of the padded batch, so the first row and column count them.
    """
    rows = (~mask[:, :, 0]).sum(1).float()
    columns = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([columns, rows], -1)


def valid_ratio(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mask (bs, H, W) True on padding -> (bs, 2) valid (width, height) fractions in ``dtype``."""
    _, height, width = mask.shape
    size = valid_size(mask).to(dtype)  # pixel counts: exact in float32
    # divided by python ints, column by column, exactly as the level sizes are written
    return torch.stack([size[:, 0] / width, size[:, 1] / height], -1)


class LevelLayout(NamedTuple):
    """The flattened levels of one batch.

    spatial_shapes: (L, 2) int64 (H, W) per level, on the tokens' device.
    shapes: the same sizes as python ints [(H, W), ...]: level sizes without a device read.
    level_start_index: (L,) int64, first token of each level.
    padding_mask: (bs, T) bool, True on padding; None when nothing is padded.
    valid_ratios: (bs, L, 2) (w, h) fraction of each level that is image; None where unused
        (the attention and the map do not read it; the encoder references do).
    """
    spatial_shapes: torch.Tensor
    shapes: List[Tuple[int, int]]
    level_start_index: torch.Tensor
    padding_mask: Optional[torch.Tensor] = None
    valid_ratios: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        """T = sum of H_l * W_l (python int)."""
        return sum(h * w for h, w in self.shapes)

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]], device=None, padding_mask: Optional[torch.Tensor] = None,
                    valid_ratios: Optional[torch.Tensor] = None) -> "LevelLayout":
        """[(H, W), ...] -> layout with the shape tensor and start indices built on ``device``."""
        shapes = [(h, w) for h, w in shapes]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.as_tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.long,
                                            device=device)
        return cls(spatial_shapes, shapes, level_start_index, padding_mask, valid_ratios)

    @classmethod
    def from_masks(cls, masks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> "LevelLayout":
        """Per-level padding masks (bs, H_l, W_l) -> layout with the flattened mask and valid ratios
        in ``dtype`` (the box path's: float32, or float64 for a float64 model)."""
        padding_mask = torch.cat([mask.flatten(1) for mask in masks], 1)
        valid_ratios = torch.stack([valid_ratio(mask, dtype) for mask in masks], 1)
        return cls.from_shapes([tuple(mask.shape[-2:]) for mask in masks], padding_mask.device, padding_mask,
                               valid_ratios)

    @classmethod
    def from_tensors(cls, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                     padding_mask: Optional[torch.Tensor] = None) -> "LevelLayout":
        """Layout of the operator's arguments; reads the level sizes to the host (a device sync)."""
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        return cls(spatial_shapes, shapes, level_start_index, padding_mask)

    def level_padding(self, level: int) -> torch.Tensor:
        """The padding mask of one level: (bs, H_l, W_l) bool. Needs ``padding_mask``."""
        height, width = self.shapes[level]
        start = sum(h * w for h, w in self.shapes[:level])
        return self.padding_mask[:, start:start + height * width].view(-1, height, width)
