"""CPU benchmark of the encoder guidance (v3.0.4) against the decoder work that produces its map.

    python scripts/bench_guidance.py [--threads N] [--repeats N] [--bs N] [--queries N] [--layers N]

Prints one line per measurement (best of --repeats rounds, in ms) at COCO scale: 800 x 1333
input, levels of strides 8, 16, 32, 64; 1800 queries (H-DETR's 300 + 1500). Compares the
operator, the attention module and a decoder layer with one layer's footprint and with the
guidance (observe + references) for every --attn_map_accum mode after 1 and --layers layers.
Numbers depend on the machine's load: run it alone.
"""
import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # standalone: make the repository importable
    sys.path.insert(0, ROOT)

from models.cross_attn_map import attention_footprint  # noqa: E402
from models.enc_reference import EncoderReferenceGenerator, make_candidates  # noqa: E402
from models.level_layout import LevelLayout  # noqa: E402
from models.ms_deform_attn import MSDeformAttn  # noqa: E402
from models.research_settings import ACCUM_MODES  # noqa: E402
from models.transformer_layers import DeformableDecoderLayer  # noqa: E402
from ops import ms_deform_attn_pytorch  # noqa: E402

COCO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800 x 1333 input, strides 8, 16, 32, 64


def best_times(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Best wall time (ms) of each run over ``repeats`` rounds after one warm-up round.

    Every measurement runs once per round, so a load change on a shared machine hits all alike.
    """
    best = {name: float("inf") for name in runs}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def benchmark(bs: int = 2, num_q: int = 1800, heads: int = 8, points: int = 4, channels: int = 32,
              repeats: int = 5, layers: int = 3, shapes: Sequence[Tuple[int, int]] = tuple(COCO_LEVELS),
              ffn: int = 1024) -> Dict[str, float]:
    """Timings (ms) of the guidance work vs the decoder layer that produces one map; prints them too."""
    torch.manual_seed(0)
    levels, d_model = len(shapes), heads * channels
    total = sum(h * w for h, w in shapes)
    layout = LevelLayout.from_shapes(shapes, padding_mask=torch.zeros(bs, total, dtype=torch.bool),
                                     valid_ratios=torch.ones(bs, levels, 2))
    value = torch.randn(bs, total, heads, channels)
    memory, query = value.reshape(bs, total, d_model), torch.randn(bs, num_q, d_model)
    stock, box_refs = torch.rand(bs, total, levels, 2), torch.rand(bs, num_q, levels, 2)
    # decoder-like sampling: every query's samples cluster around its box
    samples = [(torch.rand(bs, num_q, 1, 1, 1, 2) + 0.02 * torch.randn(bs, num_q, heads, levels, points, 2),
                torch.rand(bs, num_q, heads, levels, points).softmax(-1)) for _ in range(layers)]
    cands = make_candidates(torch.randn(bs, num_q, 3), torch.rand(bs, num_q, 4), num_q)
    loc, attn = samples[0]
    module = MSDeformAttn(d_model, levels, heads, points)
    decoder_layer = DeformableDecoderLayer(d_model, ffn, 0.0, levels, heads, points).eval()
    runs: Dict[str, Callable[[], object]] = {
        "operator forward (ms_deform_attn_pytorch)": lambda: ms_deform_attn_pytorch(
            value, layout.spatial_shapes, layout.level_start_index, loc, attn, spatial_shapes_list=layout.shapes),
        "MSDeformAttn module forward": lambda: module(query, box_refs, memory, layout),
        f"decoder layer forward (FFN {ffn})": lambda: decoder_layer(query, query, box_refs, memory, layout),
        "attention_footprint (1 layer)": lambda: attention_footprint(loc, attn, layout),
    }

    def guided(accum: str, observed: List[Tuple[torch.Tensor, torch.Tensor]]):
        generator = EncoderReferenceGenerator("per_point", levels, points, "attn", ref_keep_self=True,
                                              attn_map_accum=accum)
        state = generator.new_state(layout)
        for layer_loc, layer_attn in observed:
            state.observe(layer_loc, layer_attn, cands)
        return state.references(stock)

    for accum in ACCUM_MODES:
        for count in sorted({1, layers}):
            runs[f"v3.0.4 accum={accum}: observe x{count} + references"] = (
                lambda accum=accum, count=count: guided(accum, samples[:count]))
    best = best_times(runs, repeats)
    print(f"bs {bs}, T {total}, Q {num_q}, heads {heads}, levels {levels}, points {points}, "
          f"footprint entries/layer {bs * num_q * heads * levels * points * 4}, threads {torch.get_num_threads()}")
    for name, ms in best.items():
        print(f"{name:55s} {ms:8.1f} ms")
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--queries", type=int, default=1800)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers observed before references")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark(bs=args.bs, num_q=args.queries, repeats=args.repeats, layers=args.layers)


if __name__ == "__main__":
    main()
