"""Train or evaluate the detector: ``python main.py --config FILE --coco_path DIR [--flag value ...]``.

Single process, ``torchrun``, ``python -m torch.distributed.launch`` and SLURM (``srun``) all
run this file; ``util.dist.init_distributed_mode`` reads whichever environment they set.
Only the main process (rank 0) writes files: ``checkpoint.pth`` (every epoch, atomically),
``checkpointNNNN.pth`` (before each lr drop and at the end), ``log.jsonl``, ``config.yaml``,
``detections_val.json``, TensorBoard events under ``tensorboard/`` and, while it runs, the lock
file ``.lock`` (pid and host of the run that owns the directory).

An epoch is one recoverable unit: training, then ``checkpoint.pth`` (which also holds the epoch's
training statistics), then the epoch's tail -- numbered copy, evaluation, the ``epoch`` record in
``log.jsonl``. The record is written last, so its absence tells a resumed run (``--auto_resume``,
or ``--resume`` of the output directory's own checkpoint) to finish that tail before training on.
"""
import os
import random
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import util.dist as dist_utils
from util.checkpoint import (CHECKPOINT_NAME, OutputDirLock, atomic_copy, atomic_save, atomic_write_text,
                             capture_rng_state, fault_point, find_latest_checkpoint, load_checkpoint,
                             remove_stale_temp_files, restore_rng_state)
from util.config import get_args_parser, parse_args, validate_paths  # noqa: F401  (get_args_parser: main's interface)
from util.errors import InputError
from util.logger import JsonlLogger, TensorboardLogger, format_seconds
from util.optim import build_lr_scheduler, build_optimizer, lr_drop_epochs

# keys of the namespace that are run state or resume bookkeeping, not configuration: never written to
# config.yaml (which must reproduce the run from scratch with --config) nor compared on resume
_RUNTIME_KEYS = {"config", "distributed", "rank", "world_size", "gpu", "dist_backend", "resume", "auto_resume"}

# flags that change the model's parameters or the optimiser's parameter groups: a checkpoint made
# with other values cannot be resumed (lr_backbone matters only as zero / non-zero, see below)
ARCHITECTURE_FLAGS = ("backbone", "backbone_norm", "dilation", "num_feature_levels", "enc_layers", "dec_layers",
                      "stages", "dim_feedforward", "hidden_dim", "nheads", "num_queries_one2one",
                      "num_queries_one2many", "dec_n_points", "enc_n_points", "with_box_refine", "two_stage",
                      "mixed_selection", "look_forward_twice", "use_ms_detr", "use_aux_ffn", "num_classes",
                      "enc_ref_mode", "use_dn", "sgd", "lr_backbone_names", "lr_linear_proj_names")
# flags that never affect what a checkpoint holds (left out when listing differences after a failed load)
_RUN_FLAGS = {"epochs", "output_dir", "eval", "eval_every", "print_freq", "max_iters_per_epoch", "tensorboard",
              "num_workers", "device", "start_epoch", "coco_path", "local_rank", "find_unused_parameters",
              "skip_bad_images", "pretrained", "variant", "seed", "train_ann", "val_ann"}


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


def checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch: int, args,
                     train_stats: Optional[Dict] = None) -> Dict:
    """Everything ``--resume`` needs to continue exactly where this epoch ended (and to write the
    epoch's log record if the run was killed before it)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": config_dict(args),
        "rng_state": capture_rng_state(),
        "train_stats": dict(train_stats or {}),
    }


def numbered_checkpoint_paths(output_dir: str, epoch: int, args) -> List[str]:
    """checkpointNNNN.pth on the epoch before an lr drop and on the last one (else nothing)."""
    if epoch + 1 in lr_drop_epochs(args) or epoch + 1 == args.epochs:
        return [os.path.join(output_dir, f"checkpoint{epoch:04}.pth")]
    return []


def _flag_value(saved: Dict, args, name: str):
    """(saved, current) value of a flag, as compared on resume; lists and tuples alike."""
    def norm(value):
        return list(value) if isinstance(value, tuple) else value

    saved_value, current = norm(saved.get(name)), norm(getattr(args, name, None))
    if name == "lr_backbone":  # only freezing (0) versus training (> 0) changes the parameter groups
        return (saved_value or 0) > 0, (current or 0) > 0
    return saved_value, current


def differing_flags(saved: Dict, args, names) -> List[str]:
    """'--flag now (checkpoint: then)' for each flag in ``names`` recorded in ``saved`` with another value."""
    out = []
    for name in names:
        if name not in saved or not hasattr(args, name):
            continue
        then, now = _flag_value(saved, args, name)
        if then != now:
            out.append(f"--{name} {now} (checkpoint: {then})")
    return out


def check_resume_configuration(path: str, args, flag: str) -> None:
    """A checkpoint made with another architecture or other optimiser groups cannot continue: one
    error naming every flag that differs (before a load fails somewhere inside torch)."""
    checkpoint = load_checkpoint(path)
    saved = (checkpoint.get("args") if isinstance(checkpoint, dict) else None) or {}
    names = ARCHITECTURE_FLAGS + (() if args.eval else ("lr_backbone",))
    different = differing_flags(saved, args, names)
    if different:
        raise InputError(f"{flag} {path} was made with another model configuration: {'; '.join(different)}")


def _all_differences(path: str, args) -> str:
    checkpoint = load_checkpoint(path)
    saved = (checkpoint.get("args") if isinstance(checkpoint, dict) else None) or {}
    names = [n for n in saved if n not in _RUN_FLAGS and n not in _RUNTIME_KEYS]
    different = differing_flags(saved, args, names)
    return f"; flags that differ from the checkpoint's: {'; '.join(different)}" if different else ""


def load_model_weights(model, path: str, strict: bool, flag: str = "--resume", args=None) -> None:
    """Weights through ``models.load_pretrained`` (prints what it loaded and what it skipped).

    ``strict`` (``--resume``, also with ``--eval``): a checkpoint that does not fit the model would
    silently train or evaluate a partly random model, so a missing, unexpected or mis-shaped key is
    an ``InputError`` naming the keys (and the flags that differ, when the checkpoint records them).
    ``--pretrained`` loads leniently and only lists what it skipped.
    """
    import models

    missing, unexpected = models.load_pretrained(model, path)
    if strict and (missing or unexpected):
        raise InputError(f"{flag} {path} does not match this model's configuration: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
                         + (_all_differences(path, args) if args is not None else ""))


def resume_training_state(path: str, optimizer, lr_scheduler, scaler, args) -> Tuple[int, Dict]:
    """Load optimiser, scheduler, scaler and RNG state; returns (epoch to start from, the
    training statistics of the checkpoint's epoch)."""
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in checkpoint]
    if missing:
        raise InputError(f"--resume {path}: not a training checkpoint (no {', '.join(missing)}); "
                         "use --pretrained to start from its weights")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as exc:  # torch: "loaded state dict contains a parameter group that doesn't match..."
        raise InputError(f"--resume {path}: the optimiser's parameter groups do not match this run's ({exc})"
                         + _all_differences(path, args)) from None
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint.get("rng_state"))
    saved_args = checkpoint.get("args") or {}
    for name in ("lr", "lr_drop", "lr_drop_epochs", "batch_size"):
        if name in saved_args and saved_args[name] != getattr(args, name):
            say(f"warning: --{name} is {getattr(args, name)} now but was {saved_args[name]} in {path}; "
                  "the optimiser and schedule continue from the checkpoint's state", flush=True)
    return int(checkpoint["epoch"]) + 1, checkpoint.get("train_stats") or {}


# ----------------------------------------------------------------------------- main

def compile_if_asked(model: torch.nn.Module, args) -> torch.nn.Module:
    """``torch.compile(model)`` under ``--compile`` (shares parameters with ``model``), else ``model``."""
    return torch.compile(model) if args.compile else model


def data_summaries(loaders, logger: JsonlLogger) -> None:
    """One line per split (images, annotations, clipped and dropped boxes), printed and logged."""
    import datasets

    for split, loader in loaders:
        if loader is None:
            continue
        summary = datasets.data_summary(loader.dataset, split)
        say(f"data {split}: {summary['images']} images, {summary['annotations']} annotations; boxes clipped to "
            f"their image: {summary['clipped_boxes']}, dropped as degenerate: {summary['dropped_boxes']} "
            f"({summary['ann_file']})", flush=True)
        logger.write({"type": "data", **summary})


def eval_due(epoch: int, args) -> bool:
    return (epoch + 1) % max(args.eval_every, 1) == 0 or epoch + 1 == args.epochs


def finish_epoch(run: SimpleNamespace, epoch: int, train_stats: Dict, epoch_start: float) -> Dict:
    """The tail of an epoch whose ``checkpoint.pth`` is written: numbered copy, evaluation (when
    due), the ``epoch`` log record (last: its presence marks the epoch complete). Returns the
    evaluation stats ({} when none was due). Also what a resumed run redoes when a kill cut it short.
    """
    from engine import evaluate

    args = run.args
    if run.writes:
        latest = os.path.join(run.output_dir, CHECKPOINT_NAME)
        for path in numbered_checkpoint_paths(run.output_dir, epoch, args):
            atomic_copy(latest, path)
    record = {"type": "epoch", "epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
              "n_parameters": run.trainable}
    stats: Dict = {}
    if eval_due(epoch, args):
        stats = evaluate(run.model, run.criterion, run.postprocessors, run.val_loader, run.base_ds, run.device, args,
                         epoch=epoch, output_dir=run.output_dir if run.writes else None)
        record.update({f"test_{k}": v for k, v in stats.items()})
        run.tb_logger.scalars("val", {k: v for k, v in stats.items()}, epoch + 1)
    record["epoch_time"] = time.time() - epoch_start  # training + checkpoint + evaluation
    fault_point("before_log")
    run.logger.write(record)
    run.tb_logger.scalars("epoch", {k: v for k, v in train_stats.items()}, epoch + 1)
    run.tb_logger.flush()
    summary = (f"epoch {epoch} done in {format_seconds(record['epoch_time'])}: "
               f"loss {train_stats.get('loss', float('nan')):.4f}")
    if "test_AP" in record:
        summary += f", AP {record['test_AP']:.3f}, AP50 {record['test_AP50']:.3f}"
    if train_stats.get("skipped_images"):
        summary += f", {train_stats['skipped_images']} unreadable training images skipped"
    say(summary, flush=True)
    return stats


def unfinished_epoch(args, output_dir: Optional[str], logger: JsonlLogger, start_epoch: int, device) -> bool:
    """Whether the resumed checkpoint's epoch lacks its tail (no epoch record in this directory's log).

    Only the output directory's own checkpoint counts: a checkpoint resumed from elsewhere
    belongs to another run's log. Decided on rank 0 and shared, since evaluation is collective.
    """
    unfinished = 0
    if dist_utils.is_main_process() and args.resume and output_dir and start_epoch > 0:
        own = os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir)
        unfinished = int(own and not logger.has_epoch_record(start_epoch - 1))
    return bool(dist_utils.broadcast_int(unfinished, device))


def main(args) -> Dict:
    """Run training (or ``--eval``) as configured; returns the last evaluation stats (may be empty)."""
    validate_paths(args)
    resolve_device(args)
    dist_utils.init_distributed_mode(args)
    output_dir = args.output_dir or None
    lock = OutputDirLock(output_dir) if dist_utils.is_main_process() and output_dir else None
    if lock is not None:
        os.makedirs(output_dir, exist_ok=True)
        lock.acquire()  # before anything is written there
    try:
        return _main_locked(args, output_dir)
    finally:
        if lock is not None:
            lock.release()


def _main_locked(args, output_dir: Optional[str]) -> Dict:
    import datasets
    import models
    from engine import evaluate, train_one_epoch

    is_main = dist_utils.is_main_process()
    device = torch.device(args.device)
    writes = is_main and output_dir is not None
    if writes:
        removed = remove_stale_temp_files(output_dir)
        if removed:
            say(f"removed {len(removed)} temporary files left by an interrupted save in {output_dir}", flush=True)
    if args.num_classes is None:
        args.num_classes = datasets.num_classes(args)
    if args.auto_resume and not args.resume:
        latest = find_latest_checkpoint(output_dir)
        if latest:
            say(f"auto-resume: continuing from {latest}", flush=True)
            args.resume = latest
    if args.resume:
        check_resume_configuration(args.resume, args, "--eval --resume" if args.eval else "--resume")
    # annotation files are checked here, before the model is built and long before any training
    train_loader, val_loader, train_sampler, seeder, base_ds = build_data(args)
    if writes:
        save_config(args, os.path.join(output_dir, "config.yaml"))
    logger = JsonlLogger(os.path.join(output_dir, "log.jsonl") if writes else None)
    data_summaries([("train", train_loader), ("val", val_loader)], logger)

    seed_everything(args.seed + args.rank)
    model, criterion, postprocessors = models.build_model(args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    trainable, total = count_parameters(model)
    say(f"number of params: {trainable:,} trainable / {total:,} total", flush=True)

    if args.pretrained:
        load_model_weights(model_without_ddp, args.pretrained, strict=False, flag="--pretrained")
    if args.resume:
        load_model_weights(model_without_ddp, args.resume, strict=True,
                           flag="--eval --resume" if args.eval else "--resume", args=args)

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
    start_epoch, resumed_stats = args.start_epoch, {}
    if args.resume:
        start_epoch, resumed_stats = resume_training_state(args.resume, optimizer, lr_scheduler, scaler, args)
        say(f"resumed from {args.resume}: starting at epoch {start_epoch}", flush=True)
    if writes:
        dropped = logger.drop_epochs_from(start_epoch)
        if dropped:
            say(f"log.jsonl: removed {dropped} records of epochs >= {start_epoch} (an interrupted run's; they are "
                "trained again)", flush=True)

    tb_logger = TensorboardLogger(os.path.join(output_dir, "tensorboard") if writes else None, args.tensorboard)
    run = SimpleNamespace(args=args, model=model_without_ddp, criterion=criterion, postprocessors=postprocessors,
                          val_loader=val_loader, base_ds=base_ds, device=device, output_dir=output_dir,
                          writes=writes, logger=logger, tb_logger=tb_logger, trainable=trainable)
    stats: Dict = {}
    if unfinished_epoch(args, output_dir, logger, start_epoch, device):
        say(f"epoch {start_epoch - 1} was interrupted after its checkpoint: finishing it (numbered copy, "
            "evaluation, log record)", flush=True)
        stats = finish_epoch(run, start_epoch - 1, resumed_stats, time.time() - resumed_stats.get("epoch_time", 0.0))
    if start_epoch >= args.epochs:
        say(f"nothing to train: start epoch {start_epoch} >= --epochs {args.epochs}", flush=True)
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
            atomic_save(checkpoint_state(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args, train_stats),
                        os.path.join(output_dir, CHECKPOINT_NAME))
        fault_point("after_checkpoint")
        stats = finish_epoch(run, epoch, train_stats, epoch_start)
    tb_logger.close()
    say(f"training time {format_seconds(time.time() - run_start)}", flush=True)
    return stats


def cli(argv: Optional[List[str]] = None) -> int:
    """Parse (exit 2 on a bad configuration, before any work), run, and turn known failures into exit codes."""
    from engine import NonFiniteLossError

    try:
        args = parse_args(argv)
        validate_paths(args)
        resolve_device(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        main(args)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except (InputError, FileNotFoundError) as exc:
        # bad input found once the run started (data files, checkpoint, output dir): one line too
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist_utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
