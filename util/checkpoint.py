"""Checkpoints that survive a killed process, and the random-number state that makes resuming exact.

A checkpoint is written to a temporary file in the destination directory, flushed to disk,
and only then renamed over the destination. ``os.replace`` is atomic on POSIX file systems
when source and destination are on the same file system (hence the same directory), so a
reader sees either the previous complete file or the new complete file, never a torn one.
"""
import errno
import glob
import os
import random
import re
import shutil
import socket
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from util.errors import InputError

CHECKPOINT_NAME = "checkpoint.pth"
LOCK_NAME = ".lock"
_NUMBERED = re.compile(r"checkpoint(\d+)\.pth$")
# test-only fault injection (see ``fault_point``)
FAULT_ENV = "DETR_FAULT_POINT"
_fault_counts: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when the environment asks for it (tests of crash recovery).

    ``DETR_FAULT_POINT=NAME@N`` ends the process with ``os._exit(137)`` the N-th time (1-based)
    the point ``NAME`` is reached; no ``finally`` blocks or exit handlers run. Unset (always,
    outside tests) this is one dictionary lookup. Points: ``train_iter`` (after each training
    step), ``checkpoint_write`` (inside ``atomic_save``, temporary file written, not yet renamed),
    ``after_checkpoint``, ``eval_iter`` (after each evaluation batch), ``before_log``.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        os._exit(137)


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself (the directory entry); not possible on every platform."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left partially written.

    On any failure the temporary file is removed and the previous ``path`` (if any) is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    # same directory as the destination: a rename across file systems would not be atomic
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("checkpoint_write")
        os.replace(tmp, path)
    except BaseException:
        # BaseException: also clean up on KeyboardInterrupt; the original error propagates
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file (JSON results, YAML config) with the same temp-file-then-rename guarantee."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_copy(source: str, path: str) -> None:
    """Copy the file ``source`` to ``path`` with the same temp-file-then-rename guarantee."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, open(source, "rb") as src:
            shutil.copyfileobj(src, f, 16 * 1024 * 1024)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def remove_stale_temp_files(output_dir: str) -> List[str]:
    """Delete the temporary files (``.NAME.XXXX.tmp``) that a killed save left in ``output_dir``.

    Only safe while this process owns the directory (``OutputDirLock``): another run's save in
    progress would lose its temporary file. Returns the removed paths.
    """
    removed = []
    for path in glob.glob(os.path.join(output_dir, ".*.tmp")):
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, but belongs to another user
    return True


class OutputDirLock:
    """Ownership of an output directory by one run: the file ``.lock`` holding "pid host".

    ``acquire`` creates it exclusively. If it exists: a lock of a process that is gone (same
    host) is taken over with a message; any other lock is an ``InputError`` naming the owner.
    A lock from another host cannot be checked, so it is an error too (delete the file if that
    run is known to be dead). ``release`` removes the file if it is still ours.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.owner = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def _read_owner(self):
        try:
            with open(self.path) as f:
                pid_text, _, host = f.read().strip().partition(" ")
            return int(pid_text), host
        except (OSError, ValueError):
            return None, ""

    def acquire(self) -> None:
        for _ in range(3):  # a takeover races with other starters at most a few times
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._read_owner()
                if pid is not None and host == socket.gethostname() and not _process_alive(pid):
                    print(f"output dir: taking over the stale lock {self.path} of process {pid} "
                          f"(no longer running)", flush=True)
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                owner = f"process {pid} on host {host}" if pid is not None else "an unreadable owner"
                raise InputError(f"--output_dir {os.path.dirname(self.path)} is in use by {owner} (lock file "
                                 f"{self.path}); use another --output_dir, or delete the lock file if that run "
                                 "is dead") from None
            with os.fdopen(fd, "w") as f:
                f.write(self.owner + "\n")
            self.held = True
            return
        raise InputError(f"could not take the lock {self.path}: other runs keep starting in the same --output_dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as f:
                if f.read().strip() != self.owner:
                    return
            os.remove(self.path)
        except OSError:
            pass


class UnreadableCheckpointError(InputError, RuntimeError):
    """A checkpoint file that torch cannot load (a RuntimeError, and bad input: exit 2)."""


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU; ``UnreadableCheckpointError`` names the file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnreadableCheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint ``--auto_resume`` continues from: ``checkpoint.pth`` (rewritten every epoch)
    if present, else the highest-numbered ``checkpointNNNN.pth``, else None."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    latest = os.path.join(output_dir, CHECKPOINT_NAME)
    if os.path.isfile(latest):
        return latest
    numbered = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint*.pth")):
        match = _NUMBERED.search(os.path.basename(path))
        if match:
            numbered.append((int(match.group(1)), path))
    return max(numbered)[1] if numbered else None


def capture_rng_state() -> Dict[str, Any]:
    """Every generator a training step may draw from: torch (CPU and CUDA), numpy, python."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Inverse of ``capture_rng_state``; parts that are missing (or CUDA on a CPU machine) are skipped."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        # a run resumed on fewer GPUs restores what it can
        count = min(len(cuda_states), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda_states[index].cpu(), index)
