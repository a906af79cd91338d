"""Allowed values and combination rules of the encoder-guidance research settings (design §6, §10).

Each setting has one name from flag to constructor (``--enc_ref_mode`` -> ``enc_ref_mode``, ...).
The parser (``cli/config.py``) takes its ``choices`` from here and ``validate_args`` and
``EncoderReferenceGenerator`` both call ``check_research_settings``, so every value list and
every rule is written once. The candidate sources and ranking rules are the parts registered in
``models/guidance/registry.py``: their names and what each reads come from there, the rules that
combine them are written here.
"""
from typing import Optional

from .guidance.candidates import REF_QUERY_SETS
from .guidance.registry import RANKINGS, SOURCES

# 'none' (stock token grid, no generator) is a parser value only; the generator needs a mode
ENC_REF_MODES = ("per_level", "per_point")
REF_RANKS = RANKINGS.names()
REF_SOURCES = SOURCES.names()
# no 'mean': dividing the sum by the number of layers rescales every entry alike, so it ranks
# exactly like 'sum' and could never give a different ablation row
ACCUM_MODES = ("none", "sum", "max")

__all__ = ["ENC_REF_MODES", "REF_RANKS", "REF_SOURCES", "REF_QUERY_SETS", "ACCUM_MODES", "check_choice",
           "check_research_settings", "reads_decoder_queries", "guidance_control"]


def check_choice(flag: str, value, allowed) -> None:
    """Raise ValueError naming ``--flag`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")


def reads_decoder_queries(ref_source: str, ref_rank: str) -> bool:
    """Whether the guidance reads the decoder's queries (their predictions or their map columns),
    so that --ref_queries chooses among them and inference may have to run the one-to-many ones."""
    return SOURCES.get(ref_source).predicted or RANKINGS.get(ref_rank).reads_map


def guidance_control(enc_ref_mode: str, ref_source: str) -> Optional[str]:
    """'oracle' when the references come from the ground truth (a control, never a detector:
    it needs the targets at inference too), else None."""
    if enc_ref_mode != "none" and SOURCES.get(ref_source).needs_targets:
        return "oracle"
    return None


def check_research_settings(enc_ref_mode: str, ref_rank: str, ref_keep_self: bool, attn_map_accum: str,
                            ref_queries: str, enc_n_points: int, ref_source: str = "decoder",
                            ref_grad: bool = False) -> None:
    """Raise ValueError, naming the flags, when the settings of a guided encoder do not fit together.

    Called with a guidance mode ('per_level' or 'per_point'), never with 'none'.
    """
    check_choice("enc_ref_mode", enc_ref_mode, ENC_REF_MODES)
    source, ranking = SOURCES.get(ref_source), RANKINGS.get(ref_rank)
    check_choice("attn_map_accum", attn_map_accum, ACCUM_MODES)
    check_choice("ref_queries", ref_queries, REF_QUERY_SETS)
    if enc_ref_mode not in ranking.modes:
        serves = [name for name in REF_RANKS if enc_ref_mode in RANKINGS.get(name).modes]
        raise ValueError(f"--enc_ref_mode {enc_ref_mode} takes --ref_rank {' or '.join(serves)}, not {ref_rank}")
    if ranking.reads_scores and not source.predicted:
        raise ValueError(f"--ref_rank {ref_rank} ranks by class score, but --ref_source {ref_source} candidates "
                         "have none")
    if attn_map_accum != "none" and not ranking.reads_map:
        raise ValueError(f"--attn_map_accum {attn_map_accum} combines cross-attention maps, but --ref_rank "
                         f"{ref_rank} reads no map")
    if ref_queries != "all" and not reads_decoder_queries(ref_source, ref_rank):
        raise ValueError(f"--ref_queries {ref_queries} chooses decoder queries, but --ref_source {ref_source} "
                         f"with --ref_rank {ref_rank} reads none")
    if ref_grad and not source.predicted:
        raise ValueError(f"--ref_grad keeps the gradient of predicted centres, but --ref_source {ref_source} "
                         "candidates are not predicted")
    if ref_keep_self and enc_ref_mode != "per_point":
        raise ValueError("--ref_keep_self needs --enc_ref_mode per_point")
    if ref_keep_self and enc_n_points < 2:
        raise ValueError("--ref_keep_self keeps point 0 for the token itself: needs --enc_n_points >= 2")
