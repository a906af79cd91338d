"""Encoder reference points generated from the decoder (docs/design.md §6, seed versions v3.0.1-v3.0.4).

Per forward pass the transformer asks the generator for a ``GuidanceState``; after every
decoder layer it calls ``state.observe(locations, weights, candidates)`` and before every
encoder layer ``state.references(stock_references)``.

per_level (v3.0.1): the L best candidates by class score; candidate i's box centre is every
    token's reference on level i -> (bs, T, L, 2).
per_point (v3.0.2-v3.0.4): per token, the P queries with the largest (combined)
    cross-attention weight M[t, q] (or weight x class score); query p's centre, projected onto
    every level, is point p's reference -> (bs, T, L, P, 2). A query fills at most one slot of a
    token (in the mixed form its two predictions share one map column and give one candidate).
    Empty slots fall back to the token's own location; ``ref_keep_self`` reserves point 0 for it.

The reference diagnostics (``models/diagnostics``) may set ``EncoderReferenceGenerator.picks_listener``
while they record a pass; it then receives each update's ``GuidancePicks`` (which candidate filled
which slot). Unset, it costs one attribute check per update.

Candidates (``make_candidates``) are the same in training and inference when the model keeps
its one-to-many queries / stream running at inference for them (``reads_one2many``).

The per-token top-P is sparse and free of host synchronisation: the combined map is a
row-merged footprint (one row per query, tokens unique per row), each entry gets one int64
key that orders it by (weight, class score), and P rounds of a per-token scatter-max pick the
winners. Nothing of size T x Q is built and no Python loop runs over tokens or queries.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .cross_attn_map import CrossAttnMapAccumulator, attention_footprint
from .level_layout import LevelLayout
from .research_settings import REF_QUERY_SETS, check_choice, check_research_settings

__all__ = ["CandidateSet", "make_candidates", "EncoderReferenceGenerator", "GuidanceState", "GuidancePicks",
           "build_enc_reference_generator"]


@dataclass
class CandidateSet:
    """Boxes a token may take its references from.

    boxes: (bs, C, 4) cxcywh, normalised to the valid image region (may carry gradient).
    scores: (bs, C) class score, max sigmoid over classes (used for ranking only).

    Per-point guidance ranks queries: candidate c is query c, so it reads map column c (the
    candidates are always the first C columns). Per-level guidance ranks predictions and reads
    no map, so there C may exceed the number of columns (mixed form: 2Q predictions).
    """
    boxes: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self):
        if self.boxes.dim() != 3 or self.boxes.shape[-1] != 4:
            raise ValueError(f"CandidateSet: boxes must be (bs, C, 4), got {tuple(self.boxes.shape)}")
        if tuple(self.scores.shape) != tuple(self.boxes.shape[:2]):
            raise ValueError(f"CandidateSet: scores must be {tuple(self.boxes.shape[:2])}, "
                             f"got {tuple(self.scores.shape)}")

    @property
    def count(self) -> int:
        return self.boxes.shape[1]


def _class_scores(logits: torch.Tensor) -> torch.Tensor:
    """logits (bs, Q, classes) -> (bs, Q) float32 max sigmoid, detached (ranking only)."""
    return logits.detach().float().sigmoid().amax(-1)


def make_candidates(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, num_queries_one2one: int,
                    ref_queries: str = "all", one2many_logits: Optional[torch.Tensor] = None,
                    one2many_boxes: Optional[torch.Tensor] = None, per_query: bool = True) -> CandidateSet:
    """Candidates from one decoder layer's predictions (docs/design.md §6).

    Hybrid form (H-DETR): pred_logits (bs, Q, classes) and pred_boxes (bs, Q, 4) hold all
    queries, one-to-one group first; 'o2o' keeps the first ``num_queries_one2one``.
    Mixed form (MS-DETR): one2many_logits/boxes (bs, Q, ...) are the one-to-many predictions of
    the same Q queries. With ``per_query`` (ranking by map weight) each query is one candidate:
    'all' takes the higher-scoring of its two predictions (the one-to-one one on a tie), 'o2o'
    its one-to-one prediction. Without it (v3.0.1 ranks predictions by class score) 'all' gives
    the 2Q predictions, one-to-one first, and 'o2o' the Q one-to-one ones.

    Returns a CandidateSet with C = Q, num_queries_one2one or (mixed, per prediction) 2Q.
    """
    check_choice("ref_queries", ref_queries, REF_QUERY_SETS)
    if (one2many_logits is None) != (one2many_boxes is None):
        raise ValueError("make_candidates: give both one2many_logits and one2many_boxes, or neither")
    scores = _class_scores(pred_logits)
    if one2many_boxes is None or ref_queries == "o2o":
        # hybrid: the one-to-one group is the first block of queries; mixed: the one-to-one head
        keep = num_queries_one2one if one2many_boxes is None and ref_queries == "o2o" else pred_boxes.shape[1]
        return CandidateSet(pred_boxes[:, :keep], scores[:, :keep])
    scores_one2many = _class_scores(one2many_logits)
    if not per_query:
        return CandidateSet(torch.cat([pred_boxes, one2many_boxes], 1), torch.cat([scores, scores_one2many], 1))
    # mixed form, one candidate per query (map column): its better prediction
    take_one2many = scores_one2many > scores
    boxes = torch.where(take_one2many[..., None], one2many_boxes, pred_boxes)
    return CandidateSet(boxes, torch.maximum(scores, scores_one2many))


@dataclass
class GuidancePicks:
    """Which candidate filled each map-derived reference slot in one guidance update.

    Only the reference diagnostics read it (``EncoderReferenceGenerator.picks_listener``).
    decoder_layers: decoder layers observed when the references were made (>= 1).
    candidates: the CandidateSet the slots index.
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


def _descending_order(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """scores (bs, C) -> order (bs, C) best first (ties: lower index first) and its inverse rank (bs, C)."""
    order = scores.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return order, rank


def _centres(candidates: CandidateSet, keep_grad: bool) -> torch.Tensor:
    """(bs, C, 2) box centres; detached unless ``keep_grad`` (--ref_grad)."""
    centres = candidates.boxes[..., :2]
    return centres if keep_grad else centres.detach()


def _entry_keys(weight: torch.Tensor, scores: torch.Tensor, score_rank: torch.Tensor, by_score: bool
                ) -> torch.Tensor:
    """One int64 key per (image, candidate, entry) that orders entries of a token best first.

    weight (bs, C, E) map weight of the candidate's column, scores (bs, C), score_rank (bs, C)
    position in descending score order. The key is the float32 bit pattern of the ranking
    value (weight or weight x score; for non-negative floats the bit pattern orders like the
    value) shifted left, with the inverted score rank below it, so equal ranking values are
    broken by class score and every candidate's key is distinct within a token. Entries with
    zero weight get -1 (never picked). Returns (bs, C, E) int64.
    """
    count = scores.shape[1]
    score_bits = max(1, (count - 1).bit_length())
    value = weight.float()
    if by_score:
        value = value * scores[:, :, None]
    keys = value.contiguous().view(torch.int32).to(torch.int64)
    keys <<= score_bits
    keys |= (count - 1 - score_rank)[:, :, None]
    # zero weight (including -0.0, whose bit pattern would read as negative) means "not attended"
    return keys.masked_fill_(weight <= 0, -1)


def _top_per_token(keys: torch.Tensor, tokens: torch.Tensor, num_tokens: int, rounds: int) -> torch.Tensor:
    """P rounds of per-token max over sparse keyed entries.

    keys (bs, C, E) int64 (-1 = absent; consumed: overwritten in place), tokens (bs, C, E)
    token index in [0, T).
    Returns (bs, T, rounds) int64: the keys of each token's best, second best, ... entries,
    -1 where the token has fewer entries. Keys are unique within a token, so the winner of a
    round is exactly the entry equal to the round's max and can be retired without a sort.
    """
    bs = keys.shape[0]
    offset = torch.arange(bs, device=keys.device).view(bs, 1, 1) * num_tokens
    flat_tokens = (tokens + offset).reshape(-1)
    keys = keys.reshape(-1)
    picked = []
    for step in range(rounds):
        best = torch.full((bs * num_tokens,), -1, dtype=torch.int64, device=keys.device)
        best.scatter_reduce_(0, flat_tokens, keys, "amax")
        picked.append(best)
        if step + 1 < rounds:
            # retire this round's winners
            keys.masked_fill_(keys == best.gather(0, flat_tokens), -1)
    if not picked:
        return keys.new_full((bs, num_tokens, 0), -1)
    return torch.stack(picked, -1).view(bs, num_tokens, rounds)


def _keys_to_candidates(picked: torch.Tensor, order: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """picked (bs, T, P) keys from ``_top_per_token``, order (bs, C) -> candidate index (bs, T, P), valid mask."""
    bs, num_tokens, points = picked.shape
    count = order.shape[1]
    score_bits = max(1, (count - 1).bit_length())
    valid = picked >= 0
    tie = picked & ((1 << score_bits) - 1)
    score_rank = (count - 1 - tie).clamp(0, count - 1)
    chosen = order.gather(1, score_rank.view(bs, -1)).view(bs, num_tokens, points)
    return chosen, valid


class GuidanceState:
    """What one forward pass has learnt from its decoder layers so far (see the module doc)."""

    def __init__(self, generator: "EncoderReferenceGenerator", layout: LevelLayout):
        """layout: the encoder's token axis; its valid ratios (bs, L, 2) project centres onto the levels."""
        if layout.valid_ratios is None:
            raise ValueError("GuidanceState: the layout needs valid_ratios (bs, L, 2)")
        self.generator = generator
        self.layout = layout
        self.valid_ratios = layout.valid_ratios
        self.accumulator = CrossAttnMapAccumulator(generator.attn_map_accum)
        self.candidates: Optional[CandidateSet] = None
        self.observed = 0  # decoder layers seen so far
        self._pending = []  # (locations, weights) of observed layers not yet in the accumulator
        self._cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (stock refs, result)

    def observe(self, sampling_locations: Optional[torch.Tensor], attention_weights: Optional[torch.Tensor],
                candidates: CandidateSet) -> None:
        """Record a decoder layer: its cross-attention (bs, Q, H, L, Pd, 2) / (bs, Q, H, L, Pd) and candidates.

        per_level mode needs no map, so the sampling may be None there.
        """
        if self.generator.needs_map:
            if sampling_locations is None or attention_weights is None:
                raise ValueError("per_point guidance needs the decoder's sampling locations and weights")
            # the footprint is built when references are asked for: the last decoder layer's
            # map is often never used, and with attn_map_accum 'none' only the latest layer matters
            pending = (sampling_locations.detach(), attention_weights.detach())
            self._pending = [pending] if self.generator.attn_map_accum == "none" else self._pending + [pending]
        self.observed += 1
        self.candidates = candidates
        self._cache = None

    def references(self, stock_references: torch.Tensor) -> torch.Tensor:
        """stock_references (bs, T, L, 2), each token's own location per level (valid ratios applied).

        Returns stock_references itself until a decoder layer was observed, then
        (bs, T, L, 2) for per_level or (bs, T, L, P, 2) for per_point. The result is cached
        until the next ``observe`` (the encoder layers of one stage share it).
        """
        if self.candidates is None:
            return stock_references
        if self._cache is not None and self._cache[0] is stock_references:
            return self._cache[1]
        if self.generator.enc_ref_mode == "per_level":
            refs, chosen, valid = self._per_level(stock_references)
        else:
            refs, chosen, valid = self._per_point(stock_references)
        self._cache = (stock_references, refs)
        listener = self.generator.picks_listener
        if listener is not None:
            first_point = int(self.generator.ref_keep_self and self.generator.enc_ref_mode == "per_point")
            listener(GuidancePicks(self.observed, self.candidates, chosen, valid, first_point, refs))
        return refs

    def _per_level(self, stock: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v3.0.1: stock (bs, T, L, 2) -> references (bs, T, L, 2), level i from the i-th best candidate
        by score; with the candidate index per level (bs, T, L) and its validity (all True), expanded views."""
        levels = stock.shape[2]
        cands = self.candidates
        if cands.count < levels:
            raise ValueError(f"per_level guidance picks {levels} candidates but only {cands.count} exist")
        order, _ = _descending_order(cands.scores)
        top = order[:, :levels, None].expand(-1, -1, 2)
        centres = _centres(cands, self.generator.ref_grad).gather(1, top).to(stock.dtype)  # (bs, L, 2)
        refs = centres * self.valid_ratios.to(stock.dtype)
        num_tokens = stock.shape[1]
        chosen = order[:, None, :levels].expand(-1, num_tokens, -1)
        valid = torch.ones((), dtype=torch.bool, device=stock.device).expand(chosen.shape)
        return refs[:, None].expand(-1, num_tokens, -1, -1), chosen, valid

    def _per_point(self, stock: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v3.0.2-4: stock (bs, T, L, 2) -> references (bs, T, L, P, 2) from the per-token top candidates,
        with the candidate index (bs, T, P') and validity (bs, T, P') of the P' map-derived points."""
        gen, cands = self.generator, self.candidates
        bs, num_tokens = stock.shape[:2]
        from_map = gen.n_points - 1 if gen.ref_keep_self else gen.n_points
        own = stock[:, :, :, None, :]  # (bs, T, L, 1, 2)
        chosen, valid = self._rank(num_tokens, from_map)  # (bs, T, P') each
        centres = _centres(cands, gen.ref_grad).to(stock.dtype)
        picked = centres.gather(1, chosen.view(bs, -1, 1).expand(-1, -1, 2)).view(bs, num_tokens, 1, from_map, 2)
        projected = picked * self.valid_ratios.to(stock.dtype)[:, None, :, None, :]
        parts = [own] if gen.ref_keep_self else []
        parts.append(torch.where(valid[:, :, None, :, None], projected, own))
        return torch.cat(parts, 3), chosen, valid

    def _rank(self, num_tokens: int, points: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per token the ``points`` best candidates -> candidate index (bs, T, points), valid (bs, T, points)."""
        cands = self.candidates
        for locations, weights in self._pending:
            self.accumulator.add(*attention_footprint(locations, weights, self.layout))
        self._pending = []
        tokens, weights = self.accumulator.combined()  # (bs, Q, E), tokens unique per row
        # candidate c is query c: its row of the map (the one-to-one group is the first rows)
        tokens, weights = tokens[:, :cands.count], weights[:, :cands.count]
        order, score_rank = _descending_order(cands.scores)
        keys = _entry_keys(weights, cands.scores, score_rank, self.generator.ref_rank == "attn_cls")
        picked = _top_per_token(keys, tokens, num_tokens, points)
        return _keys_to_candidates(picked, order)


class EncoderReferenceGenerator(nn.Module):
    """Reference-point generator of docs/design.md §6 (no parameters, so no state-dict keys).

    Parameters carry their flags' names (``--enc_ref_mode`` -> ``enc_ref_mode``; rules in
    ``models/research_settings.py``): enc_ref_mode 'per_level' (v3.0.1, ref_rank 'cls') or
    'per_point' (v3.0.2-4, ref_rank 'attn' or 'attn_cls'); n_levels L; n_points P (encoder
    points); ref_keep_self: point 0 is the token itself; ref_grad: centres keep their gradient;
    attn_map_accum: map combination across decoder layers; ref_queries: which predictions may be
    candidates ('all' or 'o2o').
    """

    def __init__(self, enc_ref_mode: str, n_levels: int, n_points: int, ref_rank: str = "attn",
                 ref_keep_self: bool = False, ref_grad: bool = False, attn_map_accum: str = "none",
                 ref_queries: str = "all"):
        super().__init__()
        check_research_settings(enc_ref_mode, ref_rank, ref_keep_self, attn_map_accum, ref_queries, n_points)
        self.enc_ref_mode, self.n_levels, self.n_points = enc_ref_mode, n_levels, n_points
        self.ref_rank, self.ref_keep_self, self.ref_grad = ref_rank, ref_keep_self, ref_grad
        self.attn_map_accum, self.ref_queries = attn_map_accum, ref_queries
        # set only while the reference diagnostics record a forward pass: called with the
        # GuidancePicks of every guidance update (never set in training)
        self.picks_listener: Optional[Callable[[GuidancePicks], None]] = None

    @property
    def needs_map(self) -> bool:
        """Whether ``observe`` needs the decoder's sampling (per_level ranks by class score alone)."""
        return self.enc_ref_mode == "per_point"

    def new_state(self, layout: LevelLayout) -> GuidanceState:
        """A fresh per-forward state over the encoder tokens of ``layout`` (with valid ratios)."""
        return GuidanceState(self, layout)

    def candidates(self, decoder_state, num_queries_one2one: int) -> CandidateSet:
        """Candidates from the latest decoder layer of a ``DecoderState`` (its logits/boxes lists).

        One-to-many predictions of the mixed form are used when the latest layer produced them.
        """
        mixed = len(decoder_state.logits_one2many) == len(decoder_state.logits) > 0
        return make_candidates(decoder_state.logits[-1], decoder_state.boxes[-1], num_queries_one2one,
                               self.ref_queries,
                               decoder_state.logits_one2many[-1] if mixed else None,
                               decoder_state.boxes_one2many[-1] if mixed else None,
                               per_query=self.enc_ref_mode == "per_point")

    @property
    def reads_one2many(self) -> bool:
        """Whether candidates include the one-to-many queries (hybrid) or predictions (mixed)."""
        return self.ref_queries == "all"

    def extra_repr(self) -> str:
        return (f"enc_ref_mode={self.enc_ref_mode}, n_levels={self.n_levels}, n_points={self.n_points}, "
                f"ref_rank={self.ref_rank}, ref_keep_self={self.ref_keep_self}, ref_grad={self.ref_grad}, "
                f"attn_map_accum={self.attn_map_accum}, ref_queries={self.ref_queries}")


def build_enc_reference_generator(args) -> EncoderReferenceGenerator:
    """The generator from parsed flags (--enc_ref_mode, --ref_rank, --ref_keep_self, ...)."""
    return EncoderReferenceGenerator(enc_ref_mode=args.enc_ref_mode, n_levels=args.num_feature_levels,
                                     n_points=args.enc_n_points, ref_rank=args.ref_rank,
                                     ref_keep_self=args.ref_keep_self, ref_grad=args.ref_grad,
                                     attn_map_accum=args.attn_map_accum, ref_queries=args.ref_queries)
