"""Encoder reference points generated from the decoder (design §6, seed versions v3.0.1-v3.0.4, §10 controls).

The generator composes two registered parts (``models/guidance``): a candidate source
(``--ref_source``: the decoder's predictions, or the ground truth as an oracle control) and a
ranking rule (``--ref_rank``: class score, map weight, map weight x score, random, distance).
Per forward pass the transformer asks it for a ``GuidanceState``; after every decoder layer it
calls ``state.observe(locations, weights, state.candidates_from(decoder_state, ...))`` and before
every guided encoder layer (``models.stages.guided_encoder_layers``) ``state.references(stock)``.

per_level (v3.0.1): the L best candidates by class score; candidate i's box centre is every
    token's reference on level i -> (bs, T, L, 2).
per_point (v3.0.2-v3.0.4 and the controls): per token, the P candidates the ranking rule puts
    first; candidate p's centre, projected onto every level, is point p's reference ->
    (bs, T, L, P, 2). A candidate fills at most one slot of a token. Empty slots fall back to the
    token's own location; ``ref_keep_self`` reserves point 0 for it.

The recorder of a forward pass (``models/recording.py``) sets ``EncoderReferenceGenerator.picks_listener``
while it records; it then receives each update's ``GuidancePicks`` (which candidate filled which
slot). Unset, it costs one attribute check per update.

Candidates are the same in training and inference when the model keeps its one-to-many queries /
stream running at inference for them (``reads_one2many``).
"""
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .cross_attn_map import CrossAttnMapAccumulator, attention_footprint
from .guidance import RANKINGS, SOURCES, CandidateSet, GuidanceInputs, make_candidates
from .level_layout import LevelLayout
from .research_settings import check_research_settings, reads_decoder_queries

__all__ = ["CandidateSet", "make_candidates", "EncoderReferenceGenerator", "GuidanceState", "GuidancePicks",
           "build_enc_reference_generator"]


@dataclass
class GuidancePicks:
    """Which candidate filled each map-derived reference slot in one guidance update.

    Only a recorded forward pass sees it (``EncoderReferenceGenerator.picks_listener``, ``models.recording``).
    decoder_layers: decoder layers observed when the references were made (>= 1).
    candidates: the CandidateSet the slots index (its ``valid`` marks padding candidates).
    chosen: (bs, T, S) int64 candidate index per slot; meaningless where not ``valid``.
    valid: (bs, T, S) bool, False where the slot fell back to the token's own location.
    first_point: per_point, the reference point that slot 0 fills (1 with ref_keep_self, else 0);
        per_level, S = L and slot i is level i's reference (first_point 0).
    references: the reference tensor this update returned (what the encoder layers receive).
    """
    decoder_layers: int
    candidates: CandidateSet
    chosen: torch.Tensor
    valid: torch.Tensor
    first_point: int
    references: torch.Tensor


def _centres(candidates: CandidateSet, keep_grad: bool) -> torch.Tensor:
    """(bs, C, 2) box centres; detached unless ``keep_grad`` (--ref_grad)."""
    centres = candidates.boxes[..., :2]
    return centres if keep_grad else centres.detach()


class GuidanceState:
    """What one forward pass has learnt from its decoder layers so far (see the module doc).

    It is also what a ranking rule reads (``models/guidance/rankings.py``): ``candidates``,
    ``num_tokens``, ``padding_mask``, ``combined_map()``, ``token_positions()``, ``random_generator()``.
    """

    def __init__(self, generator: "EncoderReferenceGenerator", layout: LevelLayout,
                 inputs: Optional[GuidanceInputs] = None):
        """layout: the encoder's token axis; its valid ratios (bs, L, 2) project centres onto the levels.
        inputs: what the parts read beyond the decoder (ground truth, seed); checked here."""
        if layout.valid_ratios is None:
            raise ValueError("GuidanceState: the layout needs valid_ratios (bs, L, 2)")
        if generator.source.needs_targets and (inputs is None or inputs.gt_boxes is None):
            raise ValueError(f"--ref_source {generator.ref_source} reads the ground truth: call the model with "
                             "guidance=guidance_inputs(config, targets, ...) (models.guidance)")
        if generator.ranking.reads_seed and (inputs is None or inputs.seed is None):
            raise ValueError(f"--ref_rank {generator.ref_rank} draws random numbers: call the model with "
                             "guidance=guidance_inputs(config, targets, seed_parts) (models.guidance)")
        if inputs is not None and inputs.gt_boxes is not None:
            if inputs.gt_boxes.shape[0] != layout.valid_ratios.shape[0]:
                raise ValueError(f"guidance inputs: ground truth of {inputs.gt_boxes.shape[0]} images for a batch of "
                                 f"{layout.valid_ratios.shape[0]}")
            device = layout.valid_ratios.device  # pictures and diagnostics may hand over CPU targets
            inputs = dataclasses.replace(inputs, gt_boxes=inputs.gt_boxes.to(device),
                                         gt_valid=inputs.gt_valid.to(device))
        self.generator = generator
        self.layout = layout
        self.valid_ratios = layout.valid_ratios
        self.inputs = inputs
        self.accumulator = CrossAttnMapAccumulator(generator.attn_map_accum)
        self.candidates: Optional[CandidateSet] = None
        self.observed = 0  # decoder layers seen so far
        self._pending = []  # (locations, weights) of observed layers not yet in the accumulator
        self._cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (stock refs, result)
        self._stock: Optional[torch.Tensor] = None  # the stock references being ranked for
        self._random: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ the transformer's calls

    def observe(self, sampling_locations: Optional[torch.Tensor], attention_weights: Optional[torch.Tensor],
                candidates: CandidateSet) -> None:
        """Record a decoder layer: its cross-attention (bs, Q, H, L, Pd, 2) / (bs, Q, H, L, Pd) and candidates.

        A ranking rule that reads no map needs no sampling, so it may be None there.
        """
        if self.generator.needs_map:
            if sampling_locations is None or attention_weights is None:
                raise ValueError(f"--ref_rank {self.generator.ref_rank} needs the decoder's sampling locations "
                                 "and weights")
            # the footprint is built when references are asked for: the last decoder layer's
            # map is often never used, and with attn_map_accum 'none' only the latest layer matters
            pending = (sampling_locations.detach(), attention_weights.detach())
            self._pending = [pending] if self.generator.attn_map_accum == "none" else self._pending + [pending]
        self.observed += 1
        self.candidates = candidates
        self._cache = None

    def candidates_from(self, decoder_state, num_queries_one2one: int) -> CandidateSet:
        """The source's candidates after the latest decoder layer, with this forward's inputs."""
        return self.generator.candidates(decoder_state, num_queries_one2one, self.inputs)

    def references(self, stock_references: torch.Tensor) -> torch.Tensor:
        """stock_references (bs, T, L, 2), each token's own location per level (valid ratios applied).

        Returns (bs, T, L, 2) for per_level or (bs, T, L, P, 2) for per_point. The result is cached
        until the next ``observe`` (the encoder layers of one stage share it). Only an encoder layer
        that runs after a decoder layer is guided: the transformer asks for no others.
        """
        if self.candidates is None:
            raise RuntimeError("GuidanceState.references: no decoder layer observed yet (only encoder layers "
                               "after a decoder layer are guided: models.stages.guided_encoder_layers)")
        if self._cache is not None and self._cache[0] is stock_references:
            return self._cache[1]
        gen = self.generator
        self._stock = stock_references
        if gen.enc_ref_mode == "per_level":
            chosen, valid = gen.ranking.rank(self, stock_references.shape[2])
            refs = self._per_level(stock_references, chosen)
        else:
            chosen, valid = gen.ranking.rank(self, gen.n_points - 1 if gen.ref_keep_self else gen.n_points)
            refs = self._per_point(stock_references, chosen, valid)
        self._cache = (stock_references, refs)
        listener = gen.picks_listener
        if listener is not None:
            first_point = int(gen.ref_keep_self and gen.enc_ref_mode == "per_point")
            listener(GuidancePicks(self.observed, self.candidates, chosen, valid, first_point, refs))
        return refs

    # ------------------------------------------------------------------ what the ranking rules read

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def padding_mask(self) -> Optional[torch.Tensor]:
        return self.layout.padding_mask

    def combined_map(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (combined) cross-attention map as a row-merged footprint: tokens, weights (bs, Q, E)."""
        for locations, weights in self._pending:
            self.accumulator.add(*attention_footprint(locations, weights, self.layout))
        self._pending = []
        return self.accumulator.combined()

    def token_positions(self) -> torch.Tensor:
        """(bs, T, 2) each token's own location in valid-region coordinates: its stock reference on
        its own level divided by that level's valid ratio."""
        stock = self._stock
        sizes = self.layout.spatial_shapes.prod(1)  # on the device already: no host-to-device copy
        levels = torch.repeat_interleave(torch.arange(len(self.layout.shapes), device=stock.device), sizes,
                                         output_size=self.num_tokens)
        own = stock.gather(2, levels.view(1, -1, 1, 1).expand(stock.shape[0], -1, 1, 2))[:, :, 0]
        return own / self.valid_ratios.to(stock.dtype)[:, levels]

    def random_generator(self) -> torch.Generator:
        """This forward's generator, seeded from ``inputs.seed`` (one stream for all its updates)."""
        if self._random is None:
            device = self.valid_ratios.device
            self._random = torch.Generator(device=device).manual_seed(self.inputs.seed)
        return self._random

    # ------------------------------------------------------------------ references from picks

    def _per_level(self, stock: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """v3.0.1: stock (bs, T, L, 2), chosen (bs, T, L) -> references (bs, T, L, 2): level i's
        reference is slot i's candidate centre times level i's valid ratio, the same for every token."""
        if chosen.stride(1) != 0:
            raise ValueError("a per_level ranking rule picks per image: its picks (bs, L) expanded over the tokens")
        # gathered once per image, so --ref_grad's gradient sums over the tokens in one place
        refs = _centres(self.candidates, self.generator.ref_grad).gather(1, chosen[:, 0, :, None].expand(-1, -1, 2))
        refs = refs.to(stock.dtype) * self.valid_ratios.to(stock.dtype)
        return refs[:, None].expand(-1, chosen.shape[1], -1, -1)

    def _per_point(self, stock: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """stock (bs, T, L, 2), chosen / valid (bs, T, P') -> references (bs, T, L, P, 2): point p is slot
        p's candidate centre projected onto every level, or the token itself where the slot is empty."""
        gen = self.generator
        bs, num_tokens, from_map = chosen.shape
        own = stock[:, :, :, None, :]  # (bs, T, L, 1, 2)
        centres = _centres(self.candidates, gen.ref_grad).to(stock.dtype)
        picked = centres.gather(1, chosen.reshape(bs, -1, 1).expand(-1, -1, 2)).view(bs, num_tokens, 1, from_map, 2)
        projected = picked * self.valid_ratios.to(stock.dtype)[:, None, :, None, :]
        parts = [own] if gen.ref_keep_self else []
        parts.append(torch.where(valid[:, :, None, :, None], projected, own))
        return torch.cat(parts, 3)


class EncoderReferenceGenerator(nn.Module):
    """Reference-point generator of design §6 (no parameters, so no state-dict keys).

    Parameters carry their flags' names (``--enc_ref_mode`` -> ``enc_ref_mode``; rules in
    ``models/research_settings.py``, parts in ``models/guidance/registry.py``): enc_ref_mode
    'per_level' (v3.0.1) or 'per_point'; n_levels L; n_points P (encoder points); ref_rank: the
    ranking rule; ref_source: the candidate source; ref_keep_self: point 0 is the token itself;
    ref_grad: centres keep their gradient; attn_map_accum: map combination across decoder layers;
    ref_queries: which predictions may be candidates ('all' or 'o2o').
    """

    def __init__(self, enc_ref_mode: str, n_levels: int, n_points: int, ref_rank: str = "attn",
                 ref_keep_self: bool = False, ref_grad: bool = False, attn_map_accum: str = "none",
                 ref_queries: str = "all", ref_source: str = "decoder"):
        super().__init__()
        check_research_settings(enc_ref_mode, ref_rank, ref_keep_self, attn_map_accum, ref_queries, n_points,
                                ref_source, ref_grad)
        self.enc_ref_mode, self.n_levels, self.n_points = enc_ref_mode, n_levels, n_points
        self.ref_rank, self.ref_keep_self, self.ref_grad = ref_rank, ref_keep_self, ref_grad
        self.attn_map_accum, self.ref_queries, self.ref_source = attn_map_accum, ref_queries, ref_source
        self.source, self.ranking = SOURCES.get(ref_source), RANKINGS.get(ref_rank)
        # set only while models.recording records a forward pass: called with the GuidancePicks of
        # every guidance update (never set in training)
        self.picks_listener: Optional[Callable[[GuidancePicks], None]] = None

    @property
    def needs_map(self) -> bool:
        """Whether ``observe`` needs the decoder's sampling (the ranking rule reads the map)."""
        return self.ranking.reads_map

    def new_state(self, layout: LevelLayout, inputs: Optional[GuidanceInputs] = None) -> GuidanceState:
        """A fresh per-forward state over the encoder tokens of ``layout`` (with valid ratios);
        ``inputs``: the forward's ``guidance`` argument."""
        return GuidanceState(self, layout, inputs)

    def candidates(self, decoder_state, num_queries_one2one: int,
                   inputs: Optional[GuidanceInputs] = None) -> CandidateSet:
        """The source's candidates after the latest decoder layer of a ``DecoderState`` (its logits/boxes
        lists; the mixed form's one-to-many predictions when the latest layer produced them)."""
        return self.source.make(decoder_state, num_queries_one2one, self, inputs)

    @property
    def reads_one2many(self) -> bool:
        """Whether candidates include the one-to-many queries (hybrid) or predictions (mixed)."""
        return self.ref_queries == "all" and reads_decoder_queries(self.ref_source, self.ref_rank)

    def extra_repr(self) -> str:
        return (f"enc_ref_mode={self.enc_ref_mode}, n_levels={self.n_levels}, n_points={self.n_points}, "
                f"ref_source={self.ref_source}, ref_rank={self.ref_rank}, ref_keep_self={self.ref_keep_self}, "
                f"ref_grad={self.ref_grad}, attn_map_accum={self.attn_map_accum}, ref_queries={self.ref_queries}")


def build_enc_reference_generator(args) -> EncoderReferenceGenerator:
    """The generator from parsed flags (--enc_ref_mode, --ref_source, --ref_rank, --ref_keep_self, ...)."""
    return EncoderReferenceGenerator(enc_ref_mode=args.enc_ref_mode, n_levels=args.num_feature_levels,
                                     n_points=args.enc_n_points, ref_rank=args.ref_rank,
                                     ref_keep_self=args.ref_keep_self, ref_grad=args.ref_grad,
                                     attn_map_accum=args.attn_map_accum, ref_queries=args.ref_queries,
                                     ref_source=args.ref_source)
