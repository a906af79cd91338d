"""Checkpoints that survive a killed process, what they hold, and how a run resumes from one.

Every file the trainer writes whole (checkpoints, their numbered copies, config.yaml, the
detections, the rewritten log) goes through ``atomic_write``: a temporary file in the destination
directory, flushed to disk, renamed over the destination, then the directory synced. ``os.replace``
is atomic on POSIX file systems when source and destination are on the same file system (hence
the same directory), so a reader sees either the previous complete file or the new complete file,
never a torn one. Resuming: ``check_resume_configuration`` refuses a checkpoint of another model
before anything loads, ``resume_training_state`` restores optimiser, schedule, scaler and RNG state.
"""
import argparse
import glob
import os
import random
import re
import shutil
import tempfile
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from util.dist import say
from util.errors import InputError
from util.optim import lr_drop_epochs

CHECKPOINT_NAME = "checkpoint.pth"
_NUMBERED = re.compile(r"checkpoint(\d+)\.pth$")
# test-only fault injection (see ``fault_point``)
FAULT_ENV = "DETR_FAULT_POINT"
_fault_counts: Dict[str, int] = {}

# flags that change the model's parameters or the optimiser's parameter groups: a checkpoint made
# with other values cannot be resumed (lr_backbone matters only as zero / non-zero, see below)
ARCHITECTURE_FLAGS = ("backbone", "backbone_norm", "dilation", "num_feature_levels", "enc_layers", "dec_layers",
                      "stages", "dim_feedforward", "hidden_dim", "nheads", "num_queries_one2one",
                      "num_queries_one2many", "dec_n_points", "enc_n_points", "with_box_refine", "two_stage",
                      "mixed_selection", "look_forward_twice", "use_ms_detr", "use_aux_ffn", "num_classes",
                      "enc_ref_mode", "use_dn", "sgd", "lr_backbone_names", "lr_linear_proj_names")
# flags that never affect what a checkpoint holds (left out when listing differences after a failed load)
_RUN_FLAGS = {"epochs", "output_dir", "eval", "eval_every", "print_freq", "max_iters_per_epoch", "tensorboard",
              "num_workers", "device", "start_epoch", "coco_path", "local_rank", "find_unused_parameters",
              "skip_bad_images", "pretrained", "variant", "seed", "train_ann", "val_ann", "diag_images"}


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


def saved_config(checkpoint: Any) -> Dict[str, Any]:
    """The configuration a checkpoint records ({} for a bare state dict or a foreign file)."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return saved or {}


def saved_class_names(checkpoint: Any) -> Dict[int, str]:
    """{category id: name} stored with a checkpoint ({} for older checkpoints and bare state dicts)."""
    names = checkpoint.get("class_names") if isinstance(checkpoint, dict) else None
    return {int(k): str(v) for k, v in (names or {}).items()}


def has_upstream_args(checkpoint: Any) -> bool:
    """Whether the checkpoint's ``args`` is an argparse.Namespace, as in upstream Deformable-DETR /
    H-DETR files: upstream's flags, not this project's configuration (its names and meanings differ)."""
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace)


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value


def _flag_value(saved: Dict, config, name: str):
    """(saved, current) value of a flag, as compared on resume; lists and tuples alike."""
    saved_value, current = _as_list(saved.get(name)), _as_list(getattr(config, name))
    if name == "lr_backbone":  # only freezing (0) versus training (> 0) changes the parameter groups
        return (saved_value or 0) > 0, (current or 0) > 0
    return saved_value, current


def differing_flags(saved: Dict, config, names) -> List[str]:
    """'--flag now (checkpoint: then)' for each flag in ``names`` recorded in ``saved`` with another value."""
    out = []
    for name in names:
        if name not in saved or not hasattr(config, name):
            continue
        then, now = _flag_value(saved, config, name)
        if then != now:
            out.append(f"--{name} {now} (checkpoint: {then})")
    return out


def check_resume_configuration(saved: Dict, config, path: str, flag: str) -> None:
    """A checkpoint made with another architecture or other optimiser groups cannot continue: one
    error naming every flag that differs (before a load fails somewhere inside torch).
    ``saved``: the checkpoint's configuration (``saved_config``)."""
    names = ARCHITECTURE_FLAGS + (() if config.eval else ("lr_backbone",))
    different = differing_flags(saved, config, names)
    if different:
        raise InputError(f"{flag} {path} was made with another model configuration: {'; '.join(different)}")


def all_differences(saved: Dict, config) -> str:
    """'; flags that differ from the checkpoint's: ...' (every flag that can matter), or ''."""
    different = differing_flags(saved, config, [n for n in saved if n not in _RUN_FLAGS])
    return f"; flags that differ from the checkpoint's: {'; '.join(different)}" if different else ""


def resume_training_state(checkpoint: Dict, path: str, optimizer, lr_scheduler, scaler, config,
                          flag: str = "--resume") -> Tuple[int, Dict]:
    """Load optimiser, scheduler, scaler and RNG state from the read ``checkpoint`` (of file
    ``path``, named by ``flag``: --resume or --auto_resume); returns (epoch to start from, the
    training statistics of the checkpoint's epoch)."""
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in checkpoint]
    if missing:
        raise InputError(f"{flag} {path}: not a training checkpoint (no {', '.join(missing)}); "
                         "use --pretrained to start from its weights")
    saved = saved_config(checkpoint)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as exc:  # torch: "loaded state dict contains a parameter group that doesn't match..."
        raise InputError(f"{flag} {path}: the optimiser's parameter groups do not match this run's ({exc})"
                         + all_differences(saved, config)) from None
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint.get("rng_state"))
    return int(checkpoint["epoch"]) + 1, checkpoint.get("train_stats") or {}


# flags whose values a resumed run takes from the checkpoint: the optimiser's parameter groups
# (learning rates, weight decay) and the lr schedule's state are loaded from it, so those win
SCHEDULE_FLAGS = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "lr_drop", "lr_drop_epochs")


def schedule_from_checkpoint(saved: Dict[str, Any], config, path: str) -> Dict[str, Any]:
    """{flag: the checkpoint's value} for each ``SCHEDULE_FLAGS`` flag given another value now, each
    with a warning; the caller records these in the run's configuration, so that config.yaml says
    what the resumed run actually trains with. A changed --batch_size is used, with a warning."""
    kept = {}
    for name in SCHEDULE_FLAGS + ("batch_size",):
        if name not in saved or not hasattr(config, name):
            continue
        then, now = _as_list(saved[name]), _as_list(getattr(config, name))
        if then == now:
            continue
        if name == "batch_size":
            say(f"warning: --batch_size is {now} now but was {then} in {path}; the learning rates continue from "
                "the checkpoint unchanged", flush=True)
            continue
        say(f"warning: --{name} {now} is not used: the optimiser and lr schedule continue from {path}, which has "
            f"{then} (config.yaml records {then})", flush=True)
        kept[name] = then
    return kept
