"""SIGTERM and SIGINT stop a run at a safe point: one line saying what was kept, exit 128 + signal,
the lock released, the last checkpoint intact; ``--auto_resume`` then redoes what was cut short.
The in-process tests send the signal from inside the pass they interrupt."""
import os

import pytest

from tests.run_helpers import cli, synthetic_flags, synthetic_model_flags, tiny_checkpoint
from util.checkpoint import load_checkpoint


# ----------------------------------------------------------------------------- in training (a separate process)

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


# ----------------------------------------------------------------------------- in the passes after an evaluation

def _signal_on_first_call(monkeypatch, owner, name, when=lambda args, kwargs: True):
    """Replace ``owner.name`` by a wrapper that sends this process SIGTERM on its first call for which
    ``when(args, kwargs)`` holds (as preemption would, in the middle of the pass), then runs the original."""
    import signal

    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        if not calls and when(args, kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _records(out, kind):
    from util.logger import read_jsonl

    return [r for r in read_jsonl(str(out / "log.jsonl")) if r.get("type") == kind]


@pytest.mark.parametrize("stage", ["diagnostics", "pictures"])
def test_sigterm_in_the_last_epochs_diagnostics_or_pictures_stops_there(tmp_path, synthetic_dir, capsys,
                                                                         monkeypatch, stage):
    """In the last epoch: exit 143, the checkpoint complete, no epoch record; the resumed run redoes
    the tail, so the log ends with one epoch record and the diag records of initialisation and epoch 0."""
    from extras import reference_diagnostics, validation_pictures
    from util.checkpoint import load_checkpoint

    out = tmp_path / "out"
    flags = synthetic_flags(synthetic_dir, out, "--epochs", "1", "--max_iters_per_epoch", "1", "--diag_images", "2")
    if stage == "pictures":
        flags += ["--vis_images", "1", "--tensorboard"]
        calls = _signal_on_first_call(monkeypatch, validation_pictures, "run_recorded")
    else:
        # the signal comes as epoch 0's diagnostics start (not in the pass at initialisation)
        calls = _signal_on_first_call(monkeypatch, reference_diagnostics.ReferenceDiagnosticsExtra,
                                      "after_evaluation", lambda args, kwargs: args[2] == 0)
    code, err = cli(flags, capsys)
    assert calls and code == 143, err
    last = err.strip().splitlines()[-1]
    what = "reference diagnostics" if stage == "diagnostics" else stage
    assert last.startswith(f"stopped by SIGTERM during the {what} of epoch 0 (its checkpoint is written)"), last
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 0
    assert _records(out, "epoch") == []
    # the record at initialisation; epoch 0's diagnostics ran before the pictures; cut short, they are not recorded
    assert [r["epoch"] for r in _records(out, "diag")] == ([-1, 0] if stage == "pictures" else [-1])
    assert not (out / ".lock").exists()
    monkeypatch.undo()
    code, err = cli([*flags, "--auto_resume"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in _records(out, "epoch")] == [0] and [r["epoch"] for r in _records(out, "diag")] == [-1, 0]


def test_sigterm_in_the_diagnostics_at_initialisation_stops_before_training(tmp_path, synthetic_dir, capsys,
                                                                            monkeypatch):
    """The pass before the first training step: exit 143, no diag record (cut short), no training;
    --auto_resume then starts the run from initialisation and measures it."""
    from models.diagnostics import ReferenceDiagnostics

    out = tmp_path / "out"
    flags = synthetic_flags(synthetic_dir, out, "--epochs", "1", "--max_iters_per_epoch", "1", "--diag_images", "2")
    calls = _signal_on_first_call(monkeypatch, ReferenceDiagnostics, "update")
    code, err = cli(flags, capsys)
    assert calls and code == 143, err
    assert "stopped by SIGTERM during the reference diagnostics at initialisation" in err.strip().splitlines()[-1], err
    assert _records(out, "diag") == [] and _records(out, "train") == []
    assert not (out / "checkpoint.pth").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    code, err = cli([*flags, "--auto_resume"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in _records(out, "diag")] == [-1, 0]


def test_sigterm_in_the_diagnostics_of_eval_exits_143(tmp_path, synthetic_dir, capsys, monkeypatch):
    from models.diagnostics import ReferenceDiagnostics

    ckpt = tmp_path / "model.pth"
    tiny_checkpoint(ckpt, *synthetic_model_flags(synthetic_dir))
    calls = _signal_on_first_call(monkeypatch, ReferenceDiagnostics, "update")
    code, err = cli(synthetic_flags(synthetic_dir, tmp_path / "eval", "--eval", "--num_classes", "7", "--resume", ckpt,
                                    "--diag_images", "2"), capsys)
    assert calls and code == 143, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM during the reference diagnostics"), err
    assert _records(tmp_path / "eval", "eval_diag") == [] and _records(tmp_path / "eval", "diag") == []
