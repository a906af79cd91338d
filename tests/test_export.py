"""scripts/export.py: the torch.export program reproduces the eager detections; the attention is one node."""
import json
import os
import sys

import pytest
import torch

import models
import ops
import ops.dispatch as dispatch
from models.inference import InferenceModel
from tests.helpers import TINY
from util.checkpoint import atomic_save
from cli.config import config_dict, parse_args, save_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import export  # noqa: E402

NAMES = {1: "rectangle", 2: "ellipse"}


def tiny_run(tmp_path, *extra):
    """A run directory (config.yaml, checkpoint.pth with class names) of a random-init tiny model."""
    args = parse_args(TINY + ["--with_box_refine", "--eval_size", "64", "--max_size", "96", "--topk_eval", "20"]
                      + list(extra))
    args.num_classes = 3
    torch.manual_seed(0)
    model, _, postprocessors = models.build_model(args)
    with torch.no_grad():
        model.class_embed[-1].bias.normal_(0, 2)  # distinct scores: a stable ranking to compare
    run = tmp_path / "run"
    run.mkdir()
    atomic_save({"model": model.state_dict(), "args": config_dict(args), "epoch": 0, "class_names": NAMES},
                str(run / "checkpoint.pth"))
    save_config(args, str(run / "config.yaml"))
    return run, InferenceModel(model, postprocessors["bbox"]).eval(), args


def test_through_registered_op_routes_cpu_inputs_and_restores():
    value, ss, starts = torch.randn(1, 6, 2, 4), torch.tensor([[2, 3]]), torch.tensor([0])
    loc, attn = torch.rand(1, 5, 2, 1, 2, 2), torch.rand(1, 5, 2, 1, 2)
    assert dispatch._impl_for_device_type("cpu") == "pytorch"
    with ops.through_registered_op():
        assert dispatch._impl_for_device_type("cpu") == "registered"
        via_op = ops.ms_deform_attn(value, ss, starts, loc, attn)
    assert dispatch._impl_for_device_type("cpu") == "pytorch"
    torch.testing.assert_close(via_op, ops.ms_deform_attn_pytorch(value, ss, starts, loc, attn), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["baseline", pytest.param("v3.0.4", marks=pytest.mark.slow)])
def test_exported_program_reproduces_eager_outputs(tmp_path, variant):
    run, eager, args = tiny_run(tmp_path, "--variant", variant, "--enc_layers", "2", "--dec_layers", "2")
    out = tmp_path / "model.pt2"
    summary = export.export(str(run), str(out), batch_size=2, device="cpu", check=False)
    assert summary["image_size"] == [64, 96]
    # one registered-op node per attention call (2 encoder + 2 decoder layers), no inlined grid_sample
    assert summary["msda_nodes"] == 4 and summary["grid_sampler_nodes"] == 0
    extra = {export.META_NAME: ""}
    program = torch.export.load(str(out), extra_files=extra).module()
    meta = json.loads(extra[export.META_NAME])
    assert {int(k): v for k, v in meta["class_names"].items()} == NAMES and meta["image_size"] == [64, 96]
    for seed in (3, 4):  # inputs the export never saw, one with padding
        inputs = export.example_inputs(2, (64, 96), "cpu", seed=seed, padded=seed == 4)
        with torch.no_grad():
            got, expected = program(*inputs), eager(*inputs)
        assert got[2].dtype == torch.int64 and tuple(got[0].shape) == (2, 20, 4)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[2], expected[2])


def test_export_command_line_prints_its_summary(tmp_path, capsys):
    run, _, _ = tiny_run(tmp_path, "--enc_layers", "1", "--dec_layers", "1")
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "m.pt2"), "--image_size", "64", "64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["image_size"] == [64, 64] and summary["msda_nodes"] == 2 and os.path.isfile(summary["out"])
    assert summary["max_diff"]["labels"] == 0 and summary["max_diff"]["scores"] < 1e-5  # --check: reloaded file
    assert export.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.pt2")]) == 2
