"""Checkpoints are read without running code from them: what is refused and how the refusal reads,
what does load (numpy state, upstream release files), and ``--unsafe_trust_checkpoint``."""
import argparse
import os

import numpy as np
import pytest
import torch

from tests.helpers import tiny_args
from tests.run_helpers import assert_one_line_error, cli, code_running_checkpoint, synthetic_flags
from util.checkpoint import UnreadableCheckpointError, load_checkpoint


# ----------------------------------------------------------------------------- checkpoints cannot run code

@pytest.mark.parametrize("how", ["--pretrained", "--resume", "--eval --resume", "--auto_resume"])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, synthetic_dir, capsys, how):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "code_ran"
    ckpt = out / "checkpoint.pth"
    code_running_checkpoint(ckpt, marker)
    extra = {"--pretrained": ["--pretrained", ckpt], "--resume": ["--resume", ckpt],
             "--eval --resume": ["--eval", "--resume", ckpt], "--auto_resume": ["--auto_resume"]}[how]
    code, err = cli(synthetic_flags(synthetic_dir, out, "--epochs", "1", *extra), capsys)
    assert_one_line_error(code, err, str(ckpt), "'io.open'", "refused", "--unsafe_trust_checkpoint")
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert not (out / "log.jsonl").exists() or "epoch" not in (out / "log.jsonl").read_text()


def test_trusted_legacy_file_loads_with_the_explicit_flag(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "legacy.pth"
    code_running_checkpoint(ckpt, marker)
    with pytest.raises(UnreadableCheckpointError):
        load_checkpoint(str(ckpt))
    assert not marker.exists()
    assert "model" in load_checkpoint(str(ckpt), trusted=True)
    assert marker.exists()  # what the flag's name warns about


def test_unsafe_trust_checkpoint_names_the_file_through_a_link(tmp_path, synthetic_dir, capsys):

    real = tmp_path / "legacy.pth"
    code_running_checkpoint(real, tmp_path / "code_ran")
    link = tmp_path / "trusted_link.pth"
    link.symlink_to(real)
    code, err = cli(synthetic_flags(synthetic_dir, tmp_path / "out", "--eval", "--num_classes", "7",
                                    "--pretrained", real, "--unsafe_trust_checkpoint", link), capsys)
    assert code == 0, err
    assert (tmp_path / "code_ran").exists()  # loaded with full pickle, as the flag asked


# ----------------------------------------------------------------------------- how a refusal reads

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


def test_unreadable_resume_checkpoint_is_one_line(tmp_path, synthetic_dir, capsys):
    broken = tmp_path / "checkpoint.pth"
    broken.write_bytes(b"not a checkpoint")
    code, err = cli(synthetic_flags(synthetic_dir, tmp_path / "out", "--resume", broken), capsys)
    assert_one_line_error(code, err, "cannot read checkpoint", str(broken))


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


# ----------------------------------------------------------------------------- what loads

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
