"""Training-time reporting: on-device loss windows, a progress bar, a JSON-lines log, TensorBoard.

Nothing here synchronises the accelerator per iteration: ``LossWindow`` adds losses on the
device and reads them back (one ``.tolist()``, reduced across ranks) only when a window of
``--print_freq`` iterations closes.
"""
import json
import math
import os
import sys
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, TextIO

import torch

from util.dist import get_world_size, is_dist_avail_and_initialized
from util.jsonl import parse_line, read_jsonl  # noqa: F401  (read_jsonl: part of this module's interface)


def format_seconds(seconds: float) -> str:
    """12345.6 -> '3:25:45'; non-finite -> '?'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class LossWindow:
    """Sums of scalar losses over a window of iterations, kept on the device.

    ``add`` costs a few tiny device ops and no host sync. It also remembers, on the device,
    the first iteration whose total loss was not finite and which terms were not finite then,
    so the error can name them after the fact. ``close`` reduces across ranks and returns
    host floats (one sync per window).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.names: Optional[List[str]] = None
        self.sums: Optional[torch.Tensor] = None
        self.count = 0
        self.first_bad_iter = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_terms: Optional[torch.Tensor] = None
        self.bad_outputs = torch.zeros((), dtype=torch.bool, device=self.device)

    def add(self, iteration: int, values: Dict[str, torch.Tensor], total_key: str = "loss",
            diverged: Optional[torch.Tensor] = None) -> None:
        """values: name -> 0-dim tensor (same names every call). ``values[total_key]`` is the total.

        ``diverged``: optional 0-dim bool (device), True when the predictions or gradients of this
        step were not finite; counted like a non-finite total loss (same sync, same report).
        """
        if self.names is None:
            self.names = sorted(values)
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
            self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=self.device)
        elif set(values) != set(self.names):
            raise RuntimeError(f"loss terms changed within a window: {sorted(values)} vs {self.names}")
        stacked = torch.stack([values[k].detach().to(self.device, torch.float64) for k in self.names])
        self.sums += stacked
        self.count += 1
        total_bad = ~torch.isfinite(stacked[self.names.index(total_key)])
        if diverged is not None:
            total_bad = total_bad | diverged.to(self.device)
            self.bad_outputs = torch.where(total_bad & (self.first_bad_iter < 0), diverged.to(self.device),
                                           self.bad_outputs)
        first_time = total_bad & (self.first_bad_iter < 0)
        self.first_bad_iter = torch.where(first_time, torch.full_like(self.first_bad_iter, iteration),
                                          self.first_bad_iter)
        self.bad_terms = torch.where(first_time, ~torch.isfinite(stacked), self.bad_terms)

    def close(self) -> Dict[str, float]:
        """Mean of each value over the window and over ranks; resets the sums.

        Adds '_nonfinite' (> 0 when any rank saw a non-finite total loss in this window).
        Every rank must call it at the same iteration (it all-reduces).
        """
        if self.names is None or self.count == 0:
            return {}
        flag = (self.first_bad_iter >= 0).to(torch.float64).reshape(1)
        packed = torch.cat([self.sums / self.count, flag])
        if is_dist_avail_and_initialized() and get_world_size() > 1:
            torch.distributed.all_reduce(packed)
            packed[:-1] /= get_world_size()
        host = packed.tolist()
        result = dict(zip(self.names, host[:-1]))
        result["_nonfinite"] = host[-1]
        self.sums.zero_()
        self.count = 0
        return result

    def mark_diverged(self, iteration: int) -> None:
        """Record a step that failed on non-finite predictions (no values to add); host side, off the hot path."""
        if int(self.first_bad_iter.item()) < 0:
            self.first_bad_iter.fill_(iteration)
            self.bad_outputs.fill_(True)

    def nonfinite_report(self) -> Optional[Dict]:
        """This rank's first non-finite iteration, the terms that were non-finite then and whether
        the predictions (or gradients) were (None if none)."""
        iteration = int(self.first_bad_iter.item())
        if iteration < 0:
            return None
        flags = self.bad_terms.tolist() if self.bad_terms is not None else []
        return {"iteration": iteration, "terms": [n for n, bad in zip(self.names or [], flags) if bad],
                "outputs": bool(self.bad_outputs.item())}


class ProgressBar:
    """One-line progress display on stderr for the main process.

    On a terminal the line is redrawn in place (at most every 0.2 s); otherwise (logs, CI)
    one line is printed per closed window, so files stay readable.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: Optional[TextIO] = None):
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.time()
        self.last_draw = 0.0
        self.fields: Dict[str, str] = {}
        self.rate = float("nan")

    def _line(self, done: int) -> str:
        elapsed = time.time() - self.start
        if done > 0 and not math.isfinite(self.rate):
            self.rate = done / max(elapsed, 1e-9)
        eta = (self.total - done) / self.rate if self.rate and math.isfinite(self.rate) and self.rate > 0 else None
        width = 20
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        extra = " ".join(f"{k} {v}" for k, v in self.fields.items())
        rate = f"{self.rate:.2f} it/s" if math.isfinite(self.rate) else "? it/s"
        return (f"{self.desc} [{bar}] {done}/{self.total} {extra} {rate} "
                f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta) if eta is not None else '?'}")

    def tick(self, done: int) -> None:
        """Called every iteration; only redraws on a terminal (host-side work only)."""
        if not self.enabled or not self.is_tty:
            return
        now = time.time()
        if now - self.last_draw >= 0.2:
            self.last_draw = now
            self.stream.write("\r" + self._line(done) + "\033[K")
            self.stream.flush()

    def update(self, done: int, fields: Dict[str, str], rate: float) -> None:
        """A window closed: new values to show; prints a line when not on a terminal."""
        if not self.enabled:
            return
        self.fields = fields
        self.rate = rate
        if self.is_tty:
            self.last_draw = time.time()
            self.stream.write("\r" + self._line(done) + "\033[K")
        else:
            self.stream.write(self._line(done) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.is_tty:
            self.stream.write("\n")
            self.stream.flush()


class LogCleanup(NamedTuple):
    """What ``JsonlLogger.drop_epochs_from`` removed: records of redone epochs, and unreadable lines."""

    records: int
    unreadable: int


# record types that belong to one training epoch; a rerun of that epoch writes them again
EPOCH_RECORD_TYPES = ("train", "epoch")
# the epoch of a record written before the first training step (the model at initialisation): it
# belongs to no epoch and is never redone
INIT_EPOCH = -1


class JsonlLogger:
    """Appends one JSON object per line to ``path`` (main process only; None path: no-op).

    Each record is written and flushed whole, so a killed run leaves a readable file.
    """

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: Dict) -> None:
        if not self.path:
            return
        line = json.dumps(record, default=_json_default, allow_nan=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def records(self) -> List[Dict]:
        return read_jsonl(self.path) if self.path else []

    def has_epoch_record(self, epoch: int) -> bool:
        """Whether the epoch record (the last step of an epoch) of ``epoch`` was written."""
        return any(r.get("type") == "epoch" and r.get("epoch") == epoch for r in self.records())

    def drop_epochs_from(self, first_epoch: int, tail_types: Iterable[str] = ()) -> LogCleanup:
        """Remove the train/epoch records of epochs >= ``first_epoch`` (about to be trained again),
        repeated epoch records, and unreadable lines (a line cut short by a kill, invalid UTF-8).

        Called at start-up, so an epoch interrupted and redone is in the log once. ``tail_types``:
        the record types written in an epoch's tail before its epoch record (the evaluation extras
        declare theirs); such a record of an epoch >= ``first_epoch``, or of an epoch without its
        epoch record (a tail cut short, which is redone), goes too, except at ``INIT_EPOCH``
        (written before training, in no epoch, never redone). Other records (errors, evaluations,
        data summaries) are history and stay.
        """
        if not self.path or not os.path.isfile(self.path):
            return LogCleanup(0, 0)
        with open(self.path, "rb") as f:
            lines = f.readlines()
        parsed = [(line, parse_line(line)) for line in lines]
        unreadable = sum(record is None for _, record in parsed)
        finished = {r["epoch"] for _, r in parsed
                    if r is not None and r.get("type") == "epoch" and isinstance(r.get("epoch"), int)}
        tail_types = tuple(tail_types)
        kept, seen_epochs = [], set()
        for line, record in parsed:
            if record is None:
                continue
            if record.get("type") in EPOCH_RECORD_TYPES + tail_types and isinstance(record.get("epoch"), int):
                if record["epoch"] >= first_epoch:
                    continue
                if record["type"] in tail_types and record["epoch"] not in finished and record["epoch"] != INIT_EPOCH:
                    continue
                if record["type"] == "epoch":
                    if record["epoch"] in seen_epochs:
                        continue
                    seen_epochs.add(record["epoch"])
            kept.append(line.decode("utf-8").rstrip("\n") + "\n")
        cleanup = LogCleanup(len(lines) - len(kept) - unreadable, unreadable)
        if cleanup.records or cleanup.unreadable:
            from util.checkpoint import atomic_write_text
            atomic_write_text(self.path, "".join(kept))
        return cleanup


def _json_default(value):
    """Tensors and numpy scalars in records become plain numbers or lists."""
    if torch.is_tensor(value):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class TensorboardLogger:
    """Scalars and images to TensorBoard in ``log_dir``; a silent no-op when disabled or unavailable."""

    def __init__(self, log_dir: Optional[str], enabled: bool = True):
        self.writer = None
        if not (enabled and log_dir):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # tensorboard missing or broken: training must not depend on it
            print(f"warning: TensorBoard disabled ({exc})", file=sys.stderr)
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def image(self, tag: str, picture, step: int) -> None:
        """An RGB PIL image (or (H, W, 3) uint8 array) under ``tag``."""
        if self.writer is None:
            return
        import numpy as np
        self.writer.add_image(tag, np.asarray(picture, dtype=np.uint8), step, dataformats="HWC")

    @property
    def active(self) -> bool:
        """Whether anything logged here is written."""
        return self.writer is not None

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
