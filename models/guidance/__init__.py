"""Encoder guidance as composable parts (design §6, §10): a candidate source and a ranking rule.

    candidates.py     CandidateSet (boxes, scores, validity, map columns), make_candidates
    sources.py        candidate sources: the decoder's predictions, the ground truth (a control)
    rankings.py       ranking rules: class score, map weight (x score), random, distance
    top_per_token.py  the sparse per-token top-k behind the map rankings
    registry.py       the one table of parts by name (the parser's choices and the rules read it)
    inputs.py         GuidanceInputs: what the guidance reads beyond the decoder (targets, a seed)

``models/enc_reference.py`` composes a source and a ranking rule into the reference generator.
"""
from .candidates import REF_QUERY_SETS, CandidateSet, ColumnMap, make_candidates
from .inputs import GuidanceInputs, guidance_inputs, guidance_needs
from .registry import RANKINGS, SOURCES, Ranking, Registry, Source

__all__ = ["REF_QUERY_SETS", "CandidateSet", "ColumnMap", "make_candidates", "GuidanceInputs", "guidance_inputs",
           "guidance_needs", "RANKINGS", "SOURCES", "Ranking", "Registry", "Source"]
