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
