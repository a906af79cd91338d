"""Deformable transformer run as a stage schedule of encoder and decoder layers.

``--stages 6:6`` is the stock detector: all encoder layers, then all decoder layers. Other
schedules interleave them (``1:1,...``) so decoder outputs exist while the encoder still runs;
an encoder reference generator (``models/enc_reference.py``) may then turn the decoder's
cross-attention into encoder reference points. Without it every encoder layer samples around
its own token location, as upstream.
"""
import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from util.box_ops import box_dtype, inverse_sigmoid

from .denoising import DenoisingPredictions, DenoisingQueries, append_denoising_queries
from .guidance import GuidanceInputs
from .level_layout import LevelLayout, valid_size
from .ms_deform_attn import MSDeformAttn
from .position_encoding import box_sine_embedding
from .stages import guided_encoder_layers
from .transformer_layers import DeformableDecoderLayer, DeformableEncoderLayer


@dataclass
class FlatInputs:
    """All levels flattened into one token axis (T = sum of H_l * W_l)."""
    src: torch.Tensor                 # (bs, T, C)
    pos: torch.Tensor                 # (bs, T, C) position + level embedding
    layout: LevelLayout               # shapes, start indices, padding mask (bs, T), valid ratios (bs, L, 2)


@dataclass
class DecoderState:
    """Queries and references carried from one decoder layer to the next, plus per-layer outputs."""
    tgt: torch.Tensor                 # (bs, Q, C) content
    query_pos: torch.Tensor           # (bs, Q, C)
    reference: torch.Tensor           # (bs, Q, 2|4) input reference of the next layer (detached when refined)
    box_reference: torch.Tensor       # (bs, Q, 2|4) what the next layer's box delta is added to
    logits: List[torch.Tensor] = field(default_factory=list)          # per layer (bs, Q, K)
    boxes: List[torch.Tensor] = field(default_factory=list)           # per layer (bs, Q, 4)
    logits_one2many: List[torch.Tensor] = field(default_factory=list)
    boxes_one2many: List[torch.Tensor] = field(default_factory=list)
    denoising: Optional[DenoisingPredictions] = None  # CDN block at the end of the query axis (training)


def fp32_head(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A box-path head run in float32 or wider, also under autocast: (..., C) -> (..., out) in
    ``box_dtype(features.dtype)`` (float32; float64 for a float64 model).

    Boxes are refined additively over every decoder layer in logit space; in bf16 each step
    would round the box to ~2^-9 of the image, so the box path (docs/design.md §6, Precision) stays fp32.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        return head(features.to(box_dtype(features.dtype)))


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Box delta (bs, Q, 4) applied to a reference (bs, Q, 4) box or (bs, Q, 2) point -> (bs, Q, 4) in [0, 1]."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def encoder_reference_points(layout: LevelLayout) -> torch.Tensor:
    """Each token's own centre, expressed on every level: (bs, T, L, 2), normalised (x, y), in the
    valid ratios' dtype (float32, or float64 for a float64 model).

    A token's position is normalised by its level's valid size, then multiplied by each level's
    valid ratio, so it lands on the same image point on every level.
    """
    refs = []
    valid_ratios = layout.valid_ratios
    device, dtype = valid_ratios.device, valid_ratios.dtype
    for lvl, (h, w) in enumerate(layout.shapes):
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
                                torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device), indexing="ij")
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((xs, ys), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class DeformableTransformer(nn.Module):
    """Encoder and decoder layers with the schedule, two-stage proposals and query initialisation.

    The prediction heads belong to the detector and are passed to ``forward``: the decoder needs
    them for box refinement, two-stage proposals and encoder guidance, but does not own them
    (so no duplicate head keys appear in the state dict).
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, num_feature_levels=4, dec_n_points=4, enc_n_points=4, two_stage=False,
                 with_box_refine=False, look_forward_twice=False, mixed_selection=False, use_ms_detr=False,
                 use_aux_ffn=True, stages: Optional[List[Tuple[int, int]]] = None, enc_ref_progressive=False,
                 enc_reference_generator: Optional[nn.Module] = None):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.two_stage, self.with_box_refine = two_stage, with_box_refine
        self.look_forward_twice, self.mixed_selection = look_forward_twice, mixed_selection
        self.stages = stages or [(num_encoder_layers, num_decoder_layers)]
        self.guided_layers = frozenset(guided_encoder_layers(self.stages))
        self.enc_ref_progressive = enc_ref_progressive
        self.enc_reference_generator = enc_reference_generator
        enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points,
                                           use_ms_detr=use_ms_detr, use_aux_ffn=use_aux_ffn)
        self.encoder = _LayerStack(enc_layer, num_encoder_layers)
        self.decoder = _LayerStack(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    # ------------------------------------------------------------------ inputs

    def flatten_inputs(self, srcs, masks, pos_embeds) -> FlatInputs:
        """Per-level (bs, C, H_l, W_l) maps, (bs, H_l, W_l) masks and positions -> FlatInputs."""
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        pos_flat = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, pos in enumerate(pos_embeds)], 1)
        return FlatInputs(src_flat, pos_flat, LevelLayout.from_masks(masks, box_dtype(src_flat.dtype)))

    # ------------------------------------------------------------------ queries

    def proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Unactivated boxes (bs, Q, 4) -> sine embedding (bs, Q, 2 * d_model)."""
        return box_sine_embedding(proposals.sigmoid(), 2 * self.d_model)

    def encoder_proposals(self, memory: torch.Tensor, layout: LevelLayout):
        """One fixed-size box per token -> (transformed memory (bs, T, C), proposals (bs, T, 4) unactivated).

        Proposals too close to the border or on padding get +inf so they never win top-k. They are
        in ``box_dtype(memory.dtype)``: float32, or float64 for a float64 model.
        """
        bs = memory.shape[0]
        dtype = box_dtype(memory.dtype)
        proposals = []
        for lvl, (h, w) in enumerate(layout.shapes):
            ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=dtype, device=memory.device),
                                    torch.linspace(0, w - 1, w, dtype=dtype, device=memory.device),
                                    indexing="ij")
            grid = torch.stack([xs, ys], -1)
            # grid cells normalised by the level's image part, not by its padded size
            scale = valid_size(layout.level_padding(lvl)).to(dtype).view(bs, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(bs, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(bs, -1, 4))
        proposals = torch.cat(proposals, 1)
        keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(layout.padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~keep, float("inf"))
        memory = memory.masked_fill(layout.padding_mask.unsqueeze(-1), 0.0).masked_fill(~keep, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def init_queries(self, memory, layout: LevelLayout, query_embed, class_embed, bbox_embed, num_queries):
        """Start the decoder: learned queries, or (two-stage) the top encoder proposals.

        Returns (DecoderState, enc_outputs dict or None).
        """
        bs, _, c = memory.shape
        if not self.two_stage:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference = fp32_head(self.reference_points, query_pos).sigmoid()
            return DecoderState(tgt, query_pos, reference, reference), None
        if memory.shape[1] < num_queries:
            raise ValueError(f"two-stage: {num_queries} queries requested but the image has only "
                             f"{memory.shape[1]} tokens; use larger images or fewer queries")
        output_memory, proposals = self.encoder_proposals(memory, layout)
        head = len(self.decoder.layers)  # the extra head after the decoder heads scores proposals
        # fp32 scores too: they choose which proposals become queries
        enc_logits = fp32_head(class_embed[head], output_memory)
        enc_coords_unact = fp32_head(bbox_embed[head], output_memory) + proposals
        topk = torch.topk(enc_logits[..., 0], num_queries, dim=1)[1]
        topk_coords_unact = torch.gather(enc_coords_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
        reference = topk_coords_unact.sigmoid()
        pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact)))
        if self.mixed_selection:
            # positions from the proposals, content from the learned embedding
            query_pos = pos_trans[..., :c]
            tgt = query_embed.unsqueeze(0).expand(bs, -1, -1)
        else:
            query_pos, tgt = torch.split(pos_trans, c, dim=2)
        enc_outputs = {"pred_logits": enc_logits, "pred_boxes": enc_coords_unact.sigmoid(),
                       "anchors": proposals.sigmoid()}
        return DecoderState(tgt, query_pos, reference, reference), enc_outputs

    # ------------------------------------------------------------------ layers

    def run_decoder_layer(self, lid, state: DecoderState, memory, layout: LevelLayout, class_embed, bbox_embed,
                          self_attn_mask, with_one2many: bool):
        """Run decoder layer ``lid``, predict classes and boxes, advance the references."""
        ref = state.reference
        valid_ratios = layout.valid_ratios
        scale = torch.cat([valid_ratios, valid_ratios], -1) if ref.shape[-1] == 4 else valid_ratios
        out = self.decoder.layers[lid](state.tgt, state.query_pos, ref[:, :, None] * scale[:, None], memory, layout,
                                       self_attn_mask=self_attn_mask, with_one2many=with_one2many)
        delta = fp32_head(bbox_embed[lid], out.hidden)
        box_from_input = refine_boxes(delta, ref)
        # look-forward-twice: the loss of layer i also trains layer i-1's box through its prediction
        loss_reference = state.box_reference if self.look_forward_twice else ref
        boxes = refine_boxes(delta, loss_reference) if self.look_forward_twice else box_from_input
        logits = class_embed[lid](out.hidden)
        if state.denoising is not None:
            # the one place denoising queries leave: nothing below (matching outputs, guidance) sees them
            out, logits, boxes = state.denoising.split_off(out, logits, boxes)
        state.logits.append(logits)
        state.boxes.append(boxes)
        if out.hidden_one2many is not None:
            state.logits_one2many.append(class_embed[lid](out.hidden_one2many))
            # the one-to-many stream has no denoising block: its queries are the first ones
            o2m_reference = loss_reference[:, :out.hidden_one2many.shape[1]]
            state.boxes_one2many.append(refine_boxes(fp32_head(bbox_embed[lid], out.hidden_one2many),
                                                     o2m_reference))
        if self.with_box_refine:
            state.reference = box_from_input.detach()
            state.box_reference = box_from_input
        state.tgt = out.hidden
        return out

    def forward(self, srcs, masks, pos_embeds, query_embed, class_embed: nn.ModuleList, bbox_embed: nn.ModuleList,
                num_queries: int, num_queries_one2one: int, self_attn_mask=None, with_one2many: bool = False,
                denoising: Optional[DenoisingQueries] = None, guidance_inputs: Optional[GuidanceInputs] = None):
        """srcs/pos_embeds: per level (bs, C, H_l, W_l); masks (bs, H_l, W_l); query_embed (Q, 2C) or
        (Q, C) with mixed selection, or None; denoising: CDN queries appended after the Q matching
        ones (``self_attn_mask`` then covers Q + D); guidance_inputs: what the encoder guidance reads
        beyond the decoder (``models.guidance.guidance_inputs``). Returns (DecoderState with per-layer
        predictions, enc_outputs or None)."""
        inputs = self.flatten_inputs(srcs, masks, pos_embeds)
        layout = inputs.layout
        stock_refs = encoder_reference_points(layout)
        guidance = None
        if self.enc_reference_generator is not None:
            guidance = self.enc_reference_generator.new_state(layout, guidance_inputs)
        memory, state, enc_outputs = inputs.src, None, None
        enc_lid = dec_lid = 0
        previous_locations = None  # sampling locations of the last encoder layer, for progressive refs
        for n_enc, n_dec in self.stages:
            for _ in range(n_enc):
                if previous_locations is not None:
                    refs = previous_locations
                elif guidance is not None and enc_lid in self.guided_layers:
                    refs = guidance.references(stock_refs)
                else:
                    refs = stock_refs
                out = self.encoder.layers[enc_lid](memory, inputs.pos, refs, layout)
                memory, enc_lid = out.memory, enc_lid + 1
                if self.enc_ref_progressive:
                    previous_locations = out.sampling_locations.detach()
            if n_dec and state is None:
                state, enc_outputs = self.init_queries(memory, layout, query_embed, class_embed, bbox_embed,
                                                       num_queries)
                if denoising is not None:
                    state = append_denoising_queries(self, state, denoising)
            for _ in range(n_dec):
                out = self.run_decoder_layer(dec_lid, state, memory, layout, class_embed, bbox_embed,
                                             self_attn_mask, with_one2many)
                dec_lid += 1
                if guidance is not None:
                    guidance.observe(out.sampling_locations, out.attention_weights,
                                     guidance.candidates_from(state, num_queries_one2one))
        return state, enc_outputs


class _LayerStack(nn.Module):
    """Independent copies of one layer (keys: layers.N.*)."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
