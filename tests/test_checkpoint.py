"""util.checkpoint: atomic writes (also under kill -9), finding the latest checkpoint, RNG state."""
import glob
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from util.checkpoint import (atomic_save, atomic_write_text, capture_rng_state, find_latest_checkpoint,
                             load_checkpoint, restore_rng_state)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _temp_files(directory):
    return glob.glob(os.path.join(directory, ".*.tmp"))


def test_atomic_save_roundtrip_and_replace(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    atomic_save({"epoch": 0, "w": torch.arange(5)}, path)
    atomic_save({"epoch": 1, "w": torch.arange(6)}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.arange(6))
    assert _temp_files(str(tmp_path)) == []


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


def test_failed_save_keeps_previous_and_cleans_up(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    atomic_save({"epoch": 3}, path)
    with pytest.raises(RuntimeError, match="on purpose"):
        atomic_save({"epoch": 4, "bad": _Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 3
    assert _temp_files(str(tmp_path)) == []


def test_atomic_write_text(tmp_path):
    path = str(tmp_path / "sub" / "config.yaml")
    atomic_write_text(path, "a: 1\n")
    atomic_write_text(path, "a: 2\n")
    assert open(path).read() == "a: 2\n"


def test_every_atomic_write_persists_the_rename(tmp_path, monkeypatch):
    """Checkpoints, copies and text files alike fsync their directory after the rename (and only after it)."""
    import util.checkpoint as checkpoint

    synced = []
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda directory: synced.append(
        (directory, sorted(n for n in os.listdir(directory)))))
    saved, copied, text = (str(tmp_path / n) for n in ("a.pth", "b.pth", "c.json"))
    checkpoint.atomic_save({"epoch": 1}, saved)
    checkpoint.atomic_copy(saved, copied)
    checkpoint.atomic_write_text(text, "[]")
    # each call synced the destination's directory once, when its file was already in place
    assert synced == [(str(tmp_path), ["a.pth"]), (str(tmp_path), ["a.pth", "b.pth"]),
                      (str(tmp_path), ["a.pth", "b.pth", "c.json"])]
    assert open(text).read() == "[]" and open(copied, "rb").read() == open(saved, "rb").read()


def test_load_checkpoint_names_broken_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint.pth"):
        load_checkpoint(str(path))


def test_find_latest_checkpoint(tmp_path):
    d = str(tmp_path)
    assert find_latest_checkpoint(d) is None
    assert find_latest_checkpoint(os.path.join(d, "missing")) is None
    for name in ("checkpoint0003.pth", "checkpoint0011.pth", ".checkpoint.pth.x.tmp", "checkpoint_best.pth"):
        (tmp_path / name).write_bytes(b"")
    assert find_latest_checkpoint(d) == os.path.join(d, "checkpoint0011.pth")
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert find_latest_checkpoint(d) == os.path.join(d, "checkpoint.pth")


def test_rng_state_roundtrip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


# A child that rewrites a large checkpoint forever; the parent kills it mid-write.
_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    from util.checkpoint import atomic_save
    path = sys.argv[1]
    big = torch.randn(48 * 1024 * 1024 // 4)  # 48 MB per write
    atomic_save({{"epoch": 0, "marker": torch.arange(10)}}, path)
    print("ready", flush=True)
    epoch = 1
    while True:
        atomic_save({{"epoch": epoch, "marker": torch.arange(10) + epoch, "big": big}}, path)
        epoch += 1
""")


def test_kill_during_write_leaves_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=REPO), path], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        # wait until a write is in progress: a temporary file that already holds data
        deadline = time.time() + 60
        caught = False
        while time.time() < deadline:
            partial = [p for p in _temp_files(str(tmp_path)) if os.path.exists(p) and os.path.getsize(p) > 0]
            if partial:
                caught = True
                break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert caught, "never observed a write in progress"
    state = load_checkpoint(path)  # the last complete checkpoint, never a torn one
    assert torch.equal(state["marker"], torch.arange(10) + state["epoch"])
    # the killed write's temporary file may remain; it is never mistaken for a checkpoint
    assert find_latest_checkpoint(str(tmp_path)) == path
