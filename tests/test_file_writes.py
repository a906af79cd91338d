"""Files the trainer writes: a full disk is one line naming the file, the previous checkpoint
intact; written files get the permissions a plain open would give them."""
import os

import torch

from tests.run_helpers import synthetic_flags
from util.checkpoint import load_checkpoint


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
