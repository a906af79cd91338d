"""Train or evaluate the detector: ``python main.py --config FILE --coco_path DIR [--flag value ...]``.

Single process, ``torchrun``, ``python -m torch.distributed.launch`` and SLURM (``srun``) all
run this file; ``util.dist.init_distributed_mode`` reads whichever environment they set.
Only the main process (rank 0) writes files: ``checkpoint.pth`` (every epoch, atomically),
``checkpointNNNN.pth`` (before each lr drop and at the end), ``log.jsonl``, ``config.yaml``,
``detections_val.json`` and TensorBoard events under ``tensorboard/``.
"""
import os
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import util.dist as dist_utils
from util.checkpoint import (CHECKPOINT_NAME, atomic_save, atomic_write_text, capture_rng_state, find_latest_checkpoint,
                             load_checkpoint, restore_rng_state)
from util.config import get_args_parser, parse_args  # noqa: F401  (get_args_parser is part of main's interface)
from util.logger import JsonlLogger, TensorboardLogger, format_seconds
from util.optim import build_lr_scheduler, build_optimizer, lr_drop_epochs

# keys of the namespace that are run state, not configuration (never written to config.yaml)
_RUNTIME_KEYS = {"config", "distributed", "rank", "world_size", "gpu", "dist_backend"}


def say(*parts, **kwargs) -> None:
    """print() on the main process only, so an N-process run does not repeat every line N times."""
    if dist_utils.is_main_process():
        print(*parts, **kwargs)


# ----------------------------------------------------------------------------- seeding

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
        seed_everything(mix_seed(self.seed, self.epoch, self.rank, worker_id))


# ----------------------------------------------------------------------------- setup helpers

def resolve_device(args) -> None:
    """Fall back to the CPU (with a message) when CUDA is asked for but absent; checks AMP fits."""
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on the CPU", flush=True)
        args.device = "cpu"
    if args.amp == "fp16" and not str(args.device).startswith("cuda"):
        raise ValueError("invalid configuration: --amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")


def config_dict(args) -> Dict:
    """The resolved configuration as {flag name: value}, loadable again with ``--config``."""
    flags = [a.dest for a in get_args_parser()._actions if a.dest != "help"]
    out = {}
    for name in flags:
        if name in _RUNTIME_KEYS or not hasattr(args, name):
            continue
        value = getattr(args, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def save_config(args, path: str) -> None:
    header = "# resolved configuration of this run (python main.py --config config.yaml reproduces it)\n"
    atomic_write_text(path, header + yaml.safe_dump(config_dict(args), sort_keys=False))


def build_data(args):
    """Datasets, samplers and loaders. Returns (train_loader, val_loader, train_sampler, seeder, base_ds)."""
    import datasets

    dataset_train = datasets.build_dataset("train", args) if not args.eval else None
    dataset_val = datasets.build_dataset("val", args)
    seeder = WorkerSeeder(args.seed, args.rank)
    train_loader = train_sampler = None
    if dataset_train is not None:
        if args.distributed:
            train_sampler = DistributedSampler(dataset_train, shuffle=True, seed=args.seed)
        else:
            train_sampler = EpochRandomSampler(dataset_train, seed=args.seed)
        batches = BatchSampler(train_sampler, args.batch_size, drop_last=True)
        if len(batches) == 0:
            raise ValueError(f"the training set ({len(dataset_train)} images per process) is smaller than "
                             f"--batch_size {args.batch_size}")
        train_loader = DataLoader(dataset_train, batch_sampler=batches, collate_fn=datasets.collate_fn,
                                  num_workers=args.num_workers, worker_init_fn=seeder,
                                  pin_memory=str(args.device).startswith("cuda"))
    val_sampler = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else SequentialSampler(dataset_val))
    val_loader = DataLoader(dataset_val, batch_size=args.batch_size, sampler=val_sampler, drop_last=False,
                            collate_fn=datasets.collate_fn, num_workers=args.num_workers, worker_init_fn=seeder,
                            pin_memory=str(args.device).startswith("cuda"))
    return train_loader, val_loader, train_sampler, seeder, datasets.get_coco_api(dataset_val)


def count_parameters(model: torch.nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch: int, args) -> Dict:
    """Everything ``--resume`` needs to continue exactly where this epoch ended."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": config_dict(args),
        "rng_state": capture_rng_state(),
    }


def checkpoint_paths(output_dir: str, epoch: int, args) -> List[str]:
    """checkpoint.pth always; checkpointNNNN.pth too on the epoch before an lr drop and on the last one."""
    paths = [os.path.join(output_dir, CHECKPOINT_NAME)]
    if epoch + 1 in lr_drop_epochs(args) or epoch + 1 == args.epochs:
        paths.append(os.path.join(output_dir, f"checkpoint{epoch:04}.pth"))
    return paths


def load_model_weights(model, path: str, strict: bool) -> None:
    """Weights through ``models.load_pretrained`` (prints missing/unexpected keys).

    ``strict``: resuming training from a checkpoint that does not fit the model would silently
    train a partly random model, so any missing or unexpected key is an error then.
    """
    import models

    missing, unexpected = models.load_pretrained(model, path)
    if strict and (missing or unexpected):
        raise RuntimeError(f"--resume {path} does not match this model's configuration: "
                           f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")


def resume_training_state(path: str, optimizer, lr_scheduler, scaler, args) -> int:
    """Load optimiser, scheduler, scaler and RNG state; returns the epoch to start from."""
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in checkpoint]
    if missing:
        raise RuntimeError(f"--resume {path}: not a training checkpoint (no {', '.join(missing)}); "
                           "use --pretrained to start from its weights")
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint.get("rng_state"))
    saved_args = checkpoint.get("args") or {}
    for name in ("lr", "lr_drop", "lr_drop_epochs", "batch_size"):
        if name in saved_args and saved_args[name] != getattr(args, name):
            say(f"warning: --{name} is {getattr(args, name)} now but was {saved_args[name]} in {path}; "
                  "the optimiser and schedule continue from the checkpoint's state", flush=True)
    return int(checkpoint["epoch"]) + 1


# ----------------------------------------------------------------------------- main

def compile_if_asked(model: torch.nn.Module, args) -> torch.nn.Module:
    """``torch.compile(model)`` under ``--compile`` (shares parameters with ``model``), else ``model``."""
    return torch.compile(model) if getattr(args, "compile", False) else model


def main(args) -> Dict:
    """Run training (or ``--eval``) as configured; returns the last evaluation stats (may be empty)."""
    import datasets
    import models
    from engine import evaluate, train_one_epoch

    resolve_device(args)
    dist_utils.init_distributed_mode(args)
    is_main = dist_utils.is_main_process()
    device = torch.device(args.device)
    seed_everything(args.seed + args.rank)

    if args.num_classes is None:
        args.num_classes = datasets.num_classes(args)
    output_dir = args.output_dir or None
    if output_dir and is_main:
        os.makedirs(output_dir, exist_ok=True)
    if args.auto_resume and not args.resume:
        latest = find_latest_checkpoint(output_dir)
        if latest:
            say(f"auto-resume: continuing from {latest}", flush=True)
            args.resume = latest
    writes = is_main and output_dir is not None
    if writes:
        save_config(args, os.path.join(output_dir, "config.yaml"))
    logger = JsonlLogger(os.path.join(output_dir, "log.jsonl") if writes else None)

    model, criterion, postprocessors = models.build_model(args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    trainable, total = count_parameters(model)
    say(f"number of params: {trainable:,} trainable / {total:,} total", flush=True)

    if args.pretrained:
        load_model_weights(model_without_ddp, args.pretrained, strict=False)
    if args.resume:
        load_model_weights(model_without_ddp, args.resume, strict=not args.eval)

    train_loader, val_loader, train_sampler, seeder, base_ds = build_data(args)

    if args.eval:
        stats = evaluate(model_without_ddp, criterion, postprocessors, val_loader, base_ds, device, args,
                         output_dir=output_dir if writes else None)
        epoch = load_checkpoint(args.resume).get("epoch") if args.resume else None
        logger.write({"type": "eval", "epoch": epoch, "checkpoint": args.resume or args.pretrained or None,
                      **{f"test_{k}": v for k, v in stats.items()}})
        return stats

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters)
    model = compile_if_asked(model, args)
    optimizer = build_optimizer(model_without_ddp, args)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    start_epoch = args.start_epoch
    if args.resume:
        start_epoch = resume_training_state(args.resume, optimizer, lr_scheduler, scaler, args)
        say(f"resumed from {args.resume}: starting at epoch {start_epoch}", flush=True)
    if start_epoch >= args.epochs:
        say(f"nothing to train: start epoch {start_epoch} >= --epochs {args.epochs}", flush=True)

    tb_logger = TensorboardLogger(os.path.join(output_dir, "tensorboard") if writes else None, args.tensorboard)
    stats: Dict = {}
    say(f"training epochs {start_epoch}..{args.epochs - 1}", flush=True)
    run_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        # reseeding per epoch makes an epoch's randomness independent of what ran before it
        # (evaluation, a restart), which is what makes --resume bit-exact
        seed_everything(mix_seed(args.seed, epoch, args.rank))
        epoch_start = time.time()
        train_sampler.set_epoch(epoch)
        seeder.epoch = epoch
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, args,
                                      scaler=scaler, logger=logger, tb_logger=tb_logger)
        lr_scheduler.step()
        if writes:
            state = checkpoint_state(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args)
            for path in checkpoint_paths(output_dir, epoch, args):
                atomic_save(state, path)
        record = {"type": "epoch", "epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                  "n_parameters": trainable}
        if (epoch + 1) % max(args.eval_every, 1) == 0 or epoch + 1 == args.epochs:
            stats = evaluate(model_without_ddp, criterion, postprocessors, val_loader, base_ds, device, args,
                             epoch=epoch, output_dir=output_dir if writes else None)
            record.update({f"test_{k}": v for k, v in stats.items()})
            tb_logger.scalars("val", {k: v for k, v in stats.items()}, epoch + 1)
        record["epoch_time"] = time.time() - epoch_start  # training + checkpoint + evaluation
        logger.write(record)
        tb_logger.scalars("epoch", {k: v for k, v in train_stats.items()}, epoch + 1)
        tb_logger.flush()
        summary = f"epoch {epoch} done in {format_seconds(record['epoch_time'])}: loss {train_stats.get('loss', float('nan')):.4f}"
        if "test_AP" in record:
            summary += f", AP {record['test_AP']:.3f}, AP50 {record['test_AP50']:.3f}"
        if is_main:
            print(summary, flush=True)
    tb_logger.close()
    if is_main:
        print(f"training time {format_seconds(time.time() - run_start)}", flush=True)
    return stats


def cli(argv: Optional[List[str]] = None) -> int:
    """Parse (exit 2 on a bad configuration, before any work), run, and turn known failures into exit codes."""
    from engine import NonFiniteLossError

    try:
        args = parse_args(argv)
        resolve_device(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        main(args)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist_utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
