"""The output folder's lock (``.lock``): one run per folder, checked before anything is written;
a dead run's lock is taken over; a requeued SLURM job takes over its own, a live run of the same
job (an salloc session) keeps it."""
import os
import socket
import subprocess
import sys

import pytest

from tests.run_helpers import assert_one_line_error, cli, coco_flags, small_coco, synthetic_flags
from util.errors import InputError
from util.output_lock import OutputDirLock


# ----------------------------------------------------------------------------- one run per folder

def test_second_run_in_a_used_output_dir_fails_fast(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # a live owner (this test process) on this host
    (out / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    small_coco(str(tmp_path / "data"))
    code, err = cli(coco_flags(tmp_path / "data", out), capsys)
    assert_one_line_error(code, err, "--output_dir", f"in use by process {os.getpid()}", ".lock")
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written: no log, no config, no checkpoint


def test_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = OutputDirLock(str(tmp_path))
    (tmp_path / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    lock.acquire()
    assert "taking over the stale lock" in capsys.readouterr().out
    assert (tmp_path / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
    with pytest.raises(InputError, match="in use by process"):
        OutputDirLock(str(tmp_path)).acquire()  # we hold it now
    lock.release()
    assert not (tmp_path / ".lock").exists()
    # another host's lock cannot be checked for liveness: an error, not a takeover
    (tmp_path / ".lock").write_text("1 some-other-host\n")
    with pytest.raises(InputError, match="some-other-host"):
        OutputDirLock(str(tmp_path)).acquire()


# ----------------------------------------------------------------------------- SLURM jobs

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
