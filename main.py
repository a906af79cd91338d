"""Train or evaluate the detector: ``python main.py --config FILE --coco_path DIR [--flag value ...]``.

Single process, ``torchrun``, ``python -m torch.distributed.launch`` and SLURM (``srun``) all
run this file; ``util.dist.init_distributed_mode`` reads whichever environment they set.
Only the main process (rank 0) writes files: ``checkpoint.pth`` (every epoch, atomically),
``checkpointNNNN.pth`` (before each lr drop and at the end), ``log.jsonl``, ``config.yaml``,
``detections_val.json``, TensorBoard events under ``tensorboard/`` and, while it runs, the lock
file ``.lock`` (pid and host of the run that owns the directory).

Every evaluation is followed by the run's evaluation extras (``extras/``: the reference
diagnostics of ``--diag_images``, the pictures of ``--vis_images``), on the main process only; a
training run that starts from initialisation (no checkpoint resumed) also runs those that measure
the model before its first training step (the ``diag`` record of epoch -1).

``--eval`` writes its own ``config.yaml``, ``log.jsonl`` (an ``eval`` record, and the extras'
records, e.g. ``eval_diag``) and detections; given a training run's output directory, it writes
them to that directory's ``eval/`` subfolder, so the run's own files stay the training's.

An epoch is one recoverable unit: training, then ``checkpoint.pth`` (which also holds the epoch's
training statistics), then the epoch's tail -- numbered copy, evaluation, the ``epoch`` record in
``log.jsonl``. The record is written last, so its absence tells a resumed run (``--auto_resume``,
or ``--resume`` of the output directory's own checkpoint) to finish that tail before training on.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

import util.dist as dist_utils
from cli.checkpoint_config import configuration_for_checkpoint, differences_from_checkpoint
from cli.config import get_args_parser  # noqa: F401  (main.get_args_parser(): main's interface)
from cli.config import Config, config_dict, derived_keys, parse_args, save_config
from cli.prepare import evaluation_output_dir, prepare, resume_flag_name, resume_path
from cli.run_loading import load_model_weights, same_path
from extras import build_extras, run_after_evaluation, run_before_training, tail_record_types
from runner.data import build_data, class_names_of, count_parameters, data_summaries
from runner.tail import EpochTail, eval_due, run_evaluation
from util.checkpoint import (CHECKPOINT_NAME, atomic_copy, atomic_save, checkpoint_state, fault_point,
                             find_latest_checkpoint, load_checkpoint, numbered_checkpoint_paths,
                             remove_stale_temp_files, resume_training_state, saved_config)
from util.dist import DistInfo, say
from util.errors import InputError, one_line_message
from util.interrupt import RunInterrupted, StopSignals
from util.logger import JsonlLogger, TensorboardLogger, format_seconds
from util.optim import build_lr_scheduler, build_optimizer
from util.output_lock import OutputDirLock
from util.seeding import WorkerSeeder, mix_seed, seed_everything


@dataclass(frozen=True)
class RunContext:
    """What this process is in this run, next to the read-only configuration: its place in the job
    (rank, world size, local GPU, backend), its device, the output directory (None: write nothing)
    and the checkpoint it continues from ('' when none: ``--resume``, or what ``--auto_resume`` found),
    with the flag that named it, as messages quote it."""

    place: DistInfo
    device: torch.device
    output_dir: Optional[str]
    resume: str
    trusted_checkpoint: str = ""
    resume_flag: str = "--resume"

    def read(self, path: str, flag: str) -> Dict[str, Any]:
        """A checkpoint file's contents, loaded without running code from it unless it is the file
        ``--unsafe_trust_checkpoint`` names."""
        trusted = bool(self.trusted_checkpoint) and same_path(path, self.trusted_checkpoint)
        if trusted:
            say(f"warning: {flag} {path} is loaded with full pickle (--unsafe_trust_checkpoint): it can run code",
                flush=True)
        return load_checkpoint(path, trusted=trusted, flag=flag)

    @property
    def writes(self) -> bool:
        """Only the main process writes files, and only with an output directory."""
        return self.place.rank == 0 and self.output_dir is not None


# ----------------------------------------------------------------------------- setup helpers

def compile_if_asked(model: torch.nn.Module, config) -> torch.nn.Module:
    """``torch.compile(model)`` under ``--compile`` (shares parameters with ``model``), else ``model``."""
    return torch.compile(model) if config.compile else model


def finish_epoch(tail: EpochTail, epoch: int, train_stats: Dict, epoch_start: float) -> Dict:
    """The tail of an epoch whose ``checkpoint.pth`` is written: numbered copy, evaluation (when
    due, followed by the run's evaluation extras), the ``epoch`` log record (last: its presence
    marks the epoch complete). Returns the evaluation stats ({} when none was due).
    Also what a resumed run redoes when a kill cut it short.
    """
    if tail.ctx.writes:
        latest = os.path.join(tail.ctx.output_dir, CHECKPOINT_NAME)
        for path in numbered_checkpoint_paths(tail.ctx.output_dir, epoch, tail.config):
            atomic_copy(latest, path)
    record = {"type": "epoch", "epoch": epoch, **derived_keys(tail.config),
              **{f"train_{k}": v for k, v in train_stats.items()}, "n_parameters": tail.trainable}
    stats: Dict = {}
    if eval_due(epoch, tail.config):
        stats = run_evaluation(tail, epoch)
        record.update({f"test_{k}": v for k, v in stats.items()})
        tail.tb_logger.scalars("val", {k: v for k, v in stats.items()}, epoch + 1)
        run_after_evaluation(tail, epoch)
    record["epoch_time"] = time.time() - epoch_start  # training + checkpoint + evaluation + extras
    fault_point("before_log")
    tail.logger.write(record)
    tail.tb_logger.scalars("epoch", {k: v for k, v in train_stats.items()}, epoch + 1)
    tail.tb_logger.flush()
    summary = (f"epoch {epoch} done in {format_seconds(record['epoch_time'])}: "
               f"loss {train_stats.get('loss', float('nan')):.4f}")
    if "test_AP" in record:
        summary += f", AP {record['test_AP']:.3f}, AP50 {record['test_AP50']:.3f}"
    if train_stats.get("skipped_images"):
        summary += f", {train_stats['skipped_images']} unreadable training images skipped"
    say(summary, flush=True)
    return stats


def unfinished_epoch(ctx: RunContext, logger: JsonlLogger, start_epoch: int) -> bool:
    """Whether the resumed checkpoint's epoch lacks its tail (no epoch record in this directory's log).

    Only the output directory's own checkpoint counts: a checkpoint resumed from elsewhere
    belongs to another run's log. Decided on rank 0 and shared, since evaluation is collective.
    """
    unfinished = 0
    if dist_utils.is_main_process() and ctx.resume and ctx.output_dir and start_epoch > 0:
        own = same_path(os.path.dirname(os.path.abspath(ctx.resume)), ctx.output_dir)
        unfinished = int(own and not logger.has_epoch_record(start_epoch - 1))
    return bool(dist_utils.broadcast_int(unfinished, ctx.device))


# ----------------------------------------------------------------------------- main

def main(args) -> Dict:
    """Run training (or ``--eval``) as the parsed ``args`` configure; returns the last evaluation
    stats (may be empty)."""
    return run(args, prepare(args))


def run(args, config: Config) -> Dict:
    """Join the job, own the output directory, then train or evaluate. ``args``: the parsed flags
    (for --resume / --auto_resume); ``config``: their resolved configuration (``prepare``)."""
    resume = resume_path(args, config.output_dir or None)  # --eval --auto_resume: the run's latest checkpoint
    config = evaluation_output_dir(config)
    place = dist_utils.init_distributed_mode(config.device, config.local_rank)
    output_dir = config.output_dir or None
    ctx = RunContext(place=place, device=torch.device(place.device), output_dir=output_dir,
                     resume=resume, trusted_checkpoint=args.unsafe_trust_checkpoint,
                     resume_flag=resume_flag_name(args, config))
    lock = OutputDirLock(output_dir) if dist_utils.is_main_process() and output_dir else None
    if lock is not None:
        os.makedirs(output_dir, exist_ok=True)
        lock.acquire()  # before anything is written there
    try:
        with StopSignals() as stop:
            return _run_locked(config, ctx, stop)
    finally:
        if lock is not None:
            lock.release()


def interrupted_message(exc: RunInterrupted, args, output_dir: Optional[str]) -> str:
    """One line: which signal stopped what, what was kept, how to continue."""
    if args.eval:
        return f"stopped by {exc}: the evaluation did not finish; run the same command again to evaluate"
    latest = find_latest_checkpoint(output_dir) if output_dir else None
    if latest is None:
        kept = "no checkpoint was written yet (nothing to continue from)"
    else:
        kept = (f"kept {latest} (the last checkpoint written; what came after it is redone); continue with the "
                f"same command plus --auto_resume" + ("" if args.auto_resume else f" (or --resume {latest})"))
    return f"stopped by {exc}: {kept}"


def _run_locked(config: Config, ctx: RunContext, stop: Optional[StopSignals] = None) -> Dict:
    import models
    import ops

    if ctx.writes:
        removed = remove_stale_temp_files(ctx.output_dir)
        if removed:
            say(f"removed {len(removed)} temporary files left by an interrupted save in {ctx.output_dir}",
                flush=True)
    resume_flag = ctx.resume_flag
    # every checkpoint is read (and checked) once, here, before the data and the model are built
    checkpoint = ctx.read(ctx.resume, resume_flag) if ctx.resume else None
    if checkpoint is not None:
        config = configuration_for_checkpoint(saved_config(checkpoint), config, ctx.resume, resume_flag)
    pretrained = ctx.read(config.pretrained, "--pretrained") if config.pretrained else None
    if pretrained is not None:
        models.read_state_dict(config.pretrained, loaded=pretrained)  # holds a state dict, or a one-line error
    # annotation files are checked here, before the model is built and long before any training
    train_loader, val_loader, train_sampler, seeder, base_ds = build_data(config, ctx.place.rank,
                                                                          ctx.place.distributed, ctx.device)
    if ctx.writes:
        save_config(config, os.path.join(ctx.output_dir, "config.yaml"), evaluated=ctx.resume if config.eval else None)
    logger = JsonlLogger(os.path.join(ctx.output_dir, "log.jsonl") if ctx.writes else None)
    data_summaries([("train", train_loader), ("val", val_loader)], logger)

    seed_everything(config.seed + ctx.place.rank)
    model, criterion, postprocessors = models.build_model(config)
    model.to(ctx.device)
    criterion.to(ctx.device)
    trainable, total = count_parameters(model)
    say(f"number of params: {trainable:,} trainable / {total:,} total", flush=True)
    say(f"deformable attention: '{ops.active_impl(ctx.device)}' implementation (MSDA_IMPL to force one)", flush=True)
    if config.pretrained:
        load_model_weights(model, config.pretrained, strict=False, flag="--pretrained", loaded=pretrained)
        del pretrained
    if checkpoint is not None:
        load_model_weights(model, ctx.resume, strict=True, flag=resume_flag, saved=saved_config(checkpoint),
                           config=config, loaded=checkpoint)
    tail = EpochTail(config=config, ctx=ctx, model=model, postprocessors=postprocessors, val_loader=val_loader,
                     base_ds=base_ds, logger=logger, tb_logger=TensorboardLogger(None, enabled=False),
                     trainable=trainable, class_names=class_names_of(train_loader or val_loader), stop=stop,
                     extras=build_extras(config, model, val_loader.dataset))
    if config.eval:
        stats = run_evaluation(tail)
        evaluated_epoch = checkpoint.get("epoch") if checkpoint is not None else None
        logger.write({"type": "eval", "epoch": evaluated_epoch, "checkpoint": ctx.resume or config.pretrained or None,
                      **derived_keys(config), **{f"test_{k}": v for k, v in stats.items()}})
        run_after_evaluation(tail, evaluated_epoch)
        return stats

    training_model = model
    if ctx.place.distributed:
        training_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.place.local_gpu] if ctx.device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)
    training_model = compile_if_asked(training_model, config)
    optimizer = build_optimizer(model, config)
    lr_scheduler = build_lr_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    start_epoch, resumed_stats = config.start_epoch, {}
    at_initialisation = checkpoint is None  # the weights are the initialisation (or --pretrained's)
    if checkpoint is not None:
        start_epoch, resumed_stats = resume_training_state(
            checkpoint, ctx.resume, optimizer, lr_scheduler, scaler,
            differences_from_checkpoint(saved_config(checkpoint), config), flag=resume_flag)
        say(f"resumed from {ctx.resume}: starting at epoch {start_epoch}", flush=True)
    del checkpoint  # every part is loaded: do not hold a second copy of the weights through training
    if ctx.writes:
        cleanup = logger.drop_epochs_from(start_epoch, tail_record_types())
        if cleanup.records:
            say(f"log.jsonl: removed {cleanup.records} records of epochs >= {start_epoch} (an interrupted run's; "
                "they are trained again)", flush=True)
        if cleanup.unreadable:
            say(f"log.jsonl: removed {cleanup.unreadable} unreadable lines (cut short by a kill, or not UTF-8 "
                "JSON)", flush=True)
    tail.tb_logger = TensorboardLogger(os.path.join(ctx.output_dir, "tensorboard") if ctx.writes else None,
                                       config.tensorboard)
    if at_initialisation:
        run_before_training(tail)
    stats: Dict = {}
    if unfinished_epoch(ctx, logger, start_epoch):
        say(f"epoch {start_epoch - 1} was interrupted after its checkpoint: finishing it (numbered copy, "
            "evaluation, log record)", flush=True)
        stats = finish_epoch(tail, start_epoch - 1, resumed_stats,
                             time.time() - resumed_stats.get("epoch_time", 0.0))
    epochs = train_epochs(tail, training_model, criterion, optimizer, lr_scheduler, scaler, train_loader,
                          train_sampler, seeder, start_epoch)
    return epochs if epochs is not None else stats


def train_epochs(tail: EpochTail, model, criterion, optimizer, lr_scheduler, scaler, train_loader: DataLoader,
                 train_sampler, seeder: WorkerSeeder, start_epoch: int) -> Optional[Dict]:
    """Epochs ``start_epoch`` .. ``--epochs - 1``: train, checkpoint, finish. ``model``: the one to train
    (DDP / compiled wrapper of ``tail.model``). Returns the last epoch's evaluation stats (None: no epoch ran)."""
    from engine import train_one_epoch

    config, ctx = tail.config, tail.ctx
    if start_epoch >= config.epochs:
        say(f"nothing to train: start epoch {start_epoch} >= --epochs {config.epochs}", flush=True)
    say(f"training epochs {start_epoch}..{config.epochs - 1}", flush=True)
    run_start = time.time()
    stats = None
    for epoch in range(start_epoch, config.epochs):
        # reseeding per epoch makes an epoch's randomness independent of what ran before it
        # (evaluation, a restart), which is what makes --resume bit-exact
        seed_everything(mix_seed(config.seed, epoch, ctx.place.rank))
        epoch_start = time.time()
        train_sampler.set_epoch(epoch)
        seeder.epoch = epoch
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, ctx.device, epoch, amp=config.amp,
                                      clip_max_norm=config.clip_max_norm, print_freq=config.print_freq,
                                      max_iters=config.max_iters_per_epoch, scaler=scaler, logger=tail.logger,
                                      tb_logger=tail.tb_logger, stop=tail.stop, guidance=config)
        lr_scheduler.step()
        if ctx.writes:
            atomic_save(checkpoint_state(tail.model, optimizer, lr_scheduler, scaler, epoch, config_dict(config),
                                         train_stats, class_names=tail.class_names),
                        os.path.join(ctx.output_dir, CHECKPOINT_NAME))
        fault_point("after_checkpoint")
        if tail.stop is not None:  # a signal during the save: the checkpoint is complete, stop before evaluating
            tail.stop.check(f"the end of epoch {epoch} (its checkpoint is written)", ctx.device)
        stats = finish_epoch(tail, epoch, train_stats, epoch_start)
    tail.tb_logger.close()
    say(f"training time {format_seconds(time.time() - run_start)}", flush=True)
    return stats


def cli(argv: Optional[List[str]] = None) -> int:
    """Parse (exit 2 on a bad configuration, before any work), run, and turn known failures into exit codes."""
    from engine import NonFiniteLossError

    try:
        args = parse_args(argv)
        config = prepare(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        run(args, config)
    except RunInterrupted as exc:
        if dist_utils.is_main_process():
            print(interrupted_message(exc, args, config.output_dir or None), file=sys.stderr, flush=True)
        return exc.exit_status
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except (InputError, FileNotFoundError) as exc:
        # bad input found once the run started (data files, checkpoint, output dir): one line too;
        # an error raised in a data-loader worker arrives with the worker's traceback in its text
        print(f"error: {one_line_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        # the file system failed us (disk full, quota, permissions changed mid-run): name the file
        print(f"error: {one_line_message(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist_utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
