"""What a candidate source hands the ranking rule: boxes, their scores and validity, and which
cross-attention map column (decoder query) stands for which candidate.

``make_candidates`` is the decoder's candidate set (design §6): one decoder layer's predictions.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..sparse_rows import reduce_rows

# --ref_queries: which decoder predictions may be candidates (models/research_settings.py reads it)
REF_QUERY_SETS = ("all", "o2o")


@dataclass
class ColumnMap:
    """Which candidate each column of the cross-attention map (one column per decoder query) stands for.

    count: C, the number of candidates.
    assigned: None when column c is candidate c for c < C and the other columns stand for none
        (the decoder source: one candidate per query, the one-to-one group first); else (bs, Q')
        int64, the candidate of column q or -1, with every column >= Q' standing for none.
    """
    count: int
    assigned: Optional[torch.Tensor] = None

    def candidate_rows(self, tokens: torch.Tensor, weights: torch.Tensor, num_tokens: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The map regrouped by candidate: a candidate's weight for a token is the SUM of the map
        entries M[t, q] of the columns q that stand for it.

        tokens, weights: the row-merged map (bs, Q, E) (one row per column, tokens unique per row).
        Returns (tokens, weights, candidate), (candidate, token) pairs unique: with the identity
        relation the first C rows as they are and candidate None (row c is candidate c); else
        (bs, N) entries with their candidate (bs, N) (weight 0 on padding entries).
        """
        if self.assigned is None:
            return tokens[:, :self.count], weights[:, :self.count], None
        bs, columns = self.assigned.shape
        candidate = self.assigned[:, :, None]
        # one key per (candidate, token); columns standing for no candidate go to key range [0, T)
        keys = (candidate + 1) * num_tokens + tokens[:, :columns]
        kept = weights[:, :columns].masked_fill(candidate < 0, 0.0)
        keys, merged = reduce_rows(keys.reshape(bs, -1), kept.reshape(bs, -1), "sum")
        owner = keys // num_tokens - 1
        merged = merged.masked_fill(owner < 0, 0.0)
        return keys % num_tokens, merged, owner.clamp(min=0)

    @staticmethod
    def per_entry(values: torch.Tensor, candidate: Optional[torch.Tensor]) -> torch.Tensor:
        """values (bs, C) of the candidates -> broadcastable to the entries of ``candidate_rows``:
        (bs, C, 1) for the identity relation, else (bs, N)."""
        return values[:, :, None] if candidate is None else values.gather(1, candidate)


@dataclass
class CandidateSet:
    """Boxes a token may take its references from.

    boxes: (bs, C, 4) cxcywh, normalised to the valid image region (may carry gradient).
    scores: (bs, C) class score, max sigmoid over classes (ranking only; zeros for a source
        without scores, whose ties then go to the lower index).
    valid: (bs, C) bool, False on padding candidates of a source with a different number per
        image; None: every candidate is valid.
    columns: how the cross-attention map's columns relate to the candidates (``ColumnMap``);
        None when the candidates are not queries (v3.0.1 ranks predictions, 2Q in the mixed form)
        or the ranking rule reads no map.
    """
    boxes: torch.Tensor
    scores: torch.Tensor
    valid: Optional[torch.Tensor] = None
    columns: Optional[ColumnMap] = None

    def __post_init__(self):
        if self.boxes.dim() != 3 or self.boxes.shape[-1] != 4:
            raise ValueError(f"CandidateSet: boxes must be (bs, C, 4), got {tuple(self.boxes.shape)}")
        for name in ("scores", "valid"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != tuple(self.boxes.shape[:2]):
                raise ValueError(f"CandidateSet: {name} must be {tuple(self.boxes.shape[:2])}, "
                                 f"got {tuple(value.shape)}")

    @property
    def count(self) -> int:
        return self.boxes.shape[1]

    def valid_mask(self) -> torch.Tensor:
        """(bs, C) bool validity (an expanded view of True when every candidate is valid)."""
        if self.valid is not None:
            return self.valid
        return torch.ones((), dtype=torch.bool, device=self.boxes.device).expand(self.boxes.shape[:2])


def _class_scores(logits: torch.Tensor) -> torch.Tensor:
    """logits (bs, Q, classes) -> (bs, Q) float32 max sigmoid, detached (ranking only)."""
    return logits.detach().float().sigmoid().amax(-1)


def make_candidates(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, num_queries_one2one: int,
                    ref_queries: str = "all", one2many_logits: Optional[torch.Tensor] = None,
                    one2many_boxes: Optional[torch.Tensor] = None, per_query: bool = True) -> CandidateSet:
    """Candidates from one decoder layer's predictions (design §6).

    Hybrid form (H-DETR): pred_logits (bs, Q, classes) and pred_boxes (bs, Q, 4) hold all
    queries, one-to-one group first; 'o2o' keeps the first ``num_queries_one2one``.
    Mixed form (MS-DETR): one2many_logits/boxes (bs, Q, ...) are the one-to-many predictions of
    the same Q queries. With ``per_query`` (ranking by map weight) each query is one candidate:
    'all' takes the higher-scoring of its two predictions (the one-to-one one on a tie), 'o2o'
    its one-to-one prediction. Without it (v3.0.1 ranks predictions by class score) 'all' gives
    the 2Q predictions, one-to-one first, and 'o2o' the Q one-to-one ones.

    Returns a CandidateSet with C = Q, num_queries_one2one or (mixed, per prediction) 2Q; with
    ``per_query`` its columns say that map column c is candidate c.
    """
    if ref_queries not in REF_QUERY_SETS:
        raise ValueError(f"--ref_queries must be one of {', '.join(REF_QUERY_SETS)}, got {ref_queries!r}")
    if (one2many_logits is None) != (one2many_boxes is None):
        raise ValueError("make_candidates: give both one2many_logits and one2many_boxes, or neither")
    scores = _class_scores(pred_logits)
    if one2many_boxes is None or ref_queries == "o2o":
        # hybrid: the one-to-one group is the first block of queries; mixed: the one-to-one head
        keep = num_queries_one2one if one2many_boxes is None and ref_queries == "o2o" else pred_boxes.shape[1]
        return _per_query(CandidateSet(pred_boxes[:, :keep], scores[:, :keep]), per_query)
    scores_one2many = _class_scores(one2many_logits)
    if not per_query:
        return CandidateSet(torch.cat([pred_boxes, one2many_boxes], 1), torch.cat([scores, scores_one2many], 1))
    # mixed form, one candidate per query (map column): its better prediction
    take_one2many = scores_one2many > scores
    boxes = torch.where(take_one2many[..., None], one2many_boxes, pred_boxes)
    return _per_query(CandidateSet(boxes, torch.maximum(scores, scores_one2many)), True)


def _per_query(candidates: CandidateSet, per_query: bool) -> CandidateSet:
    """With ``per_query`` the candidates are the first C map columns, in order."""
    if per_query:
        candidates.columns = ColumnMap(candidates.count)
    return candidates
