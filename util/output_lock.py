"""Ownership of an output directory by one run: the lock file ``.lock``."""
import errno
import os
import socket
from typing import Optional, Tuple

from util.errors import InputError

LOCK_NAME = ".lock"


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, but belongs to another user
    return True


class OutputDirLock:
    """Ownership of an output directory by one run: the file ``.lock`` holding "pid host [slurm job id]".

    ``acquire`` creates it exclusively. If it exists, it is taken over (with a message) only when
    its owner is known to be gone: on this host, a process id that no longer runs; on another host,
    a lock of this SLURM job (a requeued job restarts under its old job id on whichever node it
    gets, after its first run was preempted). A live process on this host owns the directory even
    under the same SLURM job id (a second launch inside one allocation), so that, and any lock from
    another host that is not this job's, is an ``InputError`` naming the owner (delete the file if
    that run is known to be dead).
    ``release`` removes the file if it is still ours.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.job = os.environ.get("SLURM_JOB_ID", "")
        self.owner = f"{os.getpid()} {socket.gethostname()}" + (f" {self.job}" if self.job else "")
        self.held = False

    def _read_owner(self) -> Tuple[Optional[int], str, str]:
        """(pid, host, slurm job id or '') of the lock file; (None, '', '') when unreadable."""
        try:
            with open(self.path) as f:
                fields = f.read().split()
            return int(fields[0]), fields[1], (fields[2] if len(fields) > 2 else "")
        except (OSError, ValueError, IndexError):
            return None, "", ""

    def _stale_reason(self, pid: Optional[int], host: str, job: str) -> Optional[str]:
        """Why an existing lock may be taken over, or None when it belongs to a live (or unknown) run."""
        if pid is None:
            return None
        if host == socket.gethostname():
            if not _process_alive(pid):
                return f"of process {pid} (no longer running)"
            return None
        if self.job and job == self.job:
            return f"left by this SLURM job's earlier run (job {job}, process {pid} on {host}; requeued)"
        return None

    def acquire(self) -> None:
        for _ in range(3):  # a takeover races with other starters at most a few times
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host, job = self._read_owner()
                reason = self._stale_reason(pid, host, job)
                if reason is not None:
                    print(f"output dir: taking over the stale lock {self.path} {reason}", flush=True)
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                owner = f"process {pid} on host {host}" if pid is not None else "an unreadable owner"
                owner += f" (SLURM job {job})" if job else ""
                if pid is not None and self.job and job == self.job:
                    owner += ", still running under this same SLURM job (a second launch in one allocation?)"
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
