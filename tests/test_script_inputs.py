"""The scripts' inputs (predict, diagnose, visualize_refs, export, summarize): checkpoints read as
main.py reads them, each measured with its own configuration; bad input is one line (exit 2)."""
import os
import sys

import pytest

from tests.run_helpers import (assert_one_line_error, code_running_checkpoint, run_script, synthetic_model_flags,
                               tiny_checkpoint)

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)


# ----------------------------------------------------------------------------- inputs

def test_predict_reads_an_image_reached_twice_once(tmp_path):
    from PIL import Image

    from predict import collect_images

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (tmp_path / "b.png").symlink_to(folder / "a.png")
    assert collect_images([str(folder), str(tmp_path / "b.png")]) == [str(folder / "a.png")]


def test_summarize_skips_an_invalid_utf8_line_as_the_trainer_does(tmp_path, capsys):
    import summarize

    run = tmp_path / "v3.0.2"
    run.mkdir()
    (run / "config.yaml").write_text("variant: v3.0.2\nseed: 0\nepochs: 2\n")
    (run / "log.jsonl").write_bytes(b'{"type": "epoch", "epoch": 0, "test_AP": 0.25, "test_AP50": 0.5}\n'
                                    b'{"type": "train", "epoch": 1, "note": "\xff\xfe"}\n'
                                    b'{"type": "epoch", "epoch": 1, "test_AP": 0.375, "test_AP50": 0.625}\n')
    out = tmp_path / "results.md"
    assert summarize.main([str(run), "--out", str(out), "--plot", "", "--control", ""]) == 0
    table = out.read_text()
    assert "37.5" in table or "0.375" in table, table  # the last epoch's AP, read past the bad line


# ----------------------------------------------------------------------------- checkpoints and their configurations

def _families(metrics):
    return {key.split("/")[0] for key in metrics}


def test_diagnose_measures_each_checkpoint_with_its_own_configuration(tmp_path, synthetic_dir, capsys):
    """A baseline checkpoint, then a guided (v3.0.4) one: the second is measured as v3.0.4 (D1, D2, D6
    included), exactly as it is measured alone -- not with the first one's model."""
    import json

    import diagnose

    base, guided = tmp_path / "baseline.pth", tmp_path / "v3.0.4.pth"
    tiny_checkpoint(base, *synthetic_model_flags(synthetic_dir), "--variant", "baseline", "--stages", "2:2")
    tiny_checkpoint(guided, *synthetic_model_flags(synthetic_dir), "--variant", "v3.0.4", "--stages", "1:1,1:1")
    common = ["--diag_images", "2", "--device", "cpu"]
    assert run_script(capsys, diagnose.main, ["--resume", base, guided, "--out", tmp_path / "both", *common])[0] == 0
    assert run_script(capsys, diagnose.main, ["--resume", guided, "--out", tmp_path / "alone", *common])[0] == 0
    both = json.loads((tmp_path / "both" / "diagnostics.json").read_text())["evaluations"]
    alone = json.loads((tmp_path / "alone" / "diagnostics.json").read_text())["evaluations"][0]
    assert _families(both[0]["metrics"]) == {"D4", "D5"}
    assert {"D1", "D2", "D6"} <= _families(both[1]["metrics"])  # guided: measured with its own model
    assert [(e["config"]["variant"], e["config"]["stages"]) for e in both] == [("baseline", "2:2"),
                                                                              ("v3.0.4", "1:1,1:1")]
    assert both[1]["metrics"].keys() == alone["metrics"].keys()
    assert all(both[1]["metrics"][k] == pytest.approx(alone["metrics"][k], rel=1e-6, abs=1e-9)
               for k in alone["metrics"])


def test_diagnose_honours_unsafe_trust_checkpoint(tmp_path, synthetic_dir, capsys):
    import diagnose

    ckpt, marker = tmp_path / "legacy.pth", tmp_path / "code_ran"
    code_running_checkpoint(ckpt, marker)
    argv = ["--resume", ckpt, "--out", tmp_path / "diag", "--diag_images", "1", "--device", "cpu",
            *synthetic_model_flags(synthetic_dir)]
    code, err = run_script(capsys, diagnose.main, argv)
    assert_one_line_error(code, err, f"--resume {ckpt}", "'io.open'", "--unsafe_trust_checkpoint")
    assert not marker.exists()
    code, err = run_script(capsys, diagnose.main, [*argv, "--unsafe_trust_checkpoint", ckpt])
    assert code == 0, err
    assert marker.exists() and (tmp_path / "diag" / "diagnostics.json").exists()


def _upstream_checkpoint(path, data_dir):
    """A Deformable-DETR / H-DETR style release file of the tiny model: weights (with the decoder's
    head aliases), an argparse.Namespace of upstream's flags (numpy scalars included); and the
    project configuration it corresponds to, as a YAML file beside it under another name."""
    import argparse

    import numpy as np
    import torch
    import yaml

    import models
    from cli.config import config_dict
    from tests.helpers import tiny_args

    args = tiny_args(*synthetic_model_flags(data_dir), num_classes=7)
    model, _, _ = models.build_model(args)
    state = dict(model.state_dict())
    state["transformer.decoder.class_embed.0.weight"] = state["class_embed.0.weight"].clone()
    upstream_args = argparse.Namespace(lr=np.float64(2e-4), epochs=50, num_queries=300, seed=np.int64(42),
                                       dataset_file="coco", with_box_refine=True, hidden_dim=np.int32(256))
    torch.save({"model": state, "epoch": 49, "args": upstream_args}, str(path))
    config = path.parent / "upstream_config.yaml"
    config.write_text(yaml.safe_dump(config_dict(args)))
    return config


def test_predict_and_diagnose_read_upstream_style_checkpoints_with_config(tmp_path, synthetic_dir, capsys):
    from PIL import Image

    import diagnose
    import predict

    ckpt = tmp_path / "r50_deformable_detr-checkpoint.pth"
    config = _upstream_checkpoint(ckpt, synthetic_dir)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (90, 120, 30)).save(tmp_path / "images" / "a.png")
    predict_argv = ["--checkpoint", ckpt, "--images", tmp_path / "images", "--out", tmp_path / "pred", "--device",
                    "cpu", "--no_pictures"]
    code, err = run_script(capsys, predict.main, predict_argv)
    assert_one_line_error(code, err, f"--checkpoint {ckpt}", "argparse.Namespace", "--config FILE")
    code, err = run_script(capsys, predict.main, [*predict_argv, "--config", config])
    assert code == 0, err
    assert (tmp_path / "pred" / "detections.json").exists()

    diagnose_argv = ["--resume", ckpt, "--out", tmp_path / "diag", "--diag_images", "1", "--device", "cpu"]
    code, err = run_script(capsys, diagnose.main, diagnose_argv)
    assert_one_line_error(code, err, f"--resume {ckpt}", "argparse.Namespace", "--config FILE")
    code, err = run_script(capsys, diagnose.main, [*diagnose_argv, "--config", config])
    assert code == 0, err
    assert (tmp_path / "diag" / "diagnostics.json").exists()


def test_predict_checks_msda_impl_against_its_device(tmp_path, synthetic_dir, capsys, monkeypatch):
    import predict

    ckpt = tmp_path / "checkpoint.pth"
    tiny_checkpoint(ckpt, *synthetic_model_flags(synthetic_dir))
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setenv("MSDA_IMPL", "cuda")
    code, err = run_script(capsys, predict.main, ["--checkpoint", ckpt, "--images", tmp_path / "a.png", "--out",
                                                  tmp_path / "pred", "--device", "cpu"])
    assert_one_line_error(code, err, "MSDA_IMPL=cuda", "cpu")


# ----------------------------------------------------------------------------- one line, not a traceback

@pytest.fixture
def predict_checkpoint(tmp_path, synthetic_dir):
    from PIL import Image

    ckpt = tmp_path / "checkpoint.pth"
    tiny_checkpoint(ckpt, *synthetic_model_flags(synthetic_dir))
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    return ckpt


def test_visualize_refs_on_a_refused_checkpoint_is_one_line(tmp_path, synthetic_dir, capsys):
    import visualize_refs
    from tests.helpers import TINY

    ckpt, marker = tmp_path / "legacy.pth", tmp_path / "code_ran"
    code_running_checkpoint(ckpt, marker)
    argv = [*TINY, *synthetic_model_flags(synthetic_dir), "--num_classes", "7", "--resume", ckpt,
            "--image", "synthetic:0", "--out", tmp_path / "vis"]
    code, err = run_script(capsys, visualize_refs.main, argv)
    assert_one_line_error(code, err, f"--resume {ckpt}", "'io.open'", "--unsafe_trust_checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("script", ["predict", "diagnose"])
def test_out_naming_an_existing_file_is_one_line(tmp_path, predict_checkpoint, capsys, script):
    import diagnose
    import predict

    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    if script == "predict":
        code, err = run_script(capsys, predict.main, ["--checkpoint", predict_checkpoint, "--images",
                                                      tmp_path / "a.png", "--out", taken, "--device", "cpu"])
    else:
        code, err = run_script(capsys, diagnose.main, ["--resume", predict_checkpoint, "--out", taken, "--diag_images",
                                                       "1", "--device", "cpu"])
    assert_one_line_error(code, err, f"--out {taken}", "not a folder")
    assert taken.read_text() == "a file\n"


def test_predict_on_a_device_that_does_not_exist_is_one_line(tmp_path, predict_checkpoint, capsys):
    import predict

    code, err = run_script(capsys, predict.main, ["--checkpoint", predict_checkpoint, "--images", tmp_path / "a.png",
                                                  "--out", tmp_path / "pred", "--device", "tpu"])
    assert_one_line_error(code, err, "--device tpu")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_an_image_that_is_not_a_regular_file_is_named_as_such(tmp_path, predict_checkpoint, capsys, kind):
    import predict

    path = "/dev/zero" if kind == "/dev/zero" else str(tmp_path / "pipe.png")
    if kind == "fifo":
        os.mkfifo(path)
    code, err = run_script(capsys, predict.main, ["--checkpoint", predict_checkpoint, "--images", path,
                                                  "--out", tmp_path / "pred", "--device", "cpu"])
    assert_one_line_error(code, err, f"--images {path}: not a regular file or a folder")
    assert "did you mean" not in err


def test_export_batch_size_zero_blames_batch_size(tmp_path, predict_checkpoint, capsys):
    import export

    code, err = run_script(capsys, export.main, ["--checkpoint", predict_checkpoint, "--out", tmp_path / "m.pt2",
                                                 "--batch_size", "0"])
    assert_one_line_error(code, err, "--batch_size 0 must be >= 1")
    assert "--image_size" not in err
