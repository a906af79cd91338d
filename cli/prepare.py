"""What one invocation of main.py runs: the resolved configuration, the checkpoint it continues
from, and where ``--eval`` writes. Everything here is decided before any work starts."""
import os
from typing import Optional

from util.checkpoint import find_latest_checkpoint
from util.dist import say

from .config import Config, resolve_config, validate_paths


def prepare(args, check_paths: bool = True) -> Config:
    """Check the files the run needs (``check_paths``) and resolve the parsed ``args`` into the
    read-only configuration (device after the CPU fallback, classifier size from the dataset when
    unset). Raises ValueError or FileNotFoundError, before any work."""
    import datasets

    num_classes = args.num_classes if args.num_classes is not None else datasets.num_classes(args)
    return resolved(args, int(num_classes), check_paths)


def resolved(args, num_classes: int, check_paths: bool = False) -> Config:
    """The read-only configuration of parsed ``args`` with ``num_classes``; with ``check_paths``,
    the data (and output) folders it names are checked first. The attention implementation
    ``MSDA_IMPL`` asks for is checked against its device. ValueError / FileNotFoundError, one line."""
    import ops

    if check_paths:
        validate_paths(args)
    config = resolve_config(args, num_classes)
    ops.check_impl(config.device)
    return config


def resume_path(args, output_dir: Optional[str]) -> str:
    """``--resume``, else (``--auto_resume``) the output directory's latest checkpoint, else ''."""
    if args.resume or not args.auto_resume:
        return args.resume
    latest = find_latest_checkpoint(output_dir)
    if latest:
        say(f"auto-resume: continuing from {latest}", flush=True)
    elif args.eval and not args.pretrained:
        say(f"warning: --eval --auto_resume found no checkpoint in {output_dir}: evaluates an untrained model",
            flush=True)
    return latest or ""


def resume_flag_name(args, config: Config) -> str:
    """How the user named the checkpoint the run continues from, for messages: '--resume', or
    '--auto_resume' when that found it; with '--eval ' in front under --eval."""
    flag = "--auto_resume" if args.auto_resume and not args.resume else "--resume"
    return f"--eval {flag}" if config.eval else flag


def holds_training_run(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a training run's files: a checkpoint, or a config.yaml that is
    not an ``--eval`` run's (an unreadable one counts: it is not ours to overwrite)."""
    if find_latest_checkpoint(output_dir) is not None:
        return True
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return False
    import yaml

    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return True
    return not (isinstance(saved, dict) and saved.get("eval") is True)


def evaluation_output_dir(config: Config) -> Config:
    """``--eval`` into a training run's output directory writes to its ``eval/`` subfolder instead,
    so that the run's config.yaml, log.jsonl and detections stay the run's (and summaries never
    mix an evaluation's records with the training's). Other runs: ``config`` unchanged."""
    if not (config.eval and config.output_dir and holds_training_run(config.output_dir)):
        return config
    folder = os.path.join(config.output_dir, "eval")
    say(f"--eval: {config.output_dir} holds a training run; this evaluation writes to {folder} (config.yaml, "
        "log.jsonl, detections_val.json)", flush=True)
    return config.replace(output_dir=folder)
