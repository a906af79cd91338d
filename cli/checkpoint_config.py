"""A run held against the checkpoint it continues or evaluates, by the role each flag declares.

``main.py`` (``--resume``, ``--auto_resume``, ``--eval --resume``) and ``scripts/predict.py`` call
these once the checkpoint is read, before anything is built. The roles (``cli.roles``) decide: a
resumed training run must have the checkpoint's model, training and evaluation values and takes
its schedule values; an evaluation must have its model values, takes its training and schedule
values and may change the evaluation ones; run flags may always change. Flags the checkpoint does
not record (upstream checkpoints, older ones of this project) are not compared: its weights still
have to fit the model exactly.
"""
from typing import Any, Dict, Optional

from cli.config import Config, roles_of_flags
from cli.roles import EXPERIMENT_DEFINING, RUN, SCHEDULE, must_match_checkpoint, names_with_role, taken_from_checkpoint
from util.checkpoint import describe_differences, differing_flags
from util.dist import say
from util.errors import InputError


def check_checkpoint_configuration(saved: Dict[str, Any], config, path: str, flag: str, evaluating: bool,
                                   advice: Optional[str] = None) -> None:
    """InputError (one line) naming every flag that must match the checkpoint's configuration
    ``saved`` (``util.checkpoint.saved_config``) and does not, with both values, and what to do
    instead (``advice``, else the advice for ``--resume`` or ``--eval --resume``)."""
    roles = roles_of_flags()
    different = differing_flags(saved, config, must_match_checkpoint(roles, evaluating))
    if not different:
        return
    if advice is None and evaluating:
        advice = ("--eval evaluates the model the checkpoint is: use its values of these flags, or load its weights "
                  f"into this configuration with --pretrained {path} instead of --resume")
    elif advice is None:
        advice = ("A resumed run continues the checkpoint's experiment: resume with its values, or start a new run "
                  f"in another --output_dir (with --pretrained {path} to start from its weights)")
    kind = "model" if evaluating else "experiment-defining"
    raise InputError(f"{flag} {path} was made with other {kind} flags: {describe_differences(different)}. {advice}")


def configuration_for_checkpoint(saved: Dict[str, Any], config: Config, path: str, flag: str) -> Config:
    """The configuration of a run that continues (or, under ``--eval``, evaluates) the checkpoint
    ``path`` whose recorded configuration is ``saved``: checked (``check_checkpoint_configuration``),
    with the values it takes from the checkpoint, each change said in a line (config.yaml then
    records what the run actually does, or which model it evaluated)."""
    check_checkpoint_configuration(saved, config, path, flag, evaluating=config.eval)
    roles = roles_of_flags()
    kept = differing_flags(saved, config, taken_from_checkpoint(roles, config.eval))
    if config.eval:
        if kept:
            say(f"note: training and optimisation flags do not change an evaluation; config.yaml records "
                f"{path}'s: {describe_differences(kept)}", flush=True)
    else:
        for name, now, then in kept:
            say(f"warning: --{name} {now} is not used: the optimiser and lr schedule continue from {path}, which has "
                f"{then} (config.yaml records {then})", flush=True)
        changed = differing_flags(saved, config, names_with_role(roles, RUN))
        if changed:
            say(f"note: resuming {path} with other run-only flags (the experiment is the same; the learning rates "
                f"are not rescaled): {describe_differences(changed)}", flush=True)
    return config.replace(**{name: then for name, _, then in kept})


def differences_from_checkpoint(saved: Optional[Dict[str, Any]], config) -> str:
    """'; flags that differ from the checkpoint's: ...' (every flag but the run-only ones), or '':
    the explanation added when the checkpoint's weights or optimiser state do not fit."""
    if not saved:
        return ""
    different = differing_flags(saved, config, names_with_role(roles_of_flags(), *EXPERIMENT_DEFINING, SCHEDULE))
    return f"; flags that differ from the checkpoint's: {describe_differences(different)}" if different else ""
