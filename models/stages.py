"""The stage schedule: how encoder and decoder layers interleave (``--stages``, docs/design.md §4).

A schedule is a list of (E, D) pairs: each stage runs E encoder layers, then D decoder layers on
the memory as it stands. The rules live here, with the model that runs them; the command line
(``cli.config``) reads them.
"""
from typing import List, Tuple


def expand_stages(stages: str, enc_layers: int, dec_layers: int) -> str:
    """The named schedules as E:D lists: 'stock' -> '6:6', 'cascade' -> '1:1,...' (one stage per layer pair)."""
    name = stages.strip()
    if name == "stock":
        return f"{enc_layers}:{dec_layers}"
    if name == "cascade":
        if enc_layers != dec_layers:
            raise ValueError(f"--stages cascade alternates one encoder and one decoder layer: it needs "
                             f"--enc_layers ({enc_layers}) == --dec_layers ({dec_layers})")
        return ",".join(["1:1"] * enc_layers)
    return stages


def parse_stages(stages: str, enc_layers: int, dec_layers: int) -> List[Tuple[int, int]]:
    """'1:1,1:1' -> [(1, 1), (1, 1)]; checks sums against the layer counts."""
    stages = expand_stages(stages, enc_layers, dec_layers)
    pairs = []
    for part in stages.split(","):
        part = part.strip()
        try:
            e, d = part.split(":")
            pairs.append((int(e), int(d)))
        except ValueError:
            raise ValueError(f"--stages '{stages}': '{part}' is not of the form E:D with integers") from None
    for e, d in pairs:
        if e < 0 or d < 0 or e + d == 0:
            raise ValueError(f"--stages '{stages}': each stage needs E, D >= 0 and at least one layer, got {e}:{d}")
    if pairs[-1][1] == 0:
        raise ValueError(f"--stages '{stages}': the last stage runs no decoder layer, so its encoder layers "
                         "could not affect any prediction")
    total_e, total_d = sum(e for e, _ in pairs), sum(d for _, d in pairs)
    if total_e != enc_layers:
        raise ValueError(f"--stages '{stages}': encoder layers sum to {total_e}, but --enc_layers is {enc_layers}")
    if total_d != dec_layers:
        raise ValueError(f"--stages '{stages}': decoder layers sum to {total_d}, but --dec_layers is {dec_layers}")
    return pairs


def guided_encoder_layers(pairs: List[Tuple[int, int]]) -> List[int]:
    """Indices of the encoder layers that run after at least one decoder layer: the only ones the
    decoder can guide (design §4). The one place this rule is written: the transformer guides
    exactly these, the configuration check and the diagnostics ask it."""
    guided, enc_index, seen_decoder = [], 0, False
    for e, d in pairs:
        if seen_decoder:
            guided.extend(range(enc_index, enc_index + e))
        enc_index += e
        seen_decoder = seen_decoder or d > 0
    return guided
