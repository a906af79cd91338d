"""Every research variant trains a few iterations through main.py and evaluates (in-process, tiny data)."""
import json

import pytest
import torch

import main as main_module
from tests.helpers import one_epoch_smoke_flags
from cli.config import parse_args

# the presets' 6-layer cascade shrunk to the tiny model's 2 encoder / 2 decoder layers
RUNS = {
    "baseline": ["--variant", "baseline", "--stages", "2:2"],
    "cascade": ["--variant", "cascade", "--stages", "1:1,1:1"],
    "v3.0.1": ["--variant", "v3.0.1", "--stages", "1:1,1:1"],
    "v3.0.2": ["--variant", "v3.0.2", "--stages", "1:1,1:1"],
    "v3.0.3_hybrid": ["--variant", "v3.0.3", "--stages", "1:1,1:1", "--num_queries_one2many", "24",
                      "--k_one2many", "2"],
    "v3.0.3_mixed": ["--variant", "v3.0.3", "--stages", "1:1,1:1", "--use_ms_detr"],
    "v3.0.4": ["--variant", "v3.0.4", "--stages", "1:1,1:1"],
    "v3.0.4_two_stage_mixed": ["--variant", "v3.0.4", "--stages", "1:1,1:1", "--two_stage", "--mixed_selection",
                               "--use_ms_detr", "--look_forward_twice"],
    "v3.0.4_follow_ups": ["--variant", "v3.0.4", "--stages", "0:1,1:0,1:1", "--ref_rank", "attn_cls",
                          "--ref_grad", "--attn_map_accum", "max", "--enc_n_points", "6"],
    "v3.0.2_upstream_eval": ["--variant", "v3.0.2_upstream_eval", "--stages", "1:1,1:1", "--use_ms_detr"],
    "cascade_progressive": ["--variant", "cascade", "--stages", "1:1,1:1", "--enc_ref_progressive"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("variants_data")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_variant_trains_and_evaluates(name, data_dir, tmp_path):
    out = tmp_path / name
    args = parse_args(one_epoch_smoke_flags(data_dir, out) + RUNS[name])
    torch.manual_seed(0)
    stats = main_module.main(args)
    assert 0.0 <= stats["AP50"] <= 1.0
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    epoch = [r for r in records if r["type"] == "epoch"]
    assert len(epoch) == 1 and "test_AP" in epoch[0]
    assert all(v == v for k, v in epoch[0].items() if k.startswith("train_loss"))  # finite, not NaN
    assert (out / "checkpoint.pth").is_file() and (out / "detections_val.json").is_file()
