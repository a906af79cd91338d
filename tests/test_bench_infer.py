"""scripts/benchmark.py infer: one JSON line per (variant, dtype, batch size), and ratio lines."""
import json
import os
import sys

from tests.helpers import TINY

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import benchmark  # noqa: E402


def test_infer_benchmark_prints_json_lines(capsys):
    argv = ["infer", "--compare", "cascade", "v3.0.4", "--dtypes", "fp32", "bf16", "--batch_sizes", "1", "2",
            "--repeats", "2", "--warmup", "0", "--image_size", "64", "64", "--num_classes", "5"] + TINY
    assert benchmark.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    results = [r for r in records if r.get("bench") == "infer"]
    assert {(r["label"], r["dtype"], r["batch_size"]) for r in results} == {
        (v, d, b) for v in ("cascade", "v3.0.4") for d in ("fp32", "bf16") for b in (1, 2)}
    for r in results:
        assert r["image_size"] == [64, 64] and r["repeats"] == 2 and r["device"] == "cpu"
        assert r["latency_ms_min"] <= r["latency_ms"] <= r["latency_ms_p90"]
        assert abs(r["images_per_s"] - r["batch_size"] * 1000 / r["latency_ms"]) < 0.01 * r["images_per_s"] + 1e-3
    ratios = {(r["ratio"], r.get("dtype", r.get("label")), r["batch_size"]) for r in records if "ratio" in r}
    assert all(r["images_per_s_best"] > 0 for r in records if "ratio" in r)
    assert ("v3.0.4/cascade", "fp32", 2) in ratios and ("bf16/fp32", "cascade", 1) in ratios
    assert len(ratios) == 4 + 4  # each later variant x dtype x batch, and bf16/fp32 per variant x batch
