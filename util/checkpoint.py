"""Checkpoints that survive a killed process, what they hold, and how a run resumes from one.

Every file the trainer writes whole (checkpoints, their numbered copies, config.yaml, the
detections, the rewritten log) goes through ``atomic_write``: a temporary file in the destination
directory, flushed to disk, renamed over the destination, then the directory synced. ``os.replace``
is atomic on POSIX file systems when source and destination are on the same file system (hence
the same directory), so a reader sees either the previous complete file or the new complete file,
never a torn one. Resuming: ``saved_config`` reads the configuration a checkpoint records (also
upstream's ``argparse.Namespace``), ``differing_flags`` compares the flags the caller names with it
(which flags must match is the command line's business: ``cli.checkpoint_config``), and
``resume_training_state`` restores optimiser, schedule, scaler and RNG state.
"""
import argparse
import glob
import os
import random
import re
import shutil
import tempfile
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from util.errors import InputError
from util.optim import lr_drop_epochs

CHECKPOINT_NAME = "checkpoint.pth"
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


class FileWriteError(OSError):
    """Writing a file failed in the file system (disk full, quota, file too large); the message
    names the file and the OS error, and says the previous file is intact."""


class _WriteRecorder:
    """A file object that remembers the first OSError of its writes: torch.save reports a failed
    write as an 'enforce fail ... unexpected pos' RuntimeError, which hides the cause."""

    def __init__(self, file: IO):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True, fault: Optional[str] = None) -> None:
    """Create or replace the file ``path`` such that it is never seen partially written.

    ``write(f)`` fills a temporary file in the same directory (a rename across file systems
    would not be atomic); the file is flushed and fsynced, renamed over ``path``, and the
    directory is fsynced so the rename itself survives a power loss. On any failure the
    temporary file is removed and the previous ``path`` (if any) is untouched; a failure of the
    file system is a ``FileWriteError`` naming ``path`` and the OS error. The file gets the
    permissions a plain ``open`` would give (the temporary file is created owner-only). ``fault``:
    the name of the ``fault_point`` reached between writing and renaming (tests of crash recovery).
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    recorder = None
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            recorder = _WriteRecorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        if fault is not None:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException as exc:
        # BaseException: also clean up on KeyboardInterrupt; the original error propagates
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(cause, OSError) and not isinstance(exc, FileWriteError):
            reason = f"{cause.strerror} (errno {cause.errno})" if cause.strerror else str(cause)
            raise FileWriteError(f"cannot write {path}: {reason}; the previous {os.path.basename(path)}, if any, "
                                 "is unchanged") from exc
        raise
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through ``atomic_write`` (fault point ``checkpoint_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f), fault="checkpoint_write")


def atomic_write_text(path: str, text: str) -> None:
    """A text file (JSON results, YAML config, the rewritten log) through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_copy(source: str, path: str) -> None:
    """Copy the file ``source`` to ``path`` through ``atomic_write``."""
    def copy(f) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 16 * 1024 * 1024)

    atomic_write(path, copy)


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


class UnreadableCheckpointError(InputError, RuntimeError):
    """A checkpoint file that torch cannot load (a RuntimeError, and bad input: exit 2)."""


def _numpy_globals(core) -> List[Any]:
    """What numpy arrays and scalars of every built-in dtype unpickle through: the array and dtype
    classes, the two reconstructors, and the class of each dtype (bool, every int and uint size,
    float16-longdouble, complex, bytes, str, void / structured, object, datetime64, timedelta64;
    numpy 2's variable-width StringDType through its constructor helper). Object arrays are safe
    here: their elements are unpickled by the same restricted unpickler. Not included: subclasses
    such as masked arrays (``numpy.ma``), which unpickle through their own functions."""
    allowed: List[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    allowed += sorted({type(np.dtype(code)) for code in np.typecodes["All"]}, key=lambda cls: cls.__name__)
    string_dtype = getattr(getattr(np, "dtypes", None), "StringDType", None)
    internal = getattr(core, "_internal", None)
    if string_dtype is not None and hasattr(internal, "_convert_to_stringdtype_kwargs"):
        allowed += [string_dtype, internal._convert_to_stringdtype_kwargs]
    return allowed


def _safe_globals() -> List[Any]:
    """What this project's and upstream Deformable-DETR / H-DETR checkpoints hold beyond tensors and
    containers: the argparse.Namespace of upstream's ``args``, numpy arrays / scalars of any built-in
    dtype (numpy's RNG state in ours). Each entry is a class or function the unpickler may name;
    nothing else loads. numpy 1.x pickles name the same functions under ``numpy.core``; both
    spellings are allowed."""
    core = np._core if hasattr(np, "_core") else np.core
    allowed: List[Any] = [argparse.Namespace, *_numpy_globals(core)]
    if core is not getattr(np, "core", None):
        allowed += [(core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                    (core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    return allowed


# how torch's weights-only unpickler names what it refused, one pattern per message form:
# a global off the allowlist; one in a blocked module (os, posix, sys, nt); older torch's form;
# an object of a class it may not build or create; a function it may not call
_REFUSAL_FORMS = (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+) whose module",
                  r"Unsupported class (\S+)", r"but got <class '([^']+)'>",
                  r"unrecognized function (.+?)(?: which belongs to .*)?$")


def _refused_global(exc: Exception) -> Optional[str]:
    """The global a weights-only load refused ('posix.system', 'io.open'), from torch's message in
    any of its forms; None if the failure was not such a refusal."""
    text = str(exc)
    for form in _REFUSAL_FORMS:
        match = re.search(form, text, flags=re.MULTILINE)
        if match:
            return match.group(1).rstrip(".")
    return None


def _unpickler_reason(text: str) -> str:
    """What torch's weights-only loader says went wrong, without its advice to load with full
    pickle (``weights_only=False``: the opposite of what is wanted here) or its documentation link."""
    kept = []
    for line in text.splitlines():
        line = re.sub(r"^Weights only load failed\.\s*", "", line.strip())
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line and "weights_only" not in line and not line.startswith(("Check the documentation", "(1)", "(2)")):
            kept.append(line)
    return " ".join(kept)


def load_checkpoint(path: str, trusted: bool = False, flag: str = "checkpoint") -> Dict[str, Any]:
    """Read a checkpoint (or any torch file) onto the CPU without running code from it.

    ``torch.load(weights_only=True)`` with ``_safe_globals`` allowed: a file whose unpickling
    needs any other global (a class, or a function such as ``os.system`` that unpickling would
    call) is refused with an ``UnreadableCheckpointError`` naming the file and the global, before
    anything in it runs. ``trusted`` (``--unsafe_trust_checkpoint FILE``) loads a legacy file the
    user vouches for with full pickle. A truncated or foreign file is the same one-line error.
    ``flag``: how the file was given (``--resume``, ``--pretrained``), for the message.
    """
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        allowed = _safe_globals()
        if not hasattr(torch.serialization, "safe_globals"):  # torch 2.4: only the process-wide list
            torch.serialization.add_safe_globals([g for g in allowed if not isinstance(g, tuple)])
            return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = _refused_global(exc)
        if refused is not None:
            raise UnreadableCheckpointError(
                f"{flag} {path}: refused to load: unpickling it would import or call '{refused}', which can run "
                "code; nothing from it was executed. If you trust this file, pass --unsafe_trust_checkpoint "
                f"{path}") from None
        if "Weights only load failed" in str(exc):  # no global named: not a pickle it reads (garbage, a new opcode)
            first_line = _unpickler_reason(str(exc))
        else:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise UnreadableCheckpointError(f"{flag} {path}: cannot read checkpoint: {type(exc).__name__}: "
                                        f"{first_line}") from exc


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


# ----------------------------------------------------------------------------- what a checkpoint holds

def checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch: int, config_values: Dict[str, Any],
                     train_stats: Optional[Dict] = None, class_names: Optional[Dict[int, str]] = None) -> Dict:
    """Everything ``--resume`` needs to continue exactly where this epoch ended (and to write the
    epoch's log record if the run was killed before it). ``config_values``: the run's configuration
    as {flag: plain value} (``cli.config.config_dict``), saved as ``args``. ``class_names``: {category
    id: name} of the training data, for pictures of the trained model (plain ints and strings)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": dict(config_values),
        "rng_state": capture_rng_state(),
        "train_stats": dict(train_stats or {}),
        "class_names": {int(k): str(v) for k, v in (class_names or {}).items()},
    }


def numbered_checkpoint_paths(output_dir: str, epoch: int, config) -> List[str]:
    """checkpointNNNN.pth on the epoch before an lr drop and on the last one (else nothing)."""
    if epoch + 1 in lr_drop_epochs(config) or epoch + 1 == config.epochs:
        return [os.path.join(output_dir, f"checkpoint{epoch:04}.pth")]
    return []


def plain_value(value: Any) -> Any:
    """``value`` with numpy scalars and arrays (upstream checkpoints' ``args`` hold them) turned into
    Python numbers and lists, and tuples into lists, recursively: comparable with flag values and
    writable as YAML."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {key: plain_value(item) for key, item in value.items()}
    return value


def saved_config(checkpoint: Any) -> Dict[str, Any]:
    """The configuration a checkpoint records, as {flag name: plain value}: this project's dict, or
    upstream's ``argparse.Namespace`` (its keys are upstream's flag names; those that are not this
    project's are simply never asked for). {} for a bare state dict or a foreign file."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(saved, argparse.Namespace):
        saved = vars(saved)
    if not isinstance(saved, dict):
        return {}
    return {str(key): plain_value(value) for key, value in saved.items()}


def saved_class_names(checkpoint: Any) -> Dict[int, str]:
    """{category id: name} stored with a checkpoint ({} for older checkpoints and bare state dicts)."""
    names = checkpoint.get("class_names") if isinstance(checkpoint, dict) else None
    return {int(k): str(v) for k, v in (names or {}).items()}


def has_upstream_args(checkpoint: Any) -> bool:
    """Whether the checkpoint's ``args`` is an argparse.Namespace, as in upstream Deformable-DETR /
    H-DETR files: upstream's flags, not this project's configuration (its names and meanings differ)."""
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace)


def differing_flags(saved: Dict, config, names: Iterable[str]) -> List[Tuple[str, Any, Any]]:
    """(flag, value now, the checkpoint's value) for each flag in ``names`` that ``saved`` (a
    ``saved_config``) records with another value; flags it does not record are not compared."""
    out = []
    for name in names:
        if name not in saved or not hasattr(config, name):
            continue
        then, now = saved[name], plain_value(getattr(config, name))
        if then != now:
            out.append((name, now, then))
    return out


def describe_differences(differences: Sequence[Tuple[str, Any, Any]]) -> str:
    """'--flag now (checkpoint: then); ...' of ``differing_flags``' answer."""
    return "; ".join(f"--{name} {now} (checkpoint: {then})" for name, now, then in differences)


def resume_training_state(checkpoint: Dict, path: str, optimizer, lr_scheduler, scaler,
                          differences: str = "", flag: str = "--resume") -> Tuple[int, Dict]:
    """Load optimiser, scheduler, scaler and RNG state from the read ``checkpoint`` (of file
    ``path``, named by ``flag``: --resume or --auto_resume); returns (epoch to start from, the
    training statistics of the checkpoint's epoch). ``differences``: added to the error when the
    optimiser's parameter groups do not fit (which flags differ from the checkpoint's)."""
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in checkpoint]
    if missing:
        raise InputError(f"{flag} {path}: not a training checkpoint (no {', '.join(missing)}); "
                         "use --pretrained to start from its weights")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as exc:  # torch: "loaded state dict contains a parameter group that doesn't match..."
        raise InputError(f"{flag} {path}: the optimiser's parameter groups do not match this run's ({exc})"
                         + differences) from None
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint.get("rng_state"))
    return int(checkpoint["epoch"]) + 1, checkpoint.get("train_stats") or {}
