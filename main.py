"""Train or evaluate the detector: ``python main.py --config FILE --coco_path DIR [--flag value ...]``.

Single process, ``torchrun``, ``python -m torch.distributed.launch`` and SLURM (``srun``) all
run this file; ``util.dist.init_distributed_mode`` reads whichever environment they set.
Only the main process (rank 0) writes files: ``checkpoint.pth`` (every epoch, atomically),
``checkpointNNNN.pth`` (before each lr drop and at the end), ``log.jsonl``, ``config.yaml``,
``detections_val.json``, TensorBoard events under ``tensorboard/`` and, while it runs, the lock
file ``.lock`` (pid and host of the run that owns the directory).

With ``--diag_images N`` (> 0) every evaluation is followed by the reference diagnostics
(docs/design.md §9) on the first N validation images, on the main process only: one ``diag``
record in ``log.jsonl`` and TensorBoard scalars under ``diag/``. A training run that starts from
initialisation (no checkpoint resumed) also measures them once before its first training step:
the ``diag`` record of epoch -1 (TensorBoard step 0), what geometry and initialisation alone give.

``--eval`` writes its own ``config.yaml``, ``log.jsonl`` (an ``eval`` record, and an ``eval_diag``
record for the diagnostics) and detections; given a training run's output directory, it writes
them to that directory's ``eval/`` subfolder, so the run's own files stay the training's.

An epoch is one recoverable unit: training, then ``checkpoint.pth`` (which also holds the epoch's
training statistics), then the epoch's tail -- numbered copy, evaluation, the ``epoch`` record in
``log.jsonl``. The record is written last, so its absence tells a resumed run (``--auto_resume``,
or ``--resume`` of the output directory's own checkpoint) to finish that tail before training on.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

import util.dist as dist_utils
from cli.config import get_args_parser  # noqa: F401  (main.get_args_parser(): main's interface)
from cli.checkpoint_config import configuration_for_checkpoint, differences_from_checkpoint
from cli.run_loading import load_model_weights, same_path
from cli.config import Config, config_dict, derived_keys, parse_args, resolve_config, save_config, validate_paths
from util.checkpoint import (CHECKPOINT_NAME, atomic_copy, atomic_save, checkpoint_state, fault_point,
                             find_latest_checkpoint, load_checkpoint, numbered_checkpoint_paths,
                             remove_stale_temp_files, resume_training_state, saved_config)
from util.dist import DistInfo, say
from util.errors import InputError, one_line_message
from util.interrupt import RunInterrupted, StopSignals
from util.logger import INIT_EPOCH, JsonlLogger, TensorboardLogger, format_seconds
from util.optim import build_lr_scheduler, build_optimizer
from util.output_lock import OutputDirLock
from util.seeding import EpochRandomSampler, WorkerSeeder, mix_seed, seed_everything


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


@dataclass
class DiagnosticsProbe:
    """The reference diagnostics of this run: the recorder (kept for the whole run, since the
    across-evaluation D3 metrics compare with the previous evaluation) and the probe images."""

    diagnostics: Any  # models.diagnostics.ReferenceDiagnostics of the eager model
    dataset: Any      # the validation dataset
    indices: List[int]


@dataclass
class EpochTail:
    """What finishing an epoch (numbered copy, evaluation, log record) needs."""

    config: Config
    ctx: RunContext
    model: torch.nn.Module
    postprocessors: Dict
    val_loader: DataLoader
    base_ds: Any
    logger: JsonlLogger
    tb_logger: TensorboardLogger
    trainable: int
    class_names: Dict[int, str] = field(default_factory=dict)
    stop: Optional[StopSignals] = None
    probe: Optional[DiagnosticsProbe] = None


# ----------------------------------------------------------------------------- setup helpers

def prepare(args) -> Config:
    """Check the files the run needs and resolve the parsed ``args`` into the read-only configuration
    (device after the CPU fallback, classifier size from the dataset when unset); check that the
    attention implementation ``MSDA_IMPL`` asks for runs on that device. Raises ValueError or
    FileNotFoundError, before any work."""
    import datasets
    import ops

    validate_paths(args)
    num_classes = args.num_classes if args.num_classes is not None else datasets.num_classes(args)
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
    return latest or ""


def resume_flag_name(args, config: Config) -> str:
    """How the user named the checkpoint the run continues from, for messages: '--resume', or
    '--auto_resume' when that found it; with '--eval ' in front under --eval."""
    flag = "--auto_resume" if args.auto_resume and not args.resume else "--resume"
    return f"--eval {flag}" if config.eval else flag


def build_data(config: Config, ctx: RunContext):
    """Datasets, samplers and loaders. Returns (train_loader, val_loader, train_sampler, seeder, base_ds)."""
    import datasets

    dataset_train = datasets.build_dataset("train", config) if not config.eval else None
    dataset_val = datasets.build_dataset("val", config)
    seeder = WorkerSeeder(config.seed, ctx.place.rank)
    pin_memory = ctx.device.type == "cuda"
    train_loader = train_sampler = None
    if dataset_train is not None:
        if ctx.place.distributed:
            train_sampler = DistributedSampler(dataset_train, shuffle=True, seed=config.seed)
        else:
            train_sampler = EpochRandomSampler(dataset_train, seed=config.seed)
        batches = BatchSampler(train_sampler, config.batch_size, drop_last=True)
        if len(batches) == 0:
            raise ValueError(f"the training set ({len(dataset_train)} images per process) is smaller than "
                             f"--batch_size {config.batch_size}")
        train_loader = DataLoader(dataset_train, batch_sampler=batches, collate_fn=datasets.collate_fn,
                                  num_workers=config.num_workers, worker_init_fn=seeder, pin_memory=pin_memory)
    val_sampler = (DistributedSampler(dataset_val, shuffle=False) if ctx.place.distributed
                   else SequentialSampler(dataset_val))
    val_loader = DataLoader(dataset_val, batch_size=config.batch_size, sampler=val_sampler, drop_last=False,
                            collate_fn=datasets.collate_fn, num_workers=config.num_workers, worker_init_fn=seeder,
                            pin_memory=pin_memory)
    return train_loader, val_loader, train_sampler, seeder, datasets.get_coco_api(dataset_val)


def class_names_of(loader: DataLoader) -> Dict[int, str]:
    """{category id: name} of the loader's annotation file (stored with every checkpoint)."""
    import datasets

    return datasets.class_names(loader.dataset)


def count_parameters(model: torch.nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def compile_if_asked(model: torch.nn.Module, config) -> torch.nn.Module:
    """``torch.compile(model)`` under ``--compile`` (shares parameters with ``model``), else ``model``."""
    return torch.compile(model) if config.compile else model


def data_summaries(loaders, logger: JsonlLogger) -> None:
    """One line per split (images, annotations in the file, boxes training targets clip and drop), printed
    and logged."""
    import datasets

    for split, loader in loaders:
        if loader is None:
            continue
        summary = datasets.data_summary(loader.dataset, split)
        say(f"data {split}: {summary['images']} images, {summary['annotations']} annotations; as training "
            f"targets {summary['clipped_boxes']} boxes are clipped to their image and {summary['dropped_boxes']} "
            f"dropped as degenerate; evaluation scores the file as given ({summary['ann_file']})", flush=True)
        logger.write({"type": "data", **summary})


def eval_due(epoch: int, config: Config) -> bool:
    return (epoch + 1) % max(config.eval_every, 1) == 0 or epoch + 1 == config.epochs


def run_evaluation(tail: EpochTail, epoch: Optional[int] = None) -> Dict[str, float]:
    """``engine.evaluate`` of the eager model with this run's settings (detections written by the writer)."""
    from engine import evaluate

    return evaluate(tail.model, tail.postprocessors, tail.val_loader, tail.base_ds, tail.ctx.device,
                    amp=tail.config.amp, print_freq=tail.config.print_freq, epoch=epoch,
                    output_dir=tail.ctx.output_dir if tail.ctx.writes else None, stop=tail.stop,
                    guidance=tail.config)


def build_probe(config: Config, model: torch.nn.Module, dataset_val) -> Optional[DiagnosticsProbe]:
    """The reference diagnostics of ``model`` (eager, unwrapped) on the first ``--diag_images``
    validation images by id; None when that is 0 or this is not the main process.

    Only the main process measures. The diagnostics run the unwrapped module, so nothing in
    them is a collective: while rank 0 measures, the other ranks go on and wait for it at the
    next epoch's first gradient all-reduce, as for any slower rank. A collective in here would
    be called by one rank only and hang the job.
    """
    if config.diag_images == 0 or not dist_utils.is_main_process():
        return None
    from datasets.probe import probe_indices
    from models.diagnostics import ReferenceDiagnostics

    indices, message = probe_indices(dataset_val, config.diag_images)
    if message:
        say(message, flush=True)
    return DiagnosticsProbe(diagnostics=ReferenceDiagnostics(model, seed=config.seed), dataset=dataset_val,
                            indices=indices)


def log_diagnostics(tail: EpochTail, epoch: Optional[int], record_type: str = "diag") -> Dict[str, float]:
    """Measure the reference diagnostics once (when this process has a probe) and write the
    ``diag`` record (``record_type``: ``eval_diag`` under ``--eval``) and TensorBoard scalars.
    Returns the metrics ({} when none were measured, or when a stop signal cut the pass short: then
    nothing is written)."""
    from datasets.probe import probe_batches
    from engine import reference_diagnostics

    if tail.probe is None:
        return {}
    start = time.time()
    # a generator: the images are read and transformed inside reference_diagnostics, whose
    # restored random state covers the evaluation transform's draw
    batches = probe_batches(tail.probe.dataset, tail.probe.indices, tail.config.batch_size)
    metrics = reference_diagnostics(tail.model, tail.probe.diagnostics, batches, tail.ctx.device, stop=tail.stop)
    if metrics is None:  # a stop signal: no record; the caller's stop point ends the run
        return {}
    seconds = time.time() - start
    tail.logger.write({"type": record_type, "epoch": epoch, "N": len(tail.probe.indices), **metrics,
                       "diag_time": seconds})
    if epoch is not None:
        tail.tb_logger.scalars("diag", metrics, epoch + 1)
    shown = ", ".join(f"{key} {metrics[key]:.3f}" for key in sorted(metrics) if key.count("/") == 1)
    say(f"reference diagnostics on {len(tail.probe.indices)} probe images in {format_seconds(seconds)}"
        + (f": {shown}" if shown else ""), flush=True)
    return metrics


def log_initial_diagnostics(tail: EpochTail) -> None:
    """The ``diag`` record of the model before its first training step (epoch ``INIT_EPOCH``, -1),
    once per run: called only when no checkpoint was resumed, and skipped when the log already
    holds it (a run restarted before its first checkpoint). Training cannot notice the pass, as
    after an evaluation (generators and train/eval flags restored, nothing collective)."""
    if tail.probe is None:
        return
    if any(r.get("type") == "diag" and r.get("epoch") == INIT_EPOCH for r in tail.logger.records()):
        say("log.jsonl already holds the reference diagnostics at initialisation (epoch -1): not measured again",
            flush=True)
        return
    log_diagnostics(tail, INIT_EPOCH)


def log_pictures(tail: EpochTail, epoch: int) -> None:
    """``--vis_images`` fixed validation images with ground truth and predictions (and the guided
    references) to TensorBoard, on the main process; the eager model runs them one by one (none is
    written when a stop signal cuts the pass short)."""
    from engine import modes_kept, picture_indices, validation_pictures
    from util.seeding import rng_untouched

    if not (tail.ctx.writes and tail.config.vis_images > 0 and tail.tb_logger.active):
        return
    indices = picture_indices(len(tail.val_loader.dataset), tail.config.vis_images)
    with rng_untouched(), modes_kept(tail.model):  # the evaluation transform draws from Python's random
        pictures = validation_pictures(tail.model, tail.postprocessors, tail.val_loader.dataset, indices,
                                       tail.ctx.device, amp=tail.config.amp, class_names=tail.class_names,
                                       references=tail.config.enc_ref_mode != "none", guidance=tail.config,
                                       stop=tail.stop)
    for index, picture in pictures or ():  # None: a stop signal cut the pass short (the caller stops)
        tail.tb_logger.image(f"val_images/{index}", picture, epoch + 1)


def stop_point(tail: EpochTail, where: str) -> None:
    """A safe point that every rank reaches (a collective when distributed): ``RunInterrupted`` if a
    stop signal came, here or on any rank. The passes that run on rank 0 alone (reference
    diagnostics, pictures) only end early on a signal; the stop point after them acts on it."""
    if tail.stop is not None:
        tail.stop.check(where, tail.ctx.device)


def finish_epoch(tail: EpochTail, epoch: int, train_stats: Dict, epoch_start: float) -> Dict:
    """The tail of an epoch whose ``checkpoint.pth`` is written: numbered copy, evaluation (when
    due, followed by the reference diagnostics when asked for), the ``epoch`` log record (last:
    its presence marks the epoch complete). Returns the evaluation stats ({} when none was due).
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
        log_diagnostics(tail, epoch)
        if tail.config.diag_images > 0:
            stop_point(tail, f"the reference diagnostics of epoch {epoch} (its checkpoint is written)")
        log_pictures(tail, epoch)
        if tail.config.vis_images > 0:
            stop_point(tail, f"the pictures of epoch {epoch} (its checkpoint is written)")
    record["epoch_time"] = time.time() - epoch_start  # training + checkpoint + evaluation (+ diagnostics, pictures)
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
    train_loader, val_loader, train_sampler, seeder, base_ds = build_data(config, ctx)
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
                     probe=build_probe(config, model, val_loader.dataset))
    if config.eval:
        stats = run_evaluation(tail)
        evaluated_epoch = checkpoint.get("epoch") if checkpoint is not None else None
        logger.write({"type": "eval", "epoch": evaluated_epoch, "checkpoint": ctx.resume or config.pretrained or None,
                      **derived_keys(config), **{f"test_{k}": v for k, v in stats.items()}})
        log_diagnostics(tail, evaluated_epoch, record_type="eval_diag")
        if config.diag_images > 0:
            stop_point(tail, "the reference diagnostics of the evaluation")
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
        cleanup = logger.drop_epochs_from(start_epoch)
        if cleanup.records:
            say(f"log.jsonl: removed {cleanup.records} records of epochs >= {start_epoch} (an interrupted run's; "
                "they are trained again)", flush=True)
        if cleanup.unreadable:
            say(f"log.jsonl: removed {cleanup.unreadable} unreadable lines (cut short by a kill, or not UTF-8 "
                "JSON)", flush=True)
    tail.tb_logger = TensorboardLogger(os.path.join(ctx.output_dir, "tensorboard") if ctx.writes else None,
                                       config.tensorboard)
    if at_initialisation:
        log_initial_diagnostics(tail)
        if config.diag_images > 0:
            stop_point(tail, "the reference diagnostics at initialisation")
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
