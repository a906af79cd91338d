"""Seeding that makes a run reproducible and a resumed run bit-exact.

Every random stream is derived from (``--seed``, epoch, rank, worker id), never from what ran
before it, so an epoch draws the same numbers whether or not the run was restarted.
"""
import contextlib
import random

import numpy as np
import torch
from torch.utils.data import RandomSampler

from util.interrupt import ignore_stop_signals


def mix_seed(*parts: int) -> int:
    """A well-spread 32-bit seed from several integers (seed, epoch, rank, worker id...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochRandomSampler(RandomSampler):
    """RandomSampler whose order depends only on (seed, epoch): a resumed run sees the same order."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(mix_seed(self.seed, epoch))


class WorkerSeeder:
    """``worker_init_fn`` seeding each loader worker from (seed, epoch, rank, worker_id).

    Workers are started afresh every epoch (no persistent workers), so setting ``epoch``
    before iterating is enough for them to see it.
    """

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()  # the main process stops the run at a safe point; workers must not die first
        seed_everything(mix_seed(self.seed, self.epoch, self.rank, worker_id))


@contextlib.contextmanager
def rng_untouched():
    """Run a block without moving any random generator of this process (python, numpy, torch CPU
    and CUDA): their states are restored afterwards, so work that is not part of training
    (the reference diagnostics) leaves every later random draw as it would have been."""
    from util.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
