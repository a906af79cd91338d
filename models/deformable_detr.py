"""The detector: backbone -> input projections -> deformable transformer -> class/box heads.

Covers Deformable DETR (+ box refinement, two-stage), H-DETR's hybrid one-to-many query group
and MS-DETR's mixed supervision. State-dict keys follow those upstream repositories.
"""
import copy
import math
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

from .denoising import DenoisingConfig, make_denoising_queries
from .guidance import GuidanceInputs
from .level_layout import downsample_mask
from .transformer_layers import MLP


def _input_projections(backbone, num_feature_levels: int, hidden_dim: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm per backbone level, then stride-2 3x3 convs for the extra levels."""
    projections = []
    for in_channels in backbone.num_channels[:num_feature_levels]:
        projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
                                         nn.GroupNorm(32, hidden_dim)))
    in_channels = backbone.num_channels[-1]
    for _ in range(num_feature_levels - len(backbone.num_channels)):
        projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(32, hidden_dim)))
        in_channels = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projections)


class DeformableDETR(nn.Module):
    """Deformable-DETR-family detector.

    ``num_queries_one2many`` > 0 adds H-DETR's extra query group (masked from the one-to-one
    group in self-attention). ``use_ms_detr`` makes every query also give a one-to-many
    prediction from the decoder's auxiliary FFN. Both one-to-many forms run in training only,
    unless ``one2many_at_eval``: then they also run at inference because the encoder guidance
    reads them (docs/design.md §6: the same candidates in training and inference); their predictions
    are never returned at inference, so detections always come from the one-to-one queries.
    ``denoising`` (DINO's CDN) adds noised ground-truth queries in training when ``forward`` is
    given the targets; its only parameter is ``label_enc`` (num_classes + 1 rows, as DINO).
    """

    def __init__(self, backbone, transformer, num_classes: int, num_feature_levels: int, num_queries_one2one=300,
                 num_queries_one2many=0, aux_loss=True, with_box_refine=False, two_stage=False,
                 mixed_selection=False, use_ms_detr=False, one2many_at_eval=False,
                 denoising: Optional[DenoisingConfig] = None):
        super().__init__()
        self.num_queries_one2one = num_queries_one2one
        self.num_queries_one2many = num_queries_one2many
        self.one2many_at_eval = one2many_at_eval
        num_queries = num_queries_one2one + num_queries_one2many
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_feature_levels = num_feature_levels
        self.aux_loss, self.two_stage, self.use_ms_detr = aux_loss, two_stage, use_ms_detr
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        elif mixed_selection:
            self.query_embed = nn.Embedding(num_queries, hidden_dim)
        else:
            self.query_embed = None
        self.input_proj = _input_projections(backbone, num_feature_levels, hidden_dim)
        self.backbone = backbone
        self.class_embed, self.bbox_embed = self._build_heads(hidden_dim, num_classes, with_box_refine, two_stage,
                                                              len(transformer.decoder.layers))
        self.denoising = denoising
        if denoising is not None:
            self.label_enc = nn.Embedding(num_classes + 1, hidden_dim)

    @staticmethod
    def _build_heads(hidden_dim, num_classes, with_box_refine, two_stage, num_decoder_layers):
        """One class and box head per decoder layer (+1 for two-stage proposals).

        With box refinement each layer has its own heads; otherwise one pair is shared, repeated
        in the ModuleList so keys read class_embed.N as upstream.
        """
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        prior_prob = 0.01  # focal-loss prior: start every class at a low probability
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_pred = num_decoder_layers + 1 if two_stage else num_decoder_layers
        if with_box_refine:
            class_heads = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            box_heads = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(box_heads[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            class_heads = nn.ModuleList([class_embed] * num_pred)
            box_heads = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            for head in box_heads:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
        return class_heads, box_heads

    def multiscale_features(self, samples: NestedTensor):
        """Images -> per level projected features (bs, C, H_l, W_l), masks (bs, H_l, W_l), positions."""
        features, pos = self.backbone(samples)
        srcs = [self.input_proj[lvl](f.tensors) for lvl, f in enumerate(features[:self.num_feature_levels])]
        masks = [f.mask for f in features[:self.num_feature_levels]]
        pos = list(pos[:self.num_feature_levels])
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
            mask = downsample_mask(samples.mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, pos

    def _hybrid_attn_mask(self, num_queries: int, device) -> Union[torch.Tensor, None]:
        """(Q, Q) bool, True where the one-to-one and one-to-many groups would see each other."""
        if num_queries == self.num_queries_one2one:
            return None
        mask = torch.zeros(num_queries, num_queries, dtype=torch.bool, device=device)
        mask[self.num_queries_one2one:, :self.num_queries_one2one] = True
        mask[:self.num_queries_one2one, self.num_queries_one2one:] = True
        return mask

    def forward(self, samples: Union[NestedTensor, List[torch.Tensor]],
                targets: Optional[List[Dict]] = None, guidance: Optional[GuidanceInputs] = None) -> Dict:
        """samples: NestedTensor (images (bs, 3, H, W), mask (bs, H, W)) or a list of (3, H_i, W_i);
        targets: the batch's ground truth, read only by denoising in training; guidance: what the
        encoder guidance reads beyond the decoder (the ground truth of the oracle source, the random
        ranking's seed), built by ``models.guidance.guidance_inputs`` (None when it reads nothing).

        Returns pred_logits (bs, Q1, K), pred_boxes (bs, Q1, 4) cxcywh in [0, 1] of the valid image,
        aux_outputs, enc_outputs (two-stage) and, in training, the one-to-many predictions and
        (with denoising and targets) dn_outputs: the denoising block's predictions and its 'groups'.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        srcs, masks, pos = self.multiscale_features(samples)
        run_one2many = self.training or self.one2many_at_eval
        num_queries = self.num_queries_one2one + (self.num_queries_one2many if run_one2many else 0)
        query_embed = None if self.query_embed is None else self.query_embed.weight[:num_queries]
        self_attn_mask = self._hybrid_attn_mask(num_queries, srcs[0].device)
        denoising = None
        if self.denoising is not None and self.training and targets is not None:
            denoising = make_denoising_queries(targets, self.denoising, self.label_enc)
            self_attn_mask = denoising.attn_mask(self_attn_mask, num_queries, self.num_queries_one2one)
        state, enc_outputs = self.transformer(
            srcs, masks, pos, query_embed, self.class_embed, self.bbox_embed, num_queries=num_queries,
            num_queries_one2one=self.num_queries_one2one, self_attn_mask=self_attn_mask,
            with_one2many=self.use_ms_detr and run_one2many, denoising=denoising, guidance_inputs=guidance)
        q1 = self.num_queries_one2one
        out = self._pack([l[:, :q1] for l in state.logits], [b[:, :q1] for b in state.boxes], "")
        if self.training:  # at inference one-to-many predictions (when they ran) only fed the guidance
            if self.num_queries_one2many > 0:
                out.update(self._pack([l[:, q1:] for l in state.logits], [b[:, q1:] for b in state.boxes],
                                      "_one2many"))
            if state.logits_one2many:
                out.update(self._pack(state.logits_one2many, state.boxes_one2many, "_one2many"))
        if enc_outputs is not None:
            out["enc_outputs"] = enc_outputs
        if denoising is not None:
            out["dn_outputs"] = {**self._pack(state.denoising.logits, state.denoising.boxes, ""),
                                 "groups": denoising.groups}
        return out

    def _pack(self, logits: List[torch.Tensor], boxes: List[torch.Tensor], suffix: str) -> Dict:
        """Per-layer predictions -> {pred_logits, pred_boxes, aux_outputs} with a key suffix."""
        out = {f"pred_logits{suffix}": logits[-1], f"pred_boxes{suffix}": boxes[-1]}
        if self.aux_loss:
            out[f"aux_outputs{suffix}"] = [{"pred_logits": l, "pred_boxes": b}
                                           for l, b in zip(logits[:-1], boxes[:-1])]
        return out
