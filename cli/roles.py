"""What each flag of main.py is to a run -- its role -- declared where the flag is defined.

Every flag in ``cli.config.get_args_parser`` is added through ``with_roles(group).add_argument(...,
role=...)``; ``flag_roles`` reads the roles back and refuses a parser with a flag that has none.
The roles decide how a run is held against a checkpoint it continues or evaluates
(``cli.checkpoint_config``) and how ``config.yaml`` is laid out (``cli.config.save_config``).

The experiment-defining roles -- a resumed training run must have the checkpoint's value of each:

  model        what the network is and computes: architecture, classes, the research settings of
               the guided references. ``--eval --resume`` must match too (another value would
               evaluate the checkpoint as a model it is not).
  training     how it is trained, without changing what the trained network computes: losses and
               matching, augmentation, the training data, the seed, dropout, gradient choices,
               the iteration cap. ``--eval`` takes the checkpoint's values (with a note), so the
               evaluation's config.yaml describes the model it evaluated.
  evaluation   how and on what it is measured: inference-time settings, the validation data and
               its image sizes, the ``--variant`` label summaries group runs by. A training resume
               keeps them, so every evaluation of one run is made the same way; ``--eval`` may
               change them: that is how one checkpoint is evaluated two ways (the
               ``*_upstream_eval`` rows: ``--no-ref_eval_one2many``).

The others:

  schedule     the optimiser and its learning-rate schedule. A resumed run continues the
               checkpoint's optimiser and schedule state, so another value is not used: a warning,
               and config.yaml records the checkpoint's value (``--eval`` takes it too).
  run          where and how this invocation runs: paths, devices, precision, batch size,
               workers, logging, how many epochs to train to, how a new run is initialised (which a
               resume replaces by the checkpoint). Free to change on resume; the values that
               differ are listed in one line.
  start        where the run's state comes from (``--config``, ``--resume``, ``--auto_resume``,
               ``--unsafe_trust_checkpoint``): not part of the configuration, never saved.
"""
import argparse
from typing import Dict, Iterable, List

MODEL = "model"
TRAINING = "training"
EVALUATION = "evaluation"
SCHEDULE = "schedule"
RUN = "run"
START = "start"
# what each role means, one line each, in config.yaml's order (start is never saved)
ROLE_MEANING = {
    MODEL: "what the network is and computes; a resume and --eval --resume must match the checkpoint",
    TRAINING: "how it is trained; a resume must match the checkpoint, --eval takes the checkpoint's values",
    EVALUATION: "how and on what it is measured; a resume must match the checkpoint, --eval may change it",
    SCHEDULE: "optimiser and lr schedule; a resume continues the checkpoint's (its values are recorded here)",
    RUN: "where and how this invocation ran; free to change on resume",
    START: "where the run's state comes from; not saved",
}
# a resumed training run must have the checkpoint's value of each of these
EXPERIMENT_DEFINING = (MODEL, TRAINING, EVALUATION)
ROLES = tuple(ROLE_MEANING)


class FlagsWithRoles:
    """An argument parser or group whose ``add_argument`` takes the flag's ``role`` (required)."""

    def __init__(self, container):
        self._container = container

    def add_argument(self, *names: str, role: str, **kwargs) -> argparse.Action:
        if role not in ROLES:
            raise ValueError(f"flag {names[0]}: unknown role '{role}' (one of {', '.join(ROLES)})")
        action = self._container.add_argument(*names, **kwargs)
        action.role = role  # argparse keeps attributes it does not know on the action
        return action


def with_roles(container) -> FlagsWithRoles:
    """``container`` (a parser or an argument group) whose flags must each declare a role."""
    return FlagsWithRoles(container)


def flag_roles(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """{flag name (dest): role} of every flag of ``parser``; ValueError naming a flag without one."""
    roles = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        role = getattr(action, "role", None)
        if role not in ROLES:
            raise ValueError(f"flag {action.option_strings[0] if action.option_strings else action.dest} declares "
                             "no role: add it with with_roles(...).add_argument(..., role=...)")
        roles[action.dest] = role
    return roles


def names_with_role(roles: Dict[str, str], *wanted: str) -> List[str]:
    """The flags whose role is one of ``wanted``, in the parser's order."""
    return [name for name, role in roles.items() if role in wanted]


def must_match_checkpoint(roles: Dict[str, str], evaluating: bool) -> List[str]:
    """Flags a run continuing a checkpoint (``evaluating``: only evaluating it) must share with it."""
    return names_with_role(roles, *((MODEL,) if evaluating else EXPERIMENT_DEFINING))


def taken_from_checkpoint(roles: Dict[str, str], evaluating: bool) -> List[str]:
    """Flags whose values a run continuing (``evaluating``: evaluating) a checkpoint takes from it."""
    return names_with_role(roles, *((TRAINING, SCHEDULE) if evaluating else (SCHEDULE,)))


def group_by_role(names: Iterable[str], roles: Dict[str, str]) -> Dict[str, List[str]]:
    """{role: the given names of that role}, roles in ``ROLES`` order, empty roles left out."""
    names = list(names)
    grouped = {role: [n for n in names if roles.get(n) == role] for role in ROLES}
    return {role: found for role, found in grouped.items() if found}
