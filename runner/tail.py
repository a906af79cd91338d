"""The tail of an epoch, after its checkpoint: evaluation when due, then the evaluation extras.

``EpochTail`` is what the tail needs, built once per run; training's ``finish_epoch`` (main.py),
``--eval`` and the pass before the first training step hand it to the extras (``extras/``).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from util.interrupt import StopSignals
from util.logger import JsonlLogger, TensorboardLogger


@dataclass
class EpochTail:
    """What finishing an epoch (numbered copy, evaluation, extras, log record) needs.

    ctx: this process in this run (main.RunContext: ``place``, ``device``, ``output_dir``,
    ``writes``); model: the eager model (never a DDP or compiled wrapper); extras: this run's
    evaluation extras (``extras.build_extras``), in the order they run.
    """

    config: Any
    ctx: Any
    model: torch.nn.Module
    postprocessors: Dict
    val_loader: DataLoader
    base_ds: Any
    logger: JsonlLogger
    tb_logger: TensorboardLogger
    trainable: int
    class_names: Dict[int, str] = field(default_factory=dict)
    stop: Optional[StopSignals] = None
    extras: List[Any] = field(default_factory=list)


def stop_point(tail: EpochTail, where: str) -> None:
    """A safe point that every rank reaches (a collective when distributed): ``RunInterrupted`` if a
    stop signal came, here or on any rank. The passes that run on rank 0 alone (the evaluation
    extras) only end early on a signal; the stop point after them acts on it."""
    if tail.stop is not None:
        tail.stop.check(where, tail.ctx.device)


def eval_due(epoch: int, config) -> bool:
    """Whether epoch ``epoch`` ends with an evaluation (every ``--eval_every`` epochs, and the last)."""
    return (epoch + 1) % max(config.eval_every, 1) == 0 or epoch + 1 == config.epochs


def run_evaluation(tail: EpochTail, epoch: Optional[int] = None) -> Dict[str, float]:
    """``engine.evaluate`` of the eager model with this run's settings (detections written by the writer)."""
    from engine import evaluate

    return evaluate(tail.model, tail.postprocessors, tail.val_loader, tail.base_ds, tail.ctx.device,
                    amp=tail.config.amp, print_freq=tail.config.print_freq, epoch=epoch,
                    output_dir=tail.ctx.output_dir if tail.ctx.writes else None, stop=tail.stop,
                    guidance=tail.config)
