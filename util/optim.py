"""Optimiser parameter groups and learning-rate schedule, following upstream Deformable DETR.

Three groups:
  * parameters whose name contains one of ``--lr_backbone_names``    -> ``--lr_backbone``
  * parameters whose name contains one of ``--lr_linear_proj_names`` -> ``--lr * --lr_linear_proj_mult``
    (the sampling-offset and reference-point projections: large steps there move every
    sampling location at once, so upstream trains them ten times slower)
  * everything else                                                  -> ``--lr``
Frozen parameters (``requires_grad`` False, e.g. the backbone with ``--lr_backbone 0``) are
left out of every group.
"""
from typing import Dict, Iterable, List

import torch
from torch import nn


def matches_any(name: str, keywords: Iterable[str]) -> bool:
    """Upstream's rule: a keyword matches when it is a substring of the parameter name."""
    return any(keyword in name for keyword in keywords)


def build_param_groups(model: nn.Module, args) -> List[Dict]:
    """The three upstream groups (empty groups dropped), each with its lr and a readable 'name'."""
    backbone, linear_proj, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if matches_any(name, args.lr_backbone_names):
            backbone.append(param)
        elif matches_any(name, args.lr_linear_proj_names):
            linear_proj.append(param)
        else:
            rest.append(param)
    groups = [
        {"name": "default", "params": rest, "lr": args.lr},
        {"name": "backbone", "params": backbone, "lr": args.lr_backbone},
        {"name": "linear_proj", "params": linear_proj, "lr": args.lr * args.lr_linear_proj_mult},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum 0.9 under ``--sgd``) over ``build_param_groups``."""
    groups = build_param_groups(model, args)
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if args.sgd:
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def lr_drop_epochs(args) -> List[int]:
    """Epoch indices (0-based) after which the learning rate has just dropped by 10x.

    ``--lr_drop_epochs`` lists them explicitly; otherwise every ``--lr_drop`` epochs (StepLR).
    """
    if args.lr_drop_epochs:
        return sorted(args.lr_drop_epochs)
    if args.lr_drop and args.lr_drop > 0:
        return list(range(args.lr_drop, args.epochs + 1, args.lr_drop))
    return []


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args):
    """MultiStepLR on ``--lr_drop_epochs`` if given, else StepLR every ``--lr_drop`` epochs (x0.1).

    Stepped once per epoch, after the epoch's training.
    """
    if args.lr_drop_epochs:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(args.lr_drop_epochs), gamma=0.1)
    step = args.lr_drop if args.lr_drop and args.lr_drop > 0 else 10 ** 9  # 0: never drop
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
