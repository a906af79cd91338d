"""Issue 27: the fourth reliability probe's findings (defects 2, 3, 5-11 of its list), one test or a few
per finding. Runs go through ``main.cli`` (and the scripts' ``main``) in this process, as in
test_reliability.py; the signal tests send the signal from inside the pass they interrupt.
"""
import os
import socket
import subprocess
import sys

import pytest

from tests.test_data_checks import assert_one_line_error, cli, synthetic_flags

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("round4_synthetic")


# ----------------------------------------------------------------------------- 2: the lock of a live run

@pytest.fixture
def sleeping_child():
    """A live process on this host (killed afterwards)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child.pid
    child.kill()
    child.wait()


def test_a_live_run_of_the_same_slurm_job_keeps_its_lock(tmp_path, monkeypatch, sleeping_child):
    """Two launches under one SLURM_JOB_ID (an salloc session): the second must not take the lock
    of the first, which is alive on this host."""
    from util.errors import InputError
    from util.output_lock import OutputDirLock

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    for live in (sleeping_child, os.getpid()):
        (tmp_path / ".lock").write_text(f"{live} {socket.gethostname()} 777\n")
        with pytest.raises(InputError, match=f"in use by process {live} on host .*SLURM job 777.*still running"):
            OutputDirLock(str(tmp_path)).acquire()
        assert (tmp_path / ".lock").read_text().split()[0] == str(live)  # untouched


def test_main_refuses_a_directory_locked_by_a_live_run_of_the_same_job(tmp_path, synthetic_dir, capsys, monkeypatch,
                                                                        sleeping_child):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    (out / ".lock").write_text(f"{sleeping_child} {socket.gethostname()} 777\n")
    code, err = cli(synthetic_flags(synthetic_dir, out, "--epochs", "1"), capsys)
    assert_one_line_error(code, err, "--output_dir", f"in use by process {sleeping_child}", "SLURM job 777")
    assert sorted(os.listdir(out)) == [".lock"]


def test_same_job_locks_whose_process_is_gone_are_taken_over(tmp_path, monkeypatch, capsys):
    from util.errors import InputError
    from util.output_lock import OutputDirLock

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    # same host, dead process (a requeue onto the same node); another host (a requeue elsewhere)
    for owner in (f"{dead.pid} {host} 777", "4242 node017 777"):
        (tmp_path / ".lock").write_text(owner + "\n")
        lock = OutputDirLock(str(tmp_path))
        lock.acquire()
        assert "taking over the stale lock" in capsys.readouterr().out, owner
        assert (tmp_path / ".lock").read_text().split() == [str(os.getpid()), host, "777"]
        with pytest.raises(InputError, match="in use by process"):
            OutputDirLock(str(tmp_path)).acquire()  # held by this process now: not stale
        lock.release()
        assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- 9: refusal messages, numpy, flag names

class _RunsAShellCommand:
    """Unpickling this calls ``os.system`` (torch names it 'posix.system', a blocked module)."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_an_os_system_checkpoint_is_refused_naming_the_global(tmp_path, synthetic_dir, capsys):
    import torch

    path = tmp_path / "weights.pth"
    torch.save({"model": {}, "payload": _RunsAShellCommand()}, str(path))
    code, err = cli(synthetic_flags(synthetic_dir, tmp_path / "out", "--pretrained", path), capsys)
    assert_one_line_error(code, err, f"--pretrained {path}", "refused", "'posix.system'", "--unsafe_trust_checkpoint")
    assert "weights_only" not in err and "Re-running" not in err


def _raw_pickle(kind):
    """Raw pickles that torch's weights-only unpickler reads (protocol 2), one per message form."""
    import pickle

    import numpy as np

    if kind == "build into a numpy scalar":  # 'Can only build ... but got <class 'numpy.int8'>'
        return pickle.dumps(np.int8(1), protocol=2)[:-1] + b"}b."
    if kind == "call an object":             # 'Trying to call reduce for unrecognized function OrderedDict()'
        return b"\x80\x02ccollections\nOrderedDict\n)R)R."
    if kind == "blocked module":             # 'Trying to load unsupported GLOBAL posix.system whose module ...'
        return b"\x80\x02cposix\nsystem\n)R."
    return pickle.dumps({"a": [1, 2]}, protocol=4)  # an opcode it does not know: no global to name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind,named", [("build into a numpy scalar", "'numpy.int8'"),
                                        ("call an object", "'OrderedDict()'"), ("blocked module", "'posix.system'"),
                                        ("protocol 4", "Unsupported operand")])
def test_every_refusal_form_names_what_was_refused_without_torchs_advice(tmp_path, kind, named):
    from util.checkpoint import UnreadableCheckpointError, load_checkpoint

    path = tmp_path / "file.pth"
    path.write_bytes(_raw_pickle(kind))
    with pytest.raises(UnreadableCheckpointError) as raised:
        load_checkpoint(str(path), flag="--resume")
    message = str(raised.value)
    what = "cannot read checkpoint: UnpicklingError" if kind == "protocol 4" else "refused to load"
    assert message.startswith(f"--resume {path}: {what}") and named in message, message
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message, message


def _numpy_values():
    import numpy as np

    values = {}
    for name in ("bool_", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
                 "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble"):
        kind = getattr(np, name)
        values[f"{name} scalar"] = kind(1)
        values[f"{name} array"] = np.arange(3).astype(kind)
    values.update({"str_ scalar": np.str_("abc"), "str array": np.array(["ab", "c"]),
                   "bytes_ scalar": np.bytes_(b"ab"), "bytes array": np.array([b"ab", b"c"]),
                   "datetime64 scalar": np.datetime64("2024-01-02"),
                   "datetime64 array": np.array(["2024-01-02", "2025-03-04"], dtype="M8[D]"),
                   "timedelta64 scalar": np.timedelta64(3, "s"), "timedelta64 array": np.array([1, 2], dtype="m8[s]"),
                   "structured array": np.array([(1.5, 2)], dtype=[("a", "f4"), ("b", "i2")]),
                   "structured scalar": np.array([(1.5, 2)], dtype=[("a", "f4"), ("b", "i2")])[0],
                   "object array": np.array([1, "a", None], dtype=object)})
    if hasattr(getattr(np, "dtypes", None), "StringDType"):
        values["StringDType array"] = np.array(["a", "bc"], dtype=np.dtypes.StringDType())
    return values


@pytest.mark.parametrize("name", sorted(_numpy_values()))
def test_numpy_scalars_and_arrays_of_every_dtype_load_weights_only(tmp_path, name):
    import numpy as np
    import torch

    from util.checkpoint import load_checkpoint

    value = _numpy_values()[name]
    path = tmp_path / "state.pth"
    torch.save({"value": value}, str(path))
    loaded = load_checkpoint(str(path))["value"]
    assert type(loaded) is type(value) and loaded.dtype == value.dtype
    assert np.array_equal(np.asarray(loaded), np.asarray(value))


def test_after_auto_resume_the_error_names_auto_resume(tmp_path, synthetic_dir, capsys):
    from tests.test_data_checks import tiny_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    tiny_checkpoint(out / "checkpoint.pth", "--hidden_dim", "96")  # another model than the flags build
    code, err = cli(synthetic_flags(synthetic_dir, out, "--epochs", "2", "--auto_resume"), capsys)
    assert_one_line_error(code, err, f"--auto_resume {out / 'checkpoint.pth'}", "--hidden_dim 64 (checkpoint: 96)")
    assert "--resume" not in err


# ----------------------------------------------------------------------------- 6: paths compared as real paths

def _drop_epoch_records(log):
    """The log as a kill after the checkpoint leaves it: the epoch record (written last) missing."""
    import json

    lines = [line for line in log.read_text().splitlines() if json.loads(line).get("type") != "epoch"]
    log.write_text("".join(line + "\n" for line in lines))


def test_a_symlinked_output_dir_finishes_the_unfinished_epoch(tmp_path, synthetic_dir, capsys):
    from util.logger import read_jsonl

    real, link = tmp_path / "real", tmp_path / "link"
    code, err = cli(synthetic_flags(synthetic_dir, real, "--epochs", "1", "--max_iters_per_epoch", "1"), capsys)
    assert code == 0, err
    _drop_epoch_records(real / "log.jsonl")
    link.symlink_to(real, target_is_directory=True)
    code, err = cli(synthetic_flags(synthetic_dir, link, "--epochs", "1", "--max_iters_per_epoch", "1",
                                    "--resume", real / "checkpoint.pth"), capsys)
    assert code == 0, err
    epochs = [r["epoch"] for r in read_jsonl(str(real / "log.jsonl")) if r.get("type") == "epoch"]
    assert epochs == [0]  # the tail of epoch 0 (evaluation, epoch record) was redone, once


def test_unsafe_trust_checkpoint_names_the_file_through_a_link(tmp_path, synthetic_dir, capsys):
    from tests.test_checkpoint_safety import _code_running_checkpoint

    real = tmp_path / "legacy.pth"
    _code_running_checkpoint(real, tmp_path / "code_ran")
    link = tmp_path / "trusted_link.pth"
    link.symlink_to(real)
    code, err = cli(synthetic_flags(synthetic_dir, tmp_path / "out", "--eval", "--num_classes", "7",
                                    "--pretrained", real, "--unsafe_trust_checkpoint", link), capsys)
    assert code == 0, err
    assert (tmp_path / "code_ran").exists()  # loaded with full pickle, as the flag asked


def test_predict_reads_an_image_reached_twice_once(tmp_path):
    from PIL import Image

    from predict import collect_images

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (tmp_path / "b.png").symlink_to(folder / "a.png")
    assert collect_images([str(folder), str(tmp_path / "b.png")]) == [str(folder / "a.png")]


# ----------------------------------------------------------------------------- 7: summarize reads logs as main.py does

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


# ----------------------------------------------------------------------------- 3, 5, 4: diagnose.py and predict.py

def _synthetic_model_flags(data_dir):
    """The synthetic data flags a checkpoint records, so that the scripts' probe and images need no others."""
    return ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--synthetic_num_train", "4",
            "--synthetic_num_val", "2", "--synthetic_image_size", "64", "--min_size", "64", "--max_size", "64",
            "--no-random_crop"]


def _script(capsys, script_main, argv):
    """(exit code, stderr) of a script's main(argv)."""
    try:
        code = script_main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _families(metrics):
    return {key.split("/")[0] for key in metrics}


def test_diagnose_measures_each_checkpoint_with_its_own_configuration(tmp_path, synthetic_dir, capsys):
    """A baseline checkpoint, then a guided (v3.0.4) one: the second is measured as v3.0.4 (D1, D2, D6
    included), exactly as it is measured alone -- not with the first one's model."""
    import json

    import diagnose
    from tests.test_data_checks import tiny_checkpoint

    base, guided = tmp_path / "baseline.pth", tmp_path / "v3.0.4.pth"
    tiny_checkpoint(base, *_synthetic_model_flags(synthetic_dir), "--variant", "baseline", "--stages", "2:2")
    tiny_checkpoint(guided, *_synthetic_model_flags(synthetic_dir), "--variant", "v3.0.4", "--stages", "1:1,1:1")
    common = ["--diag_images", "2", "--device", "cpu"]
    assert _script(capsys, diagnose.main, ["--resume", base, guided, "--out", tmp_path / "both", *common])[0] == 0
    assert _script(capsys, diagnose.main, ["--resume", guided, "--out", tmp_path / "alone", *common])[0] == 0
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
    from tests.test_checkpoint_safety import _code_running_checkpoint

    ckpt, marker = tmp_path / "legacy.pth", tmp_path / "code_ran"
    _code_running_checkpoint(ckpt, marker)
    argv = ["--resume", ckpt, "--out", tmp_path / "diag", "--diag_images", "1", "--device", "cpu",
            *_synthetic_model_flags(synthetic_dir)]
    code, err = _script(capsys, diagnose.main, argv)
    assert_one_line_error(code, err, f"--resume {ckpt}", "'io.open'", "--unsafe_trust_checkpoint")
    assert not marker.exists()
    code, err = _script(capsys, diagnose.main, [*argv, "--unsafe_trust_checkpoint", ckpt])
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

    args = tiny_args(*_synthetic_model_flags(data_dir), num_classes=7)
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
    code, err = _script(capsys, predict.main, predict_argv)
    assert_one_line_error(code, err, f"--checkpoint {ckpt}", "argparse.Namespace", "--config FILE")
    code, err = _script(capsys, predict.main, [*predict_argv, "--config", config])
    assert code == 0, err
    assert (tmp_path / "pred" / "detections.json").exists()

    diagnose_argv = ["--resume", ckpt, "--out", tmp_path / "diag", "--diag_images", "1", "--device", "cpu"]
    code, err = _script(capsys, diagnose.main, diagnose_argv)
    assert_one_line_error(code, err, f"--resume {ckpt}", "argparse.Namespace", "--config FILE")
    code, err = _script(capsys, diagnose.main, [*diagnose_argv, "--config", config])
    assert code == 0, err
    assert (tmp_path / "diag" / "diagnostics.json").exists()


# ----------------------------------------------------------------------------- 8: MSDA_IMPL at start-up

@pytest.mark.parametrize("impl,named", [("bogus", "expected one of auto, cuda, triton, pytorch"),
                                        ("triton", "MSDA_IMPL=triton"), ("cuda", "MSDA_IMPL=cuda")])
def test_an_unusable_msda_impl_is_one_line_before_anything_is_written(tmp_path, synthetic_dir, capsys, monkeypatch,
                                                                      impl, named):
    monkeypatch.setenv("MSDA_IMPL", impl)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "out"
    code, err = cli(synthetic_flags(synthetic_dir, out, "--epochs", "1"), capsys)
    assert_one_line_error(code, err, named)
    assert not out.exists()  # no config.yaml, no log.jsonl, no lock


def test_predict_checks_msda_impl_against_its_device(tmp_path, synthetic_dir, capsys, monkeypatch):
    import predict
    from tests.test_data_checks import tiny_checkpoint

    ckpt = tmp_path / "checkpoint.pth"
    tiny_checkpoint(ckpt, *_synthetic_model_flags(synthetic_dir))
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setenv("MSDA_IMPL", "cuda")
    code, err = _script(capsys, predict.main, ["--checkpoint", ckpt, "--images", tmp_path / "a.png", "--out",
                                               tmp_path / "pred", "--device", "cpu"])
    assert_one_line_error(code, err, "MSDA_IMPL=cuda", "cpu")


# ----------------------------------------------------------------------------- 10: one line, not a traceback

@pytest.fixture
def predict_checkpoint(tmp_path, synthetic_dir):
    from PIL import Image

    from tests.test_data_checks import tiny_checkpoint

    ckpt = tmp_path / "checkpoint.pth"
    tiny_checkpoint(ckpt, *_synthetic_model_flags(synthetic_dir))
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    return ckpt


def test_visualize_refs_on_a_refused_checkpoint_is_one_line(tmp_path, synthetic_dir, capsys):
    import visualize_refs
    from tests.helpers import TINY
    from tests.test_checkpoint_safety import _code_running_checkpoint

    ckpt, marker = tmp_path / "legacy.pth", tmp_path / "code_ran"
    _code_running_checkpoint(ckpt, marker)
    argv = [*TINY, *_synthetic_model_flags(synthetic_dir), "--num_classes", "7", "--resume", ckpt,
            "--image", "synthetic:0", "--out", tmp_path / "vis"]
    code, err = _script(capsys, visualize_refs.main, argv)
    assert_one_line_error(code, err, f"--resume {ckpt}", "'io.open'", "--unsafe_trust_checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("script", ["predict", "diagnose"])
def test_out_naming_an_existing_file_is_one_line(tmp_path, predict_checkpoint, capsys, script):
    import diagnose
    import predict

    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    if script == "predict":
        code, err = _script(capsys, predict.main, ["--checkpoint", predict_checkpoint, "--images", tmp_path / "a.png",
                                                   "--out", taken, "--device", "cpu"])
    else:
        code, err = _script(capsys, diagnose.main, ["--resume", predict_checkpoint, "--out", taken, "--diag_images",
                                                    "1", "--device", "cpu"])
    assert_one_line_error(code, err, f"--out {taken}", "not a folder")
    assert taken.read_text() == "a file\n"


def test_predict_on_a_device_that_does_not_exist_is_one_line(tmp_path, predict_checkpoint, capsys):
    import predict

    code, err = _script(capsys, predict.main, ["--checkpoint", predict_checkpoint, "--images", tmp_path / "a.png",
                                               "--out", tmp_path / "pred", "--device", "tpu"])
    assert_one_line_error(code, err, "--device tpu")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_an_image_that_is_not_a_regular_file_is_named_as_such(tmp_path, predict_checkpoint, capsys, kind):
    import predict

    path = "/dev/zero" if kind == "/dev/zero" else str(tmp_path / "pipe.png")
    if kind == "fifo":
        os.mkfifo(path)
    code, err = _script(capsys, predict.main, ["--checkpoint", predict_checkpoint, "--images", path,
                                               "--out", tmp_path / "pred", "--device", "cpu"])
    assert_one_line_error(code, err, f"--images {path}: not a regular file or a folder")
    assert "did you mean" not in err


def test_export_batch_size_zero_blames_batch_size(tmp_path, predict_checkpoint, capsys):
    import export

    code, err = _script(capsys, export.main, ["--checkpoint", predict_checkpoint, "--out", tmp_path / "m.pt2",
                                              "--batch_size", "0"])
    assert_one_line_error(code, err, "--batch_size 0 must be >= 1")
    assert "--image_size" not in err


# ----------------------------------------------------------------------------- 11: a stop signal in the tail's passes

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
    import main as main_module
    import models.capture
    from util.checkpoint import load_checkpoint

    out = tmp_path / "out"
    flags = synthetic_flags(synthetic_dir, out, "--epochs", "1", "--max_iters_per_epoch", "1", "--diag_images", "2")
    if stage == "pictures":
        flags += ["--vis_images", "1", "--tensorboard"]
        calls = _signal_on_first_call(monkeypatch, models.capture, "run_captured")
    else:
        # the signal comes as epoch 0's diagnostics start (not in the pass at initialisation)
        calls = _signal_on_first_call(monkeypatch, main_module, "log_diagnostics", lambda args, kwargs: args[1] == 0)
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
    from tests.test_data_checks import tiny_checkpoint

    ckpt = tmp_path / "model.pth"
    tiny_checkpoint(ckpt, *_synthetic_model_flags(synthetic_dir))
    calls = _signal_on_first_call(monkeypatch, ReferenceDiagnostics, "update")
    code, err = cli(synthetic_flags(synthetic_dir, tmp_path / "eval", "--eval", "--num_classes", "7", "--resume", ckpt,
                                    "--diag_images", "2"), capsys)
    assert calls and code == 143, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM during the reference diagnostics"), err
    assert _records(tmp_path / "eval", "eval_diag") == [] and _records(tmp_path / "eval", "diag") == []
