"""An epoch is one recoverable unit: a run killed at any point of an epoch, then ``--auto_resume``d,
ends exactly like an uninterrupted run (weights, numbered checkpoints, log records once each,
final AP and detections).

The kill is real: the child process dies with ``os._exit`` (no cleanup, as under ``kill -9``) at a
named point, chosen with the test-only environment variable ``DETR_FAULT_POINT=NAME@N`` (N-th time
the point is reached; see ``util.checkpoint.fault_point``).
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import TINY
from util.checkpoint import FAULT_ENV, load_checkpoint
from util.logger import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # ~25 s each: two main.py processes
EPOCHS = 2
ITERS = 3  # per epoch; --print_freq 2 gives train records at iterations 2 and 3


def flags(data_dir, out):
    """Two epochs of 3 iterations, an lr drop after each (so both epochs get a numbered copy),
    evaluation every epoch on 2 images (one batch)."""
    return [*TINY, "--dataset_file", "synthetic", "--coco_path", str(data_dir), "--synthetic_num_train", "8",
            "--synthetic_num_val", "2", "--synthetic_image_size", "96", "--min_size", "96", "--max_size", "128",
            "--no-random_crop", "--num_workers", "0", "--batch_size", "2", "--max_iters_per_epoch", str(ITERS),
            "--print_freq", "2", "--lr_drop", "1", "--epochs", str(EPOCHS), "--seed", "3", "--no-tensorboard",
            "--output_dir", str(out)]


def run_main(argv, fault=None, timeout=300):
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kill_data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_main(flags(data_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_weights(a_path, b_path):
    a, b = load_checkpoint(str(a_path)), load_checkpoint(str(b_path))
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


# (fault point, occurrence): every one of them lands in epoch 1, the last epoch
KILL_POINTS = [
    ("train_iter", ITERS + 2),      # mid-epoch: epoch 1, after its second iteration
    ("checkpoint_write", 2),        # epoch 1's checkpoint.pth: temporary file written, not yet renamed
    ("after_checkpoint", 2),        # between epoch 1's checkpoint and its numbered copy
    ("eval_iter", 2),               # during epoch 1's evaluation
    ("before_log", 2),              # evaluation done, epoch 1's log record not written
]


@pytest.mark.parametrize("point,count", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_kill_then_auto_resume_equals_uninterrupted_run(tmp_path, data_dir, reference, point, count):
    out = tmp_path / "run"
    killed = run_main(flags(data_dir, out), fault=f"{point}@{count}")
    assert killed.returncode == 137, f"the fault point was not reached: {killed.stderr[-2000:]}"
    if point == "checkpoint_write":
        assert glob.glob(str(out / ".checkpoint.pth.*.tmp")), "the killed save should have left its temporary file"

    resumed = run_main([*flags(data_dir, out), "--auto_resume"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    # the killed run's lock (its process is gone) is taken over, not an error
    assert "taking over the stale lock" in resumed.stdout

    # weights: the last and the numbered checkpoints are the uninterrupted run's
    for name in ("checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth"):
        assert_same_weights(reference / name, out / name)

    # log: every epoch record once, every training window once, in order
    records = read_jsonl(str(out / "log.jsonl"))
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == list(range(EPOCHS))
    assert [(r["epoch"], r["iter"]) for r in records if r["type"] == "train"] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    reference_epochs = [r for r in read_jsonl(str(reference / "log.jsonl")) if r["type"] == "epoch"]
    last = [r for r in records if r["type"] == "epoch"][-1]
    assert last["test_AP"] == reference_epochs[-1]["test_AP"]
    assert last["test_AP50"] == reference_epochs[-1]["test_AP50"]
    assert last["train_loss"] == pytest.approx(reference_epochs[-1]["train_loss"])

    # the final evaluation's detections exist and are the uninterrupted run's
    detections = json.loads((out / "detections_val.json").read_text())
    assert detections == json.loads((reference / "detections_val.json").read_text())

    # housekeeping: no temporary files or lock left; config.yaml holds no resume bookkeeping
    assert not glob.glob(str(out / ".*.tmp"))
    assert not (out / ".lock").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "resume" not in config and "auto_resume" not in config
