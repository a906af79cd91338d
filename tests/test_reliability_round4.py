"""Issue 27: the fourth reliability probe's findings (defects 2, 3, 5-11 of its list), one test or a few
per finding. Runs go through ``main.cli`` (and the scripts' ``main``) in this process, as in
test_reliability.py; the signal tests send the signal from inside the pass they interrupt.
"""
import os
import socket
import subprocess
import sys

import pytest

from tests.test_reliability import assert_one_line_error, cli, synthetic_flags

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
    (tmp_path / ".lock").write_text(f"{sleeping_child} {socket.gethostname()} 777\n")
    with pytest.raises(InputError, match=f"in use by process {sleeping_child} on host .*SLURM job 777.*still running"):
        OutputDirLock(str(tmp_path)).acquire()
    assert (tmp_path / ".lock").read_text().split()[0] == str(sleeping_child)  # untouched


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
    # same host, dead process (a requeue onto the same node); another host (a requeue elsewhere);
    # this process's own id, not held here (a restart in a container that got the same id)
    for owner in (f"{dead.pid} {host} 777", "4242 node017 777", f"{os.getpid()} {host} 777"):
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
    assert message.startswith(f"--resume {path}: refused to load") and named in message, message
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
    from tests.test_reliability import tiny_checkpoint

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
    from tests.test_reliability_round3 import _code_running_checkpoint

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
