"""ResNet backbone (frozen BatchNorm, or trainable BatchNorm from random init) returning multi-scale
features and their padding masks."""
import math
import os
from typing import Dict, List, Optional

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from util.nested_tensor import NestedTensor

from .level_layout import downsample_mask
from .position_encoding import build_position_encoding

_WEIGHTS_ENUM = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all buffers, never trained).

    Detection batches are too small for useful batch statistics, so the ImageNet ones are kept.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torchvision checkpoints carry a BatchNorm counter that a frozen layer has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _imagenet_weights_path(name: str, weights: str) -> str:
    """Where the ImageNet weights are: the given file, or torchvision's cache. Never downloads."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--backbone_weights {weights}: file not found")
        return weights
    enum = getattr(torchvision.models, _WEIGHTS_ENUM[name]).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"ImageNet weights for {name} are not in torchvision's cache ({cached}). Pass "
            f"--backbone_weights PATH to a torchvision {name} state dict, or --backbone_weights none for random init.")
    return cached


NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def build_resnet(name: str, dilation: bool, weights: str, norm: str = "frozen_bn") -> nn.Module:
    """A torchvision ResNet; weights from a local file or the cache, or random ('none').

    norm 'frozen_bn' keeps the ImageNet statistics (the upstream choice). From random init a frozen
    BatchNorm is the identity and the unnormalised trunk learns slowly, so 'bn' trains BatchNorm.
    """
    net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                           norm_layer=NORM_LAYERS[norm])
    if weights != "none":
        path = _imagenet_weights_path(name, weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise RuntimeError(f"backbone weights {path} do not fit {name}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return net


def backbone_strides(kept_levels: int, dilation: bool) -> List[int]:
    """Strides of the trunk's returned maps: the first ``kept_levels`` of 8/16/32, or (0) the stride-32
    map alone; a dilated last stage (layer4) halves its stride."""
    strides = [8, 16, 32][:kept_levels] if kept_levels else [32]
    if dilation and kept_levels in (0, 3):
        strides[-1] //= 2
    return strides


def feature_level_strides(num_feature_levels: int, dilation: bool) -> List[int]:
    """Strides of the detector's feature levels: the trunk's maps, then one stride-2 conv per extra level."""
    strides = backbone_strides(min(num_feature_levels, 3) if num_feature_levels > 1 else 0, dilation)
    while len(strides) < num_feature_levels:
        strides.append(strides[-1] * 2)
    return strides


def tokens_of_square_image(side: int, num_feature_levels: int, dilation: bool) -> int:
    """Encoder tokens of a side x side image: every stride-s level is ceil(side / s) wide (each
    stride-2 conv of the trunk and of the extra levels rounds up)."""
    return sum(math.ceil(side / s) ** 2 for s in feature_level_strides(num_feature_levels, dilation))


class Backbone(nn.Module):
    """ResNet trunk returning stride 8/16/32 maps (or stride 32 only) with downsampled masks.

    ``num_levels`` (with ``return_interm_layers``): how many of the stride 8/16/32 maps the detector
    uses. Stages after the last used one are not kept (their parameters would never get a gradient,
    which DistributedDataParallel rejects); None keeps all three.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool, weights: str,
                 norm: str = "frozen_bn", num_levels: Optional[int] = None):
        super().__init__()
        net = build_resnet(name, dilation, weights, norm)
        # pretrained stem and layer1 stay frozen as upstream; from random init everything must learn
        trainable = ("layer2", "layer3", "layer4") if weights != "none" else ("",)
        for pname, param in net.named_parameters():
            if not train_backbone or not any(t in pname for t in trainable):
                param.requires_grad_(False)
        last = 512 if name in ("resnet18", "resnet34") else 2048
        if return_interm_layers:
            kept = 3 if num_levels is None else max(1, min(int(num_levels), 3))
            return_layers = {f"layer{2 + i}": str(i) for i in range(kept)}
            self.num_channels = [last // 4, last // 2, last][:kept]
        else:
            kept = 0
            return_layers = {"layer4": "0"}
            self.num_channels = [last]
        self.strides = backbone_strides(kept, dilation)
        # IntermediateLayerGetter keeps the trunk only up to the last returned stage
        self.body = IntermediateLayerGetter(net, return_layers=return_layers)

    def forward(self, tensor_list: NestedTensor) -> List[NestedTensor]:
        """images (B, 3, H, W) + mask (B, H, W) -> per level features (B, C_l, H_l, W_l) + masks."""
        features: Dict[str, torch.Tensor] = self.body(tensor_list.tensors)
        return [NestedTensor(x, downsample_mask(tensor_list.mask, x.shape[-2:])) for x in features.values()]


class Joiner(nn.Sequential):
    """(backbone, position encoding) so state-dict keys read backbone.0.body.* as upstream."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor):
        features = self[0](tensor_list)
        pos = [self[1](f).to(f.tensors.dtype) for f in features]
        return features, pos


def build_backbone(args) -> Joiner:
    weights = args.backbone_weights
    weights = "none" if isinstance(weights, str) and weights.lower() == "none" else weights
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                        return_interm_layers=args.num_feature_levels > 1, dilation=args.dilation, weights=weights,
                        norm=args.backbone_norm, num_levels=args.num_feature_levels)
    return Joiner(backbone, build_position_encoding(args))
