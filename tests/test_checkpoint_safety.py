"""Issue 17: checkpoints that cannot run code, and the third reliability probe's findings (one
test or a few per finding). Runs go through ``main.cli`` in this process, as in test_reliability.py.
"""
import argparse
import os

import numpy as np
import pytest
import torch

from tests.helpers import tiny_args
from tests.test_data_checks import assert_one_line_error, cli, synthetic_flags, tiny_checkpoint
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
    from util.output_lock import OutputDirLock
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


# ----------------------------------------------------------------------------- images

def test_a_16_bit_png_keeps_its_contrast(tmp_path):
    """Pillow's convert('RGB') clips 16-bit grey at 255 (an all-white image); read_image rescales."""
    import PIL.Image

    from datasets.coco import read_image

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # 0 .. 65535 left to right
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(ramp).save(path)
    with PIL.Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    pixels = np.asarray(read_image(str(path), 7))
    assert pixels.shape == (8, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert np.array_equal(pixels[0, :, 0], np.round(ramp[0] / 257).astype(np.uint8))  # linear, by hand


def test_a_thin_strip_resizes_to_a_usable_image(tmp_path):
    """A 1 x 5000 image: the shorter side would round to 0 (an error that names no file)."""
    from datasets.transforms import scaled_size

    assert scaled_size((1, 5000), 800, 1333) == (1333, 1)
    assert scaled_size((5000, 1), 800, 1333) == (1, 1333)
    # ordinary images as upstream: 800 * 640 / 480 = 1066.67, floored
    assert scaled_size((640, 480), 800, 1333) == (800, 1066)


# ----------------------------------------------------------------------------- one-line errors

def _coco_run(tmp_path, capsys, mutate=None, *extra, images=None):
    import json

    from tests.test_datasets import ann, rectangle_image, write_coco
    from tests.test_data_checks import coco_flags

    root = tmp_path / "coco"
    images = images or [(i, rectangle_image(32, 32, (4, 4, 20, 20)), (32, 32)) for i in (1, 2)]
    anns = [ann(1, (4, 4, 16, 16)), ann(2, (4, 4, 16, 16), 2)]
    for split in ("train", "val"):
        path = write_coco(str(root), images, anns, split=split)
        if mutate is not None:
            with open(path) as f:
                data = json.load(f)
            mutate(data, root / f"{split}2017")
            with open(path, "w") as f:
                json.dump(data, f)
    return cli(coco_flags(str(root), str(tmp_path / "out"), *extra), capsys)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_truncated_image_is_one_line_naming_the_file(tmp_path, capsys, workers):
    def truncate(data, folder):
        path = folder / data["images"][1]["file_name"]
        path.write_bytes(path.read_bytes()[:60])

    code, err = _coco_run(tmp_path, capsys, truncate, "--num_workers", workers)
    assert_one_line_error(code, err, "000002.png", "image id 2")


@pytest.mark.parametrize("value", [0, "abc", -3])
def test_an_image_size_that_is_not_a_positive_integer_is_one_line(tmp_path, capsys, value):
    def bad_width(data, folder):
        data["images"][0]["width"] = value

    code, err = _coco_run(tmp_path, capsys, bad_width)
    assert_one_line_error(code, err, "image id 1", f"width {value!r}", "positive integer")


def test_two_stage_queries_that_cannot_fit_the_tokens_fail_at_start_up(tmp_path, capsys):
    from tests.helpers import TINY

    code, err = cli([*TINY, "--two_stage", "--num_queries_one2one", "400", "--min_size", "64", "--max_size", "64",
                     "--eval_size", "64"], capsys)
    # 64 px: 8x8 + 4x4 + 2x2 + 1x1 = 85 tokens
    assert_one_line_error(code, err, "--two_stage selects 400 queries", "has only 85")


def test_a_full_disk_during_a_checkpoint_save_is_one_line(tmp_path, synthetic_dir):
    """The file system refuses the write (RLIMIT_FSIZE: 'File too large', as a full disk would refuse
    it): one line naming the file and the OS error, exit 1, the previous checkpoint intact."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    previous = {"epoch": 7, "model": {}}
    torch.save(previous, str(out / "checkpoint.pth"))
    flags = [str(a) for a in synthetic_flags(synthetic_dir, out, "--epochs", "1", "--max_iters_per_epoch", "1")]
    limit = 8 * 2 ** 20  # room for the data, the log and config.yaml; not for a checkpoint
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); import main; "
            f"sys.exit(main.cli({flags!r}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert f"cannot write {out / 'checkpoint.pth'}: File too large" in errors[0]
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 7
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------- logs, resume, housekeeping

def test_an_invalid_utf8_byte_in_the_log_does_not_block_resuming(tmp_path, capsys):
    from util.logger import JsonlLogger, read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"type": "epoch", "epoch": 0}\n{"type": "train", "epoch": 1, "x": "\xff"}\n'
                     b'{"type": "train", "epoch": 1}\n')
    logger = JsonlLogger(str(path))
    assert logger.has_epoch_record(0)
    assert logger.drop_epochs_from(1) == (1, 1)  # one record of epoch 1, one unreadable line
    assert read_jsonl(str(path)) == [{"type": "epoch", "epoch": 0}]


def test_resume_with_another_lr_records_the_lr_it_trains_with(tmp_path, synthetic_dir, capsys):
    import yaml

    out = tmp_path / "out"
    flags = synthetic_flags(synthetic_dir, out, "--max_iters_per_epoch", "1", "--lr", "1e-4")
    code, err = cli([*flags, "--epochs", "1"], capsys)
    assert code == 0, err
    code, printed = cli([*flags, "--epochs", "2", "--auto_resume", "--lr", "5e-4"], capsys, with_stdout=True)[::2]
    assert code == 0
    assert "--lr 0.0005 is not used" in printed and "config.yaml records 0.0001" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-4
    assert load_checkpoint(str(out / "checkpoint.pth"))["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1.0e-4\nepochs: 3\nlr: 2.0e-4\n")
    code, err = cli(["--config", config, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(config), "line 3", "key 'lr' appears twice (first at line 1)")


def test_lr_drops_after_the_last_epoch_are_warned_about(capsys):
    from cli.config import parse_args

    parse_args(["--device", "cpu", "--epochs", "5", "--lr_drop_epochs", "3", "5", "8"])
    assert "--lr_drop_epochs 5 8: not before --epochs 5" in capsys.readouterr().out


def test_written_files_are_readable_by_the_group_as_a_plain_open_would_make_them(tmp_path):
    from util.checkpoint import atomic_save, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "config.yaml"), "a: 1\n")
        atomic_save({"x": 1}, str(tmp_path / "checkpoint.pth"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    plain = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert plain == 0o644
    for name in ("config.yaml", "checkpoint.pth"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == plain, name
