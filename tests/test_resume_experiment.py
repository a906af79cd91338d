"""A resumed (or evaluated) checkpoint is the same experiment; upstream-style checkpoints resume and
evaluate; --eval keeps its files apart from the training run's (issue 27, defects 1, 4 and 12).

Runs go through ``main.cli`` (exit code and stderr as a user sees them) with the demo's
configuration shrunk to one iteration on 64 px images.
"""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

import main as main_module
from cli.config import parse_args
from tests.run_helpers import assert_one_line_error, cli, synthetic_flags
from util.checkpoint import atomic_save, load_checkpoint
from util.optim import build_lr_scheduler, build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.yaml")


def demo_flags(data, out, *extra):
    """``--config configs/demo.yaml`` (the demo's flags), one iteration per epoch on 64 px images."""
    return [str(a) for a in ["--config", DEMO, "--device", "cpu", "--coco_path", data, "--output_dir", out,
                             "--synthetic_num_train", "2", "--synthetic_num_val", "1", "--synthetic_image_size", "64",
                             "--min_size", "64", "--max_size", "64", "--eval_size", "64", "--batch_size", "2",
                             "--max_iters_per_epoch", "1", "--num_workers", "0", "--no-tensorboard",
                             "--diag_images", "0", *extra]]


def read_log(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="module")
def v302_run(tmp_path_factory, data_dir):
    """A finished one-epoch v3.0.2 run of the (shrunk) demo."""
    out = tmp_path_factory.mktemp("v302") / "run"
    code = main_module.cli(demo_flags(data_dir, out, "--variant", "v3.0.2", "--epochs", "1"))
    assert code == 0
    return out


# ----------------------------------------------------------------------------- defect 1

def test_auto_resume_as_another_variant_is_refused(v302_run, data_dir, capsys):
    """The issue's reproduction: v3.0.2 for one epoch, then the same directory as v3.0.4 with
    --epochs 2 --auto_resume. It used to exit 0 and train on as 'v3.0.4'."""
    before = {name: (v302_run / name).read_bytes() for name in ("config.yaml", "log.jsonl", "checkpoint.pth")}
    code, err = cli(demo_flags(data_dir, v302_run, "--variant", "v3.0.4", "--epochs", "2", "--auto_resume"), capsys)
    assert_one_line_error(code, err, str(v302_run / "checkpoint.pth"), "--ref_keep_self True (checkpoint: False)",
                          "--variant v3.0.4 (checkpoint: v3.0.2)", "--output_dir", "--pretrained")
    # nothing was written: config.yaml still says v3.0.2, the log and checkpoint are the first run's
    assert {name: (v302_run / name).read_bytes() for name in before} == before
    assert yaml.safe_load((v302_run / "config.yaml").read_text())["variant"] == "v3.0.2"


def test_eval_resume_as_another_variant_is_refused(v302_run, data_dir, tmp_path, capsys):
    code, err = cli(demo_flags(data_dir, tmp_path / "eval", "--variant", "v3.0.4", "--eval", "--resume",
                               v302_run / "checkpoint0000.pth"), capsys)
    assert_one_line_error(code, err, "--eval --resume", "--ref_keep_self True (checkpoint: False)")


def test_eval_resume_may_change_the_evaluation_flags(v302_run, data_dir, tmp_path, capsys):
    """The documented cheap upstream-eval row: the v3.0.2 checkpoint evaluated as v3.0.2_upstream_eval."""
    out = tmp_path / "upstream_eval"
    code, err = cli(demo_flags(data_dir, out, "--variant", "v3.0.2_upstream_eval", "--eval", "--resume",
                               v302_run / "checkpoint0000.pth"), capsys)
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["variant"] == "v3.0.2_upstream_eval" and config["ref_eval_one2many"] is False
    assert [r["type"] for r in read_log(out / "log.jsonl")][-1] == "eval"


def test_predict_refuses_a_config_yaml_of_another_variant(v302_run, data_dir, tmp_path, capsys):
    """The state a silent resume left behind (config.yaml says v3.0.4, the checkpoint is v3.0.2):
    predict.py used to run the v3.0.2 weights as v3.0.4."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import predict

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes((v302_run / "checkpoint.pth").read_bytes())
    text = (v302_run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("variant: v3.0.2", "variant: v3.0.4")
                                     .replace("ref_keep_self: false", "ref_keep_self: true"))
    code = predict.main(["--checkpoint", str(run), "--images", str(data_dir / "val2017"), "--out", str(tmp_path / "p"),
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "--checkpoint", "--ref_keep_self True (checkpoint: False)")


def test_training_on_with_another_evaluation_flag_is_refused(v302_run, data_dir, tmp_path, capsys):
    code, err = cli(demo_flags(data_dir, tmp_path / "more", "--variant", "v3.0.2", "--no-ref_eval_one2many",
                               "--epochs", "2", "--resume", v302_run / "checkpoint.pth"), capsys)
    assert_one_line_error(code, err, "--ref_eval_one2many False (checkpoint: True)")


# ----------------------------------------------------------------------------- defect 4

def _upstream_checkpoint(path, data_dir, **changed):
    """A Deformable-DETR / H-DETR style training checkpoint of the tiny model: ``args`` an
    argparse.Namespace with upstream's keys (some not this project's) and numpy scalars."""
    import datasets
    import models

    args = parse_args([str(a) for a in synthetic_flags(data_dir, "")])
    args.num_classes = datasets.num_classes(args)
    model, _, _ = models.build_model(args)
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    state = dict(model.state_dict())
    state["transformer.decoder.class_embed.0.weight"] = state["class_embed.0.weight"].clone()  # upstream's alias
    upstream_args = dict(lr=np.float64(2e-4), lr_backbone=np.float64(2e-5), lr_backbone_names=["backbone.0"],
                         lr_linear_proj_names=["reference_points", "sampling_offsets"], lr_linear_proj_mult=0.1,
                         batch_size=np.int64(2), weight_decay=np.float64(1e-4), epochs=np.int64(50),
                         lr_drop=np.int64(40), lr_drop_epochs=None, clip_max_norm=np.float64(0.1), sgd=False,
                         with_box_refine=False, two_stage=False, frozen_weights=None, backbone="resnet18",
                         dilation=False, position_embedding="sine", num_feature_levels=np.int64(4),
                         enc_layers=np.int64(2), dec_layers=np.int64(2), dim_feedforward=np.int64(128),
                         hidden_dim=np.int64(64), dropout=np.float64(0.0), nheads=np.int64(4), num_queries=300,
                         dec_n_points=np.int64(4), enc_n_points=np.int64(4), masks=False, aux_loss=True,
                         set_cost_class=np.float64(2.0), set_cost_bbox=np.float64(5.0), cls_loss_coef=2.0,
                         focal_alpha=np.float64(0.25), coco_path="/datasets/coco", output_dir="exps/r50_deformable",
                         device="cuda", seed=np.int64(42), resume="", start_epoch=0, eval=False, num_workers=2,
                         cache_mode=False)
    upstream_args.update(changed)
    atomic_save({"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "epoch": 0, "args": argparse.Namespace(**upstream_args)}, str(path))


def test_an_upstream_checkpoint_resumes_and_evaluates(data_dir, tmp_path, capsys):
    path = tmp_path / "upstream.pth"
    _upstream_checkpoint(path, data_dir, lr=np.float64(1e-4))
    out = tmp_path / "resumed"
    code, err, printed = cli(synthetic_flags(data_dir, out, "--epochs", "2", "--max_iters_per_epoch", "1",
                                             "--resume", path), capsys, with_stdout=True)
    assert code == 0, err
    assert "starting at epoch 1" in printed and "--lr 0.0002 is not used" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())  # numpy scalars were written as plain numbers
    assert config["lr"] == 1e-4 and type(config["lr"]) is float
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 1
    code, err = cli(synthetic_flags(data_dir, tmp_path / "eval", "--eval", "--resume", path), capsys)
    assert code == 0, err


def test_an_upstream_checkpoint_that_does_not_fit_is_named_in_one_line(data_dir, tmp_path, capsys):
    path = tmp_path / "upstream.pth"
    _upstream_checkpoint(path, data_dir, hidden_dim=np.int64(256), with_box_refine=True)
    for how in (["--resume", path], ["--eval", "--resume", path]):
        code, err = cli(synthetic_flags(data_dir, tmp_path / "out", "--epochs", "2", *how), capsys)
        assert_one_line_error(code, err, "--hidden_dim 64 (checkpoint: 256)",
                              "--with_box_refine False (checkpoint: True)")


# ----------------------------------------------------------------------------- defect 12

def test_eval_into_a_training_run_leaves_its_files_alone(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = demo_flags(data_dir, out, "--variant", "v3.0.2", "--epochs", "1", "--diag_images", "1")
    code, err = cli(flags, capsys)
    assert code == 0, err
    names = ("config.yaml", "log.jsonl", "detections_val.json")
    before = {name: (out / name).read_bytes() for name in names}
    code, err = cli(flags + ["--eval", "--resume", str(out / "checkpoint.pth")], capsys)
    assert code == 0, err
    assert {name: (out / name).read_bytes() for name in names} == before
    # the evaluation's own files, its records typed as an evaluation's
    evaluation = out / "eval"
    assert yaml.safe_load((evaluation / "config.yaml").read_text())["eval"] is True
    records = [r for r in read_log(evaluation / "log.jsonl") if r["type"] != "data"]
    assert [(r["type"], r["epoch"]) for r in records] == [("eval", 0), ("eval_diag", 0)]

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import summarize

    assert summarize.load_run(str(evaluation)).diag_curve[0]["epoch"] == 0  # an --eval run's own diagnostics


def test_summaries_never_mix_eval_records_into_a_training_run(tmp_path):
    """A training log with --eval records appended (an older main.py --eval into the run's directory,
    or today's eval/ subfolder's types): the training's numbers count."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import summarize

    def write(run, records):
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"variant": "v3.0.2", "seed": 0, "epochs": 1}))
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(run)

    training = [{"type": "train", "epoch": 0, "iter": 0, "sec_per_iter": 1.0},
                {"type": "epoch", "epoch": 0, "test_AP": 0.1, "test_AP50": 0.2},
                {"type": "diag", "epoch": 0, "N": 4, "D4/fsr_in": 0.5}]
    old_eval = [{"type": "data", "split": "val"}, {"type": "eval", "epoch": 0, "test_AP": 0.9, "test_AP50": 0.95},
                {"type": "diag", "epoch": 0, "N": 4, "D4/fsr_in": 0.9}]
    new_eval = [{"type": "eval", "epoch": 0, "test_AP": 0.9, "test_AP50": 0.95},
                {"type": "eval_diag", "epoch": 0, "N": 4, "D4/fsr_in": 0.9}]
    for name, appended in (("old", old_eval), ("new", new_eval)):
        run = summarize.load_run(write(tmp_path / name, training + appended))
        assert run.final["AP"] == 0.1 and run.final_diag["D4/fsr_in"] == 0.5, name
        assert "2 --eval records ignored" in run.notes, (name, run.notes)
    # an evaluation's own directory is summarised from its records
    alone = summarize.load_run(write(tmp_path / "alone", new_eval))
    assert alone.final["AP"] == 0.9 and alone.final_diag["D4/fsr_in"] == 0.9
