"""Benchmarks behind one entry point; each prints one JSON object per line.

usage: python scripts/benchmark.py model --config FILE [bench flags] [any main.py flag]
           whole training step of the detector (scripts/bench_model.py; --help there)
       python scripts/benchmark.py op [op flags]
           the multi-scale deformable attention operator (scripts/bench_op.py)
       python scripts/benchmark.py infer --config FILE [infer flags] [any main.py flag]
           inference images/s and latency at the evaluation size (scripts/bench_infer.py; --help there)
"""
import importlib
import os
import sys
from typing import List, Optional

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"model": "bench_model", "op": "bench_op", "infer": "bench_infer"}


def _load(name: str):
    """Import a sibling benchmark module only when asked for, so `model` works without the op's deps."""
    for path in (SCRIPTS, os.path.dirname(SCRIPTS)):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module(name)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TARGETS:
        print(__doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    target, rest = argv[0], argv[1:]
    if target in ("model", "infer"):
        return _load(TARGETS[target]).main(rest) or 0
    import argparse
    module = _load("bench_op")
    parser = argparse.ArgumentParser(prog="benchmark.py op", description=(module.__doc__ or "").split("\n")[0])
    module.add_arguments(parser)
    result = module.run(parser.parse_args(rest))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
