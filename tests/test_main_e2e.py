"""main.py end to end on tiny synthetic data: files written, evaluation, auto-resume, non-finite loss."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import main as main_module
from tests.helpers import TINY
from util.checkpoint import load_checkpoint
from cli.config import config_dict, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_flags(data_dir):
    """A very small synthetic dataset at a small image size (generated on first use)."""
    return ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--synthetic_num_train", "8",
            "--synthetic_num_val", "4", "--synthetic_image_size", "96", "--min_size", "96", "--max_size", "128",
            "--no-random_crop", "--num_workers", "0", "--batch_size", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic_data")


def run_main(*flags, timeout=300):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_eval_resume_end_to_end(tmp_path, data_dir):
    out = tmp_path / "run"
    flags = [*TINY, *data_flags(data_dir), "--max_iters_per_epoch", "3", "--print_freq", "2",
             "--lr_drop", "1", "--output_dir", str(out)]
    proc = run_main(*flags, "--epochs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "number of params" in proc.stdout
    assert "deformable attention: 'pytorch' implementation" in proc.stdout  # the run log names it (CPU)
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in proc.stdout

    # checkpoints: every epoch, numbered ones before each lr drop / at the end
    state = load_checkpoint(str(out / "checkpoint.pth"))
    assert state["epoch"] == 1
    assert {"model", "optimizer", "lr_scheduler", "rng_state", "args"} <= set(state)
    assert (out / "checkpoint0000.pth").is_file() and (out / "checkpoint0001.pth").is_file()
    assert not glob.glob(str(out / ".*.tmp"))

    # log: windows of print_freq iterations, then one record per epoch with the AP numbers
    records = read_log(out / "log.jsonl")
    windows = [r for r in records if r["type"] == "train"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [(r["epoch"], r["iter"]) for r in windows] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert all(k in windows[0] for k in ("loss", "loss_ce", "loss_ce_unscaled", "lr", "sec_per_iter"))
    assert [r["epoch"] for r in epochs] == [0, 1]
    for key in ("test_AP", "test_AP50", "test_AP75", "test_APs", "test_APm", "test_APl", "train_loss", "epoch_time"):
        assert key in epochs[-1], key
    assert epochs[1]["train_lr"] == pytest.approx(epochs[0]["train_lr"] * 0.1)  # --lr_drop 1

    # the resolved configuration reproduces the run's flags
    config = yaml.safe_load(open(out / "config.yaml"))
    assert config["epochs"] == 2 and config["num_classes"] is not None
    again = parse_args(["--config", str(out / "config.yaml")])
    assert config_dict(again) == config

    # COCO results file
    detections = json.load(open(out / "detections_val.json"))
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    assert glob.glob(str(out / "tensorboard" / "events.*"))

    # evaluation of the checkpoint only
    eval_out = tmp_path / "eval"
    proc = run_main(*TINY, *data_flags(data_dir), "--eval", "--resume", str(out / "checkpoint.pth"),
                    "--output_dir", str(eval_out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (eval_out / "detections_val.json").is_file()
    evals = [r for r in read_log(eval_out / "log.jsonl") if r["type"] == "eval"]
    assert evals[0]["epoch"] == 1 and "test_AP50" in evals[0]

    # auto-resume continues after the last finished epoch
    proc = run_main(*flags, "--epochs", "3", "--auto_resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at epoch 2" in proc.stdout
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 2
    assert [r["epoch"] for r in read_log(out / "log.jsonl") if r["type"] == "epoch"] == [0, 1, 2]


class _NaNAfter(torch.nn.Module):
    """Wraps the criterion: from call ``start`` on, ``loss_giou`` is NaN (a fault injected in-process)."""

    def __init__(self, criterion, start):
        super().__init__()
        self.criterion, self.start, self.calls = criterion, start, 0
        self.weight_dict = criterion.weight_dict

    def forward(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        self.calls += 1
        if self.calls > self.start:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    import models

    build = models.build_model

    def build_with_fault(args):
        model, criterion, post = build(args)
        return model, _NaNAfter(criterion, start=3 + 1), post  # epoch 0: 3 calls; epoch 1: 2nd call is NaN

    monkeypatch.setattr(models, "build_model", build_with_fault)
    out = tmp_path / "run"
    argv = [*TINY, *data_flags(data_dir), "--max_iters_per_epoch", "3", "--print_freq", "10", "--epochs", "3",
            "--no-tensorboard", "--output_dir", str(out)]
    assert main_module.cli(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, iteration 2/3" in err
    assert "loss_giou" in err and "loss_ce," not in err
    state = load_checkpoint(str(out / "checkpoint.pth"))
    assert state["epoch"] == 0  # epoch 1 never saved
    errors = [r for r in read_log(out / "log.jsonl") if r["type"] == "error"]
    assert errors and "iteration 2/3" in errors[0]["message"]


def test_bf16_autocast_on_cpu(tmp_path, data_dir):
    argv = [*TINY, *data_flags(data_dir), "--amp", "bf16", "--max_iters_per_epoch", "2", "--epochs", "1",
            "--no-tensorboard", "--output_dir", str(tmp_path / "run")]
    stats = main_module.main(parse_args(argv))
    assert "AP50" in stats
    records = read_log(tmp_path / "run" / "log.jsonl")
    assert all(r["loss"] == r["loss"] for r in records if r["type"] == "train")  # finite, not NaN
