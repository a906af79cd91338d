"""The interface of an evaluation extra, their registry, and the one loop that runs them.

An evaluation extra is work done after every evaluation -- training's (``finish_epoch``) and
``--eval``'s -- on the main process: it measures or draws the model and logs what it found. Like
detectron2's ``EvalHook`` it is built once per run and called at a fixed point of the loop; unlike
a hook it must leave no trace in training, and the loop here guarantees that for every extra at
once: each runs on the main process only (nothing collective may run inside: the other ranks go
on and meet it at the next collective), with every random generator and every module's
train/eval flag restored afterwards, and a stop point on every rank after it (a stop signal only
cuts an extra short; the stop point acts on it).
"""
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

from runner.tail import EpochTail, stop_point
from util.dist import is_main_process
from util.logger import INIT_EPOCH
from util.modes import modes_kept
from util.seeding import rng_untouched


class EvalExtra:
    """One evaluation extra. A subclass sets ``name`` (how messages name it: 'the {name} of epoch 3'),
    ``records`` (the log record types it writes in an epoch's tail, which a resumed run removes
    with the tail they belong to), implements ``build`` and ``after_evaluation``, may implement
    ``before_training``, and is registered with ``@register``."""

    name: ClassVar[str] = ""
    records: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def build(cls, config, model, dataset) -> Optional["EvalExtra"]:
        """This run's instance, or None when the configuration leaves the extra off. ``model``: the eager
        model; ``dataset``: the validation dataset. Called once per run on every process, and the
        answer must not depend on the process (the stop point after an extra is collective)."""
        raise NotImplementedError

    def after_evaluation(self, tail: EpochTail, epoch: Optional[int]) -> Dict[str, Any]:
        """After an evaluation of ``epoch`` (under ``--eval``: the evaluated checkpoint's epoch, or
        None; ``tail.config.eval`` tells which). Returns what it logged, by name ({} when nothing,
        and when a stop signal (``tail.stop.requested``) cut it short: then it logs nothing)."""
        raise NotImplementedError

    def before_training(self, tail: EpochTail) -> Dict[str, Any]:
        """Once, before the first training step of a run that starts from initialisation (no checkpoint
        resumed): what it logs there belongs to epoch ``INIT_EPOCH``. Only extras that override it
        run then."""
        return {}

    @classmethod
    def runs_before_training(cls) -> bool:
        """Whether the extra implements ``before_training`` (a property of the class, so the same on
        every process: the stop point after it is collective)."""
        return cls.before_training is not EvalExtra.before_training


REGISTERED: List[Type[EvalExtra]] = []


def register(extra: Type[EvalExtra]) -> Type[EvalExtra]:
    """Class decorator: add ``extra`` to the registry (extras run in registration order)."""
    if not extra.name or any(other.name == extra.name for other in REGISTERED):
        raise ValueError(f"evaluation extra {extra.__name__}: its name {extra.name!r} is empty or taken")
    REGISTERED.append(extra)
    return extra


def build_extras(config, model, dataset) -> List[EvalExtra]:
    """This run's extras: every registered one that its configuration turns on, in registration order."""
    built = (extra.build(config, model, dataset) for extra in REGISTERED)
    return [extra for extra in built if extra is not None]


def tail_record_types() -> Tuple[str, ...]:
    """The epoch-tail record types of every registered extra, on or off in this run (a log may hold
    them from an earlier run of the directory that had it on)."""
    return tuple(kind for extra in REGISTERED for kind in extra.records)


def where(name: str, epoch: Optional[int], evaluating: bool) -> str:
    """How a stop in the extra ``name`` after the evaluation of ``epoch`` is reported."""
    if evaluating:
        return f"the {name} of the evaluation"
    if epoch == INIT_EPOCH:
        return f"the {name} at initialisation"
    return f"the {name} of epoch {epoch} (its checkpoint is written)"


def _untraced(tail: EpochTail, work: Callable[..., Dict[str, Any]], *args) -> Dict[str, Any]:
    """``work(*args)`` on the main process (elsewhere nothing: {}), with every random generator (the
    evaluation transform draws from Python's random) and every train/eval flag restored afterwards."""
    if not is_main_process():
        return {}
    with rng_untouched(), modes_kept(tail.model):
        return work(*args)


def run_after_evaluation(tail: EpochTail, epoch: Optional[int]) -> Dict[str, Dict[str, Any]]:
    """Every extra of the run after an evaluation of ``epoch``, each followed by a stop point.
    Returns {extra name: what it logged}."""
    logged = {}
    for extra in tail.extras:
        logged[extra.name] = _untraced(tail, extra.after_evaluation, tail, epoch)
        stop_point(tail, where(extra.name, epoch, tail.config.eval))
    return logged


def run_before_training(tail: EpochTail) -> Dict[str, Dict[str, Any]]:
    """The extras that measure the model at initialisation, each followed by a stop point."""
    logged = {}
    for extra in tail.extras:
        if extra.runs_before_training():
            logged[extra.name] = _untraced(tail, extra.before_training, tail)
            stop_point(tail, where(extra.name, INIT_EPOCH, evaluating=False))
    return logged
