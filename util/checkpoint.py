"""Checkpoints that survive a killed process, and the random-number state that makes resuming exact.

A checkpoint is written to a temporary file in the destination directory, flushed to disk,
and only then renamed over the destination. ``os.replace`` is atomic on POSIX file systems
when source and destination are on the same file system (hence the same directory), so a
reader sees either the previous complete file or the new complete file, never a torn one.
"""
import glob
import os
import random
import re
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth"
_NUMBERED = re.compile(r"checkpoint(\d+)\.pth$")


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


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU; a clear error names the file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc


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
