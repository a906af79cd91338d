"""One training epoch and one COCO evaluation pass.

``train_one_epoch`` keeps the accelerator busy: losses are summed on the device and read back
once per ``--print_freq`` window (``util.logger.LossWindow``), which is also where a
non-finite loss is detected (the first bad iteration and terms are remembered on the device).
"""
import contextlib
import json
import os
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from models.guidance import GuidanceInputs, guidance_inputs
from util.checkpoint import atomic_write_text, fault_point
from util.dist import get_rank, is_main_process
from util.interrupt import RunInterrupted, StopSignals
from util.logger import JsonlLogger, LossWindow, ProgressBar, TensorboardLogger


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or predictions, or gradients); the message names the
    epoch, iteration and terms."""


class DivergedOutputsError(RuntimeError):
    """The criterion failed on predictions that were already NaN/inf (raised by ``train_step``)."""


def outputs_finite(outputs: Dict) -> torch.Tensor:
    """0-dim bool on the device: every predicted logit and box is finite. No host sync."""
    return torch.isfinite(outputs["pred_logits"]).all() & torch.isfinite(outputs["pred_boxes"]).all()


def count_skipped(targets: List[Dict]) -> int:
    """Unreadable images the loader replaced (``--skip_bad_images``) in this batch."""
    return sum(len(t.get("skipped_ids", ())) for t in targets)


# ----------------------------------------------------------------------------- small helpers

def autocast(device: torch.device, amp: str):
    """Mixed precision on the device's type for ``--amp bf16|fp16``; a no-op context for 'off'."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def outputs_to_float(value):
    """Cast floating tensors in a (nested) output structure to float32.

    The criterion runs outside autocast: the Hungarian matcher hands its cost matrix to scipy,
    which cannot read bf16, and losses are better summed in full precision.
    """
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: outputs_to_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(outputs_to_float(v) for v in value)
    return value


def move_to_device(samples, targets: List[Dict], device: torch.device):
    """Batch images (NestedTensor) and every tensor in the target dicts onto ``device``."""
    samples = samples.to(device, non_blocking=True)
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return samples, targets


def step_guidance(guidance, targets: Optional[List[Dict]], *step: int) -> Optional[GuidanceInputs]:
    """The forward's ``guidance`` argument for one step: None unless the guidance configured by
    ``guidance`` (the run's configuration: --enc_ref_mode, --ref_source, --ref_rank, --seed) reads the
    ground truth or a seed; the seed is a function of (--seed, *step), never of a global random state."""
    if guidance is None:
        return None
    return guidance_inputs(guidance, targets, (guidance.seed, *step))


def weigh_losses(loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total loss and the values to log: each weighted term under its own name, its raw value
    as '<name>_unscaled', logging-only terms (e.g. class_error) as they are, and 'loss'."""
    weighted = [loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict]
    if not weighted:
        raise RuntimeError(f"none of the criterion's terms {sorted(loss_dict)} has a weight in weight_dict")
    total = torch.stack(weighted).sum()
    values: Dict[str, torch.Tensor] = {"loss": total}
    for k, v in loss_dict.items():
        if k in weight_dict:
            values[k] = v * weight_dict[k]
            values[k + "_unscaled"] = v
        else:
            values[k] = v
    return total, values


def current_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """Learning rate of every parameter group by its name ('lr' is the main group's)."""
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        lrs["lr" if i == 0 else f"lr_{group.get('name', i)}"] = group["lr"]
    return lrs


def _nonfinite_message(epoch: int, window: LossWindow, first_iter: int, last_iter: int, total: int) -> str:
    """Iterations are 1-based counts within the epoch (as the progress bar shows them)."""
    report = window.nonfinite_report()
    if report is None:  # another rank saw it; this rank only knows the window
        where = f"iterations {first_iter}..{last_iter}/{total} (on another rank)"
        terms = "see that rank's message"
    else:
        where = f"iteration {report['iteration']}/{total}"
        # each term is logged weighted and '_unscaled'; name it once, and leave out the total
        names = sorted({t[: -len("_unscaled")] if t.endswith("_unscaled") else t for t in report["terms"]}
                       - {"loss", "grad_norm"})
        if report.get("outputs"):
            names.append("the predictions (pred_logits/pred_boxes) or gradients")
        terms = ", ".join(names) if names else "none by itself (their weighted sum overflowed)"
    return (f"non-finite loss at epoch {epoch}, {where}; non-finite terms: {terms}. Training stopped; "
            "no checkpoint was written for this epoch (the last good one is kept)")


def _nonfinite_error(epoch: int, window: LossWindow, first_iter: int, last_iter: int, total: int,
                     bar: ProgressBar, logger: Optional[JsonlLogger]) -> NonFiniteLossError:
    """Close the bar, log an 'error' record and build the exception to raise."""
    message = _nonfinite_message(epoch, window, first_iter, last_iter, total)
    bar.close()
    if logger is not None:
        logger.write({"type": "error", "epoch": epoch, "iter": last_iter, "message": message})
    return NonFiniteLossError(message)


def _stop_point(stop: Optional[StopSignals], where: str, device: torch.device, bar: ProgressBar) -> None:
    """A safe point: raise ``RunInterrupted`` (progress bar closed first) if a stop signal came."""
    if stop is None:
        return
    try:
        stop.check(where, device)
    except RunInterrupted:
        bar.close()
        raise


# ----------------------------------------------------------------------------- training

def train_step(model, criterion, samples, targets, optimizer, device, amp: str, clip: float, params,
               scaler=None, guidance=None, step: Tuple[int, ...] = ()) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Forward, loss, backward, (clip), optimiser step. ``guidance``, ``step``: see ``step_guidance``.

    Returns the device-side values to log and a 0-dim bool (device) that is True when the step
    diverged: non-finite predictions, or (clipping without a loss scaler) a non-finite gradient
    norm. Raises ``DivergedOutputsError`` when the criterion fails on non-finite predictions
    (the matcher rejects NaN boxes); that check syncs, but only on the failure path.
    """
    samples, targets = move_to_device(samples, targets, device)
    inputs = step_guidance(guidance, targets, *step)
    with autocast(device, amp):
        # targets feed denoising queries (--use_dn), unused otherwise; the guidance reads only ``inputs``
        outputs = model(samples, targets, guidance=inputs)
    outputs = outputs_to_float(outputs)
    finite = outputs_finite(outputs)
    try:
        loss_dict = criterion(outputs, targets)
    except Exception as exc:
        if not bool(finite):
            raise DivergedOutputsError(str(exc)) from exc
        raise
    total, values = weigh_losses(loss_dict, criterion.weight_dict)

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        if clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            values["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if clip > 0:
            values["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip)
            # the norm is computed anyway; a non-finite one means the step just poisoned the weights
            # (with a loss scaler, inf gradients are expected and the scaler skips those steps)
            finite = finite & torch.isfinite(values["grad_norm"])
        optimizer.step()
    return values, ~finite


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, *, amp: str, clip_max_norm: float, print_freq: int,
                    max_iters: Optional[int] = None, scaler: Optional[torch.amp.GradScaler] = None,
                    logger: Optional[JsonlLogger] = None, tb_logger: Optional[TensorboardLogger] = None,
                    stop: Optional[StopSignals] = None, guidance=None) -> Dict[str, float]:
    """Train for one epoch (or ``max_iters`` iterations, when given); returns epoch means.

    ``amp``: 'off' | 'bf16' | 'fp16' (``--amp``); ``clip_max_norm``: 0 disables clipping. Per
    window of ``print_freq`` iterations: one host sync, a progress line, a JSON record
    (``type: train``) and TensorBoard scalars. Raises ``NonFiniteLossError`` when a loss is
    NaN/inf (detected at the end of the window it happened in). ``stop``: SIGTERM/SIGINT are
    honoured at the end of a window (``util.interrupt.RunInterrupted``). ``guidance``: the run's
    configuration, so the model's guidance gets the targets or a seed when it reads them (the step's
    seed: --seed, epoch, iteration, rank; see ``step_guidance``).
    """
    model.train()
    criterion.train()
    print_freq = max(int(print_freq), 1)
    total_iters = len(data_loader)
    if max_iters:
        total_iters = min(total_iters, max_iters)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skipped = 0

    window = LossWindow(device)
    bar = ProgressBar(total_iters, f"Epoch {epoch}", enabled=is_main_process())
    epoch_sums: Dict[str, float] = {}
    epoch_count = 0
    epoch_start = window_start = time.time()
    data_time = 0.0
    window_first = 0
    fetch_start = time.time()
    for it, (samples, targets) in enumerate(data_loader):
        if it >= total_iters:
            break
        data_time += time.time() - fetch_start
        skipped += count_skipped(targets)
        try:
            values, diverged = train_step(model, criterion, samples, targets, optimizer, device, amp, clip_max_norm,
                                          params, scaler, guidance, (epoch, it, get_rank()))
        except DivergedOutputsError as exc:
            window.mark_diverged(it + 1)
            raise _nonfinite_error(epoch, window, window_first + 1, it + 1, total_iters, bar, logger) from exc
        except Exception as exc:
            # once a loss was NaN the weights are too, and a later step may fail anywhere
            # (e.g. the matcher); report the cause, not the symptom
            if window.nonfinite_report() is not None:
                raise _nonfinite_error(epoch, window, window_first + 1, it + 1, total_iters, bar, logger) from exc
            raise
        window.add(it + 1, values, diverged=diverged)  # 1-based, as the progress bar counts
        fault_point("train_iter")
        bar.tick(it + 1)
        last = it + 1 == total_iters
        if (it + 1) % print_freq == 0 or last:
            stats = window.close()  # the one host sync of the window
            if stats.pop("_nonfinite", 0) > 0:
                raise _nonfinite_error(epoch, window, window_first + 1, it + 1, total_iters, bar, logger)
            n = it + 1 - window_first
            elapsed = time.time() - window_start
            lrs = current_lrs(optimizer)
            for k, v in stats.items():
                epoch_sums[k] = epoch_sums.get(k, 0.0) + v * n
            epoch_count += n
            record = {"type": "train", "epoch": epoch, "iter": it + 1, "iters": total_iters, **lrs,
                      "sec_per_iter": elapsed / n, "data_sec_per_iter": data_time / n, **stats}
            if logger is not None:
                logger.write(record)
            if tb_logger is not None:
                step = epoch * total_iters + it + 1
                tb_logger.scalars("train", {**stats, **lrs, "sec_per_iter": elapsed / n}, step)
            fields = {"loss": f"{stats['loss']:.4f}", "lr": f"{lrs['lr']:.2e}"}
            if "class_error" in stats:
                fields["cls_err"] = f"{stats['class_error']:.1f}"
            bar.update(it + 1, fields, rate=n / max(elapsed, 1e-9))
            window_start, window_first, data_time = time.time(), it + 1, 0.0
            _stop_point(stop, f"epoch {epoch}, iteration {it + 1}/{total_iters} of training", device, bar)
        fetch_start = time.time()
    bar.close()
    means = {k: v / max(epoch_count, 1) for k, v in epoch_sums.items()}
    means.update(current_lrs(optimizer))  # the rates this epoch trained with (the scheduler steps after)
    means["epoch_time"] = time.time() - epoch_start
    means["iters"] = epoch_count
    means["skipped_images"] = skipped
    return means


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, postprocessors: Dict, data_loader: Iterable, base_ds, device: torch.device, *,
             amp: str, print_freq: int, epoch: Optional[int] = None, output_dir: Optional[str] = None,
             detections_name: str = "detections_val.json", stop: Optional[StopSignals] = None,
             guidance=None) -> Dict[str, float]:
    """COCO box evaluation of ``model`` on ``data_loader``; returns {AP, AP50, ..., ARl}.

    Prints pycocotools' 12-number table (main process) and writes the detections as a COCO results
    file ``output_dir/detections_name``. Evaluation losses are not computed (they would double the
    evaluation time). ``amp`` as in ``train_one_epoch``; the progress bar updates every ``print_freq``
    batches. ``guidance``: as in ``train_one_epoch`` (the step's seed: --seed, batch index, rank).
    """
    from datasets.coco_eval import CocoEvaluator

    model.eval()
    evaluator = CocoEvaluator(base_ds, ("bbox",))
    total = len(data_loader)
    desc = "Eval" if epoch is None else f"Eval {epoch}"
    bar = ProgressBar(total, desc, enabled=is_main_process())
    print_freq = max(int(print_freq), 1)
    start = time.time()
    skipped = 0
    for it, (samples, targets) in enumerate(data_loader):
        skipped += count_skipped(targets)
        samples, targets = move_to_device(samples, targets, device)
        with autocast(device, amp):
            outputs = model(samples, guidance=step_guidance(guidance, targets, it, get_rank()))
        outputs = outputs_to_float(outputs)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessors["bbox"](outputs, orig_sizes)
        by_image = {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)}
        evaluator.update(by_image)
        fault_point("eval_iter")
        bar.tick(it + 1)
        if (it + 1) % print_freq == 0 or it + 1 == total:
            bar.update(it + 1, {}, rate=(it + 1) / max(time.time() - start, 1e-9))
            _stop_point(stop, f"{desc.lower()}, batch {it + 1}/{total}", device, bar)
    bar.close()
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = evaluator.summarize()
    stats = {k: float(v) for k, v in stats.items()}
    if is_main_process() and output_dir:
        detections = evaluator.coco_results()
        atomic_write_text(os.path.join(output_dir, detections_name), json.dumps(detections))
    stats["eval_time"] = time.time() - start
    stats["skipped_images"] = _total_over_ranks(skipped, device)
    if stats["skipped_images"] and is_main_process():
        # a replaced image is scored as if the model found nothing in it
        print(f"evaluation: {stats['skipped_images']} unreadable images were skipped (--skip_bad_images); "
              "they are left out of the score", flush=True)
    return stats


def _total_over_ranks(count: int, device: torch.device) -> int:
    from util.dist import all_reduce_sum, is_dist_avail_and_initialized

    if not is_dist_avail_and_initialized():
        return count
    return int(all_reduce_sum(torch.tensor(count, device=device)).item())


# ----------------------------------------------------------------------------- pictures

def picture_indices(dataset_size: int, count: int) -> List[int]:
    """``count`` fixed dataset indices spread evenly over the split (the same ones every epoch)."""
    count = min(max(int(count), 0), dataset_size)
    if count <= 1:
        return list(range(count))
    return sorted({round(k * (dataset_size - 1) / (count - 1)) for k in range(count)})


def _reference_panel(base, capture, tokens: int):
    """The last encoder layer's references of ``tokens`` high-attention tokens, over ``base``."""
    from models.capture import choose_tokens, level_shapes, reference_entries, token_map, token_position
    from util import draw

    shapes = level_shapes(capture)
    chosen = choose_tokens(token_map(capture), shapes, tokens)
    marks = [(*token_position(t, shapes)[1:], [(x, y) for x, y, _, _ in reference_entries(capture.encoder_refs[-1], t)])
             for t in chosen]
    caption = f"last encoder layer: references of {len(chosen)} tokens"
    return draw.draw_caption(draw.draw_references(base, marks), caption)


@torch.no_grad()
def validation_pictures(model: nn.Module, postprocessors: Dict, dataset, indices: List[int], device: torch.device,
                        *, amp: str = "off", class_names: Optional[Dict[int, str]] = None, score_thr: float = 0.3,
                        references: bool = False, tokens: int = 3, guidance=None,
                        stop: Optional[StopSignals] = None) -> Optional[List[Tuple[int, "object"]]]:
    """One picture (PIL image) per validation image ``indices``: ground truth | predictions above
    ``score_thr`` [| with ``references``, the encoder references of ``tokens`` tokens of the last
    encoder layer]. Returns [(index, picture)]; None when a stop signal (``stop``) cut it short.

    Each image runs alone through the eager model in eval mode at its evaluation-transform size, so
    the boxes are those the evaluation scores (up to batch padding). ``guidance``: as in ``evaluate``
    (the seed: --seed, the dataset index).
    """
    from models.capture import run_captured
    from util import draw
    from util.box_ops import box_cxcywh_to_xyxy

    model.eval()
    pictures = []
    for index in indices:
        image, target = dataset[index]  # image (3, h, w) normalised; target boxes cxcywh in [0, 1]
        h, w = image.shape[-2:]
        with autocast(device, amp):
            outputs, capture = run_captured(model, [image.to(device)],
                                            guidance=step_guidance(guidance, [target], index))
        result = postprocessors["bbox"](outputs_to_float(outputs), torch.tensor([[h, w]], device=device))[0]
        result = {k: v.cpu() for k, v in result.items()}
        base, scale = draw.enlarged(draw.to_pil(image))
        truth = box_cxcywh_to_xyxy(target["boxes"].float()) * torch.tensor([w, h, w, h]) * scale
        panels = [draw.draw_caption(draw.draw_boxes(base, truth, target["labels"], None, class_names), "ground truth"),
                  draw.prediction_panel(base, scale, result, class_names, score_thr)]
        if references and capture.encoder_refs:
            panels.append(_reference_panel(base, capture, tokens))
        pictures.append((index, draw.side_by_side(panels)))
        if stop is not None and stop.requested:
            return None
    return pictures
# ----------------------------------------------------------------------------- reference diagnostics

@contextlib.contextmanager
def modes_kept(model: nn.Module):
    """Restore every submodule's train/eval flag afterwards (the diagnostics switch to eval)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def reference_diagnostics(model: nn.Module, diagnostics, batches: Iterable, device: torch.device,
                          stop: Optional[StopSignals] = None) -> Optional[Dict[str, float]]:
    """One pass of ``diagnostics`` (a ``models.diagnostics.ReferenceDiagnostics`` of ``model``) over
    the probe ``batches`` ((NestedTensor (B, 3, H, W), targets) on the CPU); returns its flat metrics,
    or None when a stop signal (``stop``) arrived during it: the pass ends after that batch, unfinished.

    Training cannot notice it: every random generator is restored afterwards (the evaluation
    transform draws from Python's ``random``), and so is every module's train/eval flag. No
    collective runs inside, which is what lets one process do this alone.
    """
    from util.seeding import rng_untouched

    with rng_untouched(), modes_kept(model):
        diagnostics.start()
        for samples, targets in batches:
            samples, targets = move_to_device(samples, targets, device)
            diagnostics.update(samples, targets)
            if stop is not None and stop.requested:
                return None
        return diagnostics.finish()
