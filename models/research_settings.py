"""Allowed values and combination rules of the encoder-guidance research settings (docs/design.md §6).

Each setting has one name from flag to constructor (``--enc_ref_mode`` -> ``enc_ref_mode``, ...).
The parser (``cli/config.py``) takes its ``choices`` from here and ``validate_args`` and
``EncoderReferenceGenerator`` both call ``check_research_settings``, so every value list and
every rule is written once. No torch import: the parser loads this module.
"""

# 'none' (stock token grid, no generator) is a parser value only; the generator needs a mode
ENC_REF_MODES = ("per_level", "per_point")
REF_RANKS = ("cls", "attn", "attn_cls")
REF_QUERY_SETS = ("all", "o2o")
# no 'mean': dividing the sum by the number of layers rescales every entry alike, so it ranks
# exactly like 'sum' and could never give a different ablation row
ACCUM_MODES = ("none", "sum", "max")


def check_choice(flag: str, value, allowed) -> None:
    """Raise ValueError naming ``--flag`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")


def check_research_settings(enc_ref_mode: str, ref_rank: str, ref_keep_self: bool, attn_map_accum: str,
                            ref_queries: str, enc_n_points: int) -> None:
    """Raise ValueError, naming the flags, when the settings of a guided encoder do not fit together.

    Called with a guidance mode ('per_level' or 'per_point'), never with 'none'.
    """
    check_choice("enc_ref_mode", enc_ref_mode, ENC_REF_MODES)
    check_choice("ref_rank", ref_rank, REF_RANKS)
    check_choice("attn_map_accum", attn_map_accum, ACCUM_MODES)
    check_choice("ref_queries", ref_queries, REF_QUERY_SETS)
    if enc_ref_mode == "per_level" and ref_rank != "cls":
        raise ValueError("--enc_ref_mode per_level (v3.0.1) ranks candidates by class score: use --ref_rank cls")
    if enc_ref_mode == "per_point" and ref_rank == "cls":
        raise ValueError("--enc_ref_mode per_point ranks candidates per token by map weight: "
                         "--ref_rank attn or attn_cls")
    if enc_ref_mode == "per_level" and attn_map_accum != "none":
        raise ValueError(f"--attn_map_accum {attn_map_accum} combines cross-attention maps, but "
                         "--enc_ref_mode per_level ranks by class score and reads no map")
    if ref_keep_self and enc_ref_mode != "per_point":
        raise ValueError("--ref_keep_self needs --enc_ref_mode per_point")
    if ref_keep_self and enc_n_points < 2:
        raise ValueError("--ref_keep_self keeps point 0 for the token itself: needs --enc_n_points >= 2")
