"""Issue 17: checkpoints that cannot run code, and the third reliability probe's findings (one
test or a few per finding). Runs go through ``main.cli`` in this process, as in test_reliability.py.
"""
import argparse
import os

import numpy as np
import pytest
import torch

from tests.helpers import tiny_args
from tests.test_reliability import assert_one_line_error, cli, synthetic_flags, tiny_checkpoint
from util.checkpoint import UnreadableCheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("round3_synthetic")


# ----------------------------------------------------------------------------- checkpoints cannot run code

class _OpensAFile:
    """Unpickling this object calls ``open(marker, 'w')``: the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _code_running_checkpoint(path, marker):
    model = tiny_checkpoint(path)  # a real checkpoint, then the same with one poisoned entry
    state = load_checkpoint(str(path))
    state["payload"] = _OpensAFile(marker)
    torch.save(state, str(path))
    return model


@pytest.mark.parametrize("how", ["--pretrained", "--resume", "--eval --resume", "--auto_resume"])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, synthetic_dir, capsys, how):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "code_ran"
    ckpt = out / "checkpoint.pth"
    _code_running_checkpoint(ckpt, marker)
    extra = {"--pretrained": ["--pretrained", ckpt], "--resume": ["--resume", ckpt],
             "--eval --resume": ["--eval", "--resume", ckpt], "--auto_resume": ["--auto_resume"]}[how]
    code, err = cli(synthetic_flags(synthetic_dir, out, "--epochs", "1", *extra), capsys)
    assert_one_line_error(code, err, str(ckpt), "'io.open'", "refused", "--unsafe_trust_checkpoint")
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert not (out / "log.jsonl").exists() or "epoch" not in (out / "log.jsonl").read_text()


def test_trusted_legacy_file_loads_with_the_explicit_flag(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "legacy.pth"
    _code_running_checkpoint(ckpt, marker)
    with pytest.raises(UnreadableCheckpointError):
        load_checkpoint(str(ckpt))
    assert not marker.exists()
    assert "model" in load_checkpoint(str(ckpt), trusted=True)
    assert marker.exists()  # what the flag's name warns about


def test_upstream_structured_checkpoint_loads_through_pretrained(tmp_path, synthetic_dir, capsys):
    """Deformable-DETR / H-DETR release files: model (with the decoder head aliases), optimizer,
    lr_scheduler, epoch and an argparse.Namespace of args (numpy scalars included)."""
    import models

    args = tiny_args(num_classes=7)
    model, _, _ = models.build_model(args)
    state = dict(model.state_dict())
    state["transformer.decoder.class_embed.0.weight"] = state["class_embed.0.weight"].clone()
    upstream_args = argparse.Namespace(lr=2e-4, lr_drop=40, epochs=50, num_queries=300, coco_path="/data/coco",
                                       frozen_weights=None, lr_backbone_names=["backbone.0"], seed=np.int64(42),
                                       sgd=False, dataset_file="coco", with_box_refine=True)
    upstream = {"model": state,
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 2e-5, "params": [0]}]},
                "lr_scheduler": {"step_size": 40, "gamma": 0.1, "base_lrs": [2e-4], "last_epoch": 50},
                "epoch": 49, "args": upstream_args}
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    torch.save(upstream, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded["args"].num_queries == 300 and loaded["epoch"] == 49
    code, err, printed = cli(synthetic_flags(synthetic_dir, tmp_path / "eval", "--eval", "--pretrained", path,
                                             "--num_classes", "7"), capsys, with_stdout=True)
    assert code == 0, err
    assert "dropped 1 upstream head aliases" in printed and "missing keys (0)" in printed


def test_numpy_state_of_our_checkpoints_loads_weights_only(tmp_path):
    """Our checkpoints hold numpy's RNG state (an ndarray in a tuple): on the allowlist."""
    path = tmp_path / "rng.pth"
    torch.save({"rng_state": {"numpy": np.random.get_state()}, "x": np.float32(1.5)}, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded["rng_state"]["numpy"][1].dtype == np.uint32 and float(loaded["x"]) == 1.5


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", "not-a-dict"])
def test_pretrained_that_is_not_a_state_dict_fails_before_any_work(tmp_path, synthetic_dir, capsys, content):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(["a", "list"], str(path))
    code, err, printed = cli(synthetic_flags(synthetic_dir, tmp_path / "out", "--pretrained", path), capsys,
                             with_stdout=True)
    assert_one_line_error(code, err, "--pretrained", str(path))
    assert "number of params" not in printed  # refused before the model was built


# ----------------------------------------------------------------------------- SIGTERM / SIGINT, SLURM requeue

def _wait_for(predicate, process, timeout=240.0):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the signal: {process.communicate()}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError("timed out waiting for the run")


def _epoch1_started(out):
    from util.logger import read_jsonl

    log = out / "log.jsonl"
    return log.exists() and any(r.get("type") == "train" and r.get("epoch") == 1 for r in read_jsonl(str(log)))


@pytest.mark.slow
@pytest.mark.parametrize("signum,workers", [(15, "0"), (2, "1")])
def test_a_stop_signal_stops_at_a_safe_point_and_releases_the_lock(tmp_path, synthetic_dir, signum, workers):
    """SIGTERM (preemption) and Ctrl-C (SIGINT to the whole process group, loader workers included):
    one line saying what was kept and how to continue, exit 128 + signal, no lock left behind,
    the last complete checkpoint intact; --auto_resume then finishes the run."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    flags = [str(a) for a in synthetic_flags(synthetic_dir, out, "--epochs", "2", "--print_freq", "1",
                                             "--num_workers", workers)]
    flags[flags.index("--synthetic_num_train") + 1] = "16"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "main.py", *flags], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: _epoch1_started(out), process)
    os.killpg(process.pid, signum)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(signum).name} during epoch 1, iteration"), last
    assert f"kept {out / 'checkpoint.pth'}" in last and "--auto_resume" in last
    assert not (out / ".lock").exists()
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 0
    resumed = subprocess.run([sys.executable, "main.py", *flags, "--auto_resume"], cwd=root, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 1


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, capsys):
    from util.checkpoint import OutputDirLock
    from util.errors import InputError

    (tmp_path / ".lock").write_text("4242 node017 991\n")  # the preempted first run, on another node
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    lock = OutputDirLock(str(tmp_path))
    lock.acquire()
    assert "this SLURM job's earlier run (job 991" in capsys.readouterr().out
    assert (tmp_path / ".lock").read_text().split()[2] == "991"
    lock.release()
    (tmp_path / ".lock").write_text("4242 node017 990\n")  # another job's live run: not ours
    with pytest.raises(InputError, match="in use by process 4242 on host node017 \\(SLURM job 990\\)"):
        OutputDirLock(str(tmp_path)).acquire()
