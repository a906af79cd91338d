"""One way for the scripts to turn a run into a model: a checkpoint and its configuration.

scripts/predict.py, export.py, diagnose.py and visualize_refs.py load a trained model here, and
bench_model.py, bench_diagnostics.py and visualize_refs.py (without a checkpoint) resolve their
random-init configuration here. The rules, the same for every script:

- the configuration of a checkpoint is ``--config FILE`` when given, else the ``config.yaml`` of
  its run directory (the folder it is in), else the one the checkpoint records; flags on the
  command line override each. An upstream-style checkpoint (Deformable-DETR / H-DETR releases,
  whose ``args`` is upstream's argparse.Namespace) or a bare state dict records none of this
  project's: it needs ``--config`` (or a config.yaml beside it);
- the model flags of that configuration must be those the checkpoint records (one line naming
  every flag that differs, as ``main.py --eval --resume`` says it), and the weights must fit the
  model exactly (one line naming the keys, and the flags that differ);
- the classifier size is the configuration's, else the checkpoint's own (its classifier's rows):
  never a default. Every weight comes from the checkpoint: no backbone or ``--pretrained`` file is
  read and no output folder is written;
- a checkpoint is read without running code from it unless it is the file
  ``--unsafe_trust_checkpoint`` names.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from cli.checkpoint_config import check_checkpoint_configuration, differences_from_checkpoint
from cli.config import Config, parse_args
from cli.prepare import prepare, resolved
from util.checkpoint import (find_latest_checkpoint, has_upstream_args, load_checkpoint, saved_class_names,
                             saved_config)
from util.dist import say
from util.errors import InputError

# the classifier's weight in a state dict: one row per class (models.deformable_detr's heads)
CLASSIFIER_KEY = "class_embed.0.weight"
# what a loaded checkpoint replaces: its weights are all there, and a script writes no run folder
LOADING_FLAGS = ("--backbone_weights", "none", "--pretrained", "", "--output_dir", "", "--amp", "off")


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder: compared as real paths (symlinks resolved),
    since an output directory or a checkpoint is often reached through a link."""
    return os.path.realpath(a) == os.path.realpath(b)


@dataclass
class LoadedRun:
    """A model ready for inference with what it was built from."""

    model: torch.nn.Module           # in eval mode, on ``config.device``
    postprocessors: Dict[str, torch.nn.Module]
    config: Config
    class_names: Dict[int, str] = field(default_factory=dict)  # {category id: name}; {} when not stored
    checkpoint: str = ""             # the file the weights came from ('' for a random initialisation)
    epoch: Optional[int] = None      # the checkpoint's epoch, when it records one

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)


# ----------------------------------------------------------------------------- files

def checkpoint_files(path: str, flag: str = "--checkpoint") -> Tuple[str, Optional[str]]:
    """(checkpoint file, the config.yaml of its run directory or None) of a run directory (its
    latest checkpoint, as --auto_resume picks it) or a checkpoint file."""
    if os.path.isdir(path):
        checkpoint = find_latest_checkpoint(path)
        if checkpoint is None:
            raise InputError(f"{flag} {path}: the folder holds no checkpoint.pth or checkpointNNNN.pth")
        config = os.path.join(path, "config.yaml")
        if not os.path.isfile(config):
            raise InputError(f"{flag} {path}: the run directory has no config.yaml")
        return checkpoint, config
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file or folder")
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    return path, (config if os.path.isfile(config) else None)


def read_checkpoint(path: str, flag: str, trusted: str = "") -> Any:
    """The checkpoint's contents, read without running code from it unless ``trusted`` (the file
    ``--unsafe_trust_checkpoint`` names) is this file."""
    trust = bool(trusted) and same_path(path, trusted)
    if trust:
        say(f"warning: {flag} {path} is loaded with full pickle (--unsafe_trust_checkpoint): it can run code",
            flush=True)
    return load_checkpoint(path, trusted=trust, flag=flag)


def classes_in_weights(contents: Any) -> Optional[int]:
    """The classifier size of a checkpoint's weights (rows of ``class_embed.0.weight``); None when
    it holds no such tensor."""
    state = contents.get("model", contents) if isinstance(contents, dict) else None
    if not isinstance(state, dict):
        return None
    weight = state.get(CLASSIFIER_KEY, state.get("module." + CLASSIFIER_KEY))
    return int(weight.shape[0]) if torch.is_tensor(weight) and weight.dim() == 2 else None


# ----------------------------------------------------------------------------- configurations

def random_init_configuration(flags: Sequence[str], check_paths: bool = False, evaluating: bool = False) -> Config:
    """The configuration of main.py ``flags`` for a model without a checkpoint: the classifier size
    is ``--num_classes``, else the dataset's (ValueError when neither tells it). ``evaluating``: the
    model is only evaluated (``check_paths`` then checks the validation data only)."""
    args = parse_args(list(flags))
    args.eval = args.eval or evaluating
    return prepare(args, check_paths)


def checkpoint_configuration(contents: Any, path: str, flag: str, config_file: Optional[str] = None,
                             flags: Sequence[str] = (), check_paths: bool = False) -> Config:
    """The configuration checkpoint ``path`` (read: ``contents``) is loaded with (see the module's
    rules), for evaluation: ``config_file`` (--config, or the run's config.yaml) else its record,
    overridden by main.py ``flags``; checked against the record."""
    upstream = has_upstream_args(contents)
    saved = {} if upstream else saved_config(contents)  # upstream's flags are not this project's
    if config_file is None and upstream:
        raise InputError(f"{flag} {path}: an upstream-style checkpoint (its args are an argparse.Namespace, not "
                         "this project's configuration): pass --config FILE with the configuration it was trained with")
    if config_file is None and not saved:
        raise InputError(f"{flag} {path}: the checkpoint records no configuration (a bare state dict) and no "
                         "config.yaml is beside it: pass --config FILE")
    if config_file is not None and not os.path.isfile(config_file):
        raise InputError(f"--config {config_file}: no such file")
    head = ["--config", config_file] if config_file is not None else []
    args = parse_args([*head, *LOADING_FLAGS, *flags], config_values=saved,
                      config_source=f"{flag} {path}: its recorded configuration")
    args.eval = True  # an evaluation of the checkpoint: only the validation data is read (and checked)
    in_weights = classes_in_weights(contents)
    num_classes = args.num_classes if args.num_classes is not None else in_weights
    if num_classes is None:
        raise InputError(f"{flag} {path}: neither its configuration nor its weights say how many classes the "
                         f"model has (no {CLASSIFIER_KEY}): pass --num_classes N")
    if in_weights is not None and in_weights != num_classes:
        raise InputError(f"{flag} {path}: its classifier has {in_weights} classes but the configuration says "
                         f"--num_classes {num_classes}")
    config = resolved(args, int(num_classes), check_paths)
    # what defines the model must be the checkpoint's; evaluation flags may differ, as for --eval --resume
    check_checkpoint_configuration(saved, config, path, flag, evaluating=True,
                                   advice=f"Its configuration ({config_file or 'the one it records'}) is not the "
                                          "one the checkpoint was made with")
    return config


def refuse_ground_truth_guidance(config, what: str, remedy: str = "") -> None:
    """``InputError`` (one line) when the model's encoder guidance reads the ground truth (the oracle
    control, --ref_source gt): such a model cannot run on images alone. ``what``: the input named
    in the message (e.g. '--checkpoint FILE'); ``remedy``: what to do instead, if anything."""
    from models.guidance import guidance_needs

    if guidance_needs(config)[0]:
        raise InputError(f"{what}: the model's encoder guidance reads the ground-truth boxes (--ref_source "
                         f"{config.ref_source}): a control, not a detector; it cannot run on images alone"
                         + (f"; {remedy}" if remedy else ""))


# ----------------------------------------------------------------------------- weights and models

def load_model_weights(model, path: str, strict: bool, flag: str = "--resume",
                       saved: Optional[Dict] = None, config: Optional[Config] = None, loaded: Any = None) -> None:
    """Weights through ``models.load_pretrained`` (prints what it loaded and what it skipped).

    ``strict`` (``--resume``, also with ``--eval``, and every script): a checkpoint that does not
    fit the model would silently train or evaluate a partly random model, so a missing, unexpected
    or mis-shaped key is an ``InputError`` naming the keys (and the flags that differ from ``saved``,
    the configuration the checkpoint records, when given). ``--pretrained`` loads leniently and
    only lists what it skipped. ``loaded``: the file's contents when already read (read once).
    """
    import models

    missing, unexpected = models.load_pretrained(model, path, loaded=loaded)
    if strict and (missing or unexpected):
        raise InputError(f"{flag} {path} does not match this model's configuration: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
                         + differences_from_checkpoint(saved, config))


def build_loaded_run(config: Config, contents: Any = None, path: str = "", flag: str = "--checkpoint",
                     seed: Optional[int] = None) -> LoadedRun:
    """The model of ``config`` in eval mode on its device: the checkpoint's weights (``contents`` of
    file ``path``, loaded strictly), or without a checkpoint a random initialisation drawn from
    ``seed`` (so that it is reproducible)."""
    import models

    if seed is not None:
        torch.manual_seed(seed)
    model, _, postprocessors = models.build_model(config)
    if contents is not None:
        saved = {} if has_upstream_args(contents) else saved_config(contents)
        load_model_weights(model, path, strict=True, flag=flag, saved=saved, config=config, loaded=contents)
    epoch = contents.get("epoch") if isinstance(contents, dict) else None
    return LoadedRun(model=model.to(torch.device(config.device)).eval(), postprocessors=postprocessors,
                     config=config, class_names=saved_class_names(contents), checkpoint=path,
                     epoch=epoch if isinstance(epoch, int) else None)


def load_run(path: str, flag: str = "--checkpoint", config_file: Optional[str] = None, flags: Sequence[str] = (),
             trusted: str = "", images_only: bool = False) -> LoadedRun:
    """The model of checkpoint ``path`` (a run directory or a checkpoint file) in eval mode, with its
    configuration (see the module's rules: ``config_file`` is --config, ``flags`` main.py flags over
    it). ``trusted``: the file --unsafe_trust_checkpoint names. ``images_only``: the model will run
    on images without annotations, so one whose guidance reads the ground truth is refused.
    ``InputError`` / ValueError (one line) when the checkpoint cannot be read or does not fit."""
    checkpoint, beside = checkpoint_files(path, flag)
    contents = read_checkpoint(checkpoint, flag, trusted)
    config = checkpoint_configuration(contents, checkpoint, flag, config_file or beside, flags)
    if images_only:
        refuse_ground_truth_guidance(config, f"{flag} {checkpoint}")
    return build_loaded_run(config, contents, checkpoint, flag)
