"""The reference diagnostics after every evaluation (``--diag_images N`` > 0; design §9).

On the first N validation images by image id (the probe set, ``datasets.probe``), the recorder
``models.diagnostics.ReferenceDiagnostics`` of the eager model measures D1-D6 after each
evaluation: one ``diag`` record in ``log.jsonl`` (``eval_diag`` under ``--eval``) and TensorBoard
scalars under ``diag/``. A run that starts from initialisation also measures once before its first
training step: the ``diag`` record of epoch -1 (TensorBoard step 0), what geometry and
initialisation alone give. The recorder is kept for the whole run: the across-evaluation D3
metrics compare with the previous pass.
"""
import time
from typing import Dict, List, Optional

from datasets.probe import probe_batches, probe_indices
from models.diagnostics import ReferenceDiagnostics
from runner.tail import EpochTail
from util.dist import say
from util.logger import INIT_EPOCH, format_seconds

from .base import EvalExtra, register


@register
class ReferenceDiagnosticsExtra(EvalExtra):
    name = "reference diagnostics"
    records = ("diag",)

    def __init__(self, diagnostics: ReferenceDiagnostics, dataset, indices: List[int]):
        self.diagnostics, self.dataset, self.indices = diagnostics, dataset, indices

    @classmethod
    def build(cls, config, model, dataset) -> Optional["ReferenceDiagnosticsExtra"]:
        if config.diag_images == 0:
            return None
        indices, message = probe_indices(dataset, config.diag_images)
        if message:
            say(message, flush=True)
        return cls(ReferenceDiagnostics(model, seed=config.seed), dataset, indices)

    def before_training(self, tail: EpochTail) -> Dict[str, float]:
        """The record of epoch -1, once per run: skipped when the log already holds it (a run restarted
        before its first checkpoint)."""
        if any(r.get("type") == "diag" and r.get("epoch") == INIT_EPOCH for r in tail.logger.records()):
            say("log.jsonl already holds the reference diagnostics at initialisation (epoch -1): not measured again",
                flush=True)
            return {}
        return self.after_evaluation(tail, INIT_EPOCH)

    def after_evaluation(self, tail: EpochTail, epoch: Optional[int]) -> Dict[str, float]:
        """One pass over the probe images; the record and scalars. Returns the metrics."""
        start = time.time()
        # a generator: the images are read and transformed inside the pass, under the loop's
        # restored random state (the evaluation transform draws from Python's random)
        batches = probe_batches(self.dataset, self.indices, tail.config.batch_size)
        metrics = self.diagnostics.measure(batches, stop=tail.stop)
        if metrics is None:  # a stop signal: no record; the stop point after the extra ends the run
            return {}
        seconds = time.time() - start
        tail.logger.write({"type": "eval_diag" if tail.config.eval else "diag", "epoch": epoch,
                           "N": len(self.indices), **metrics, "diag_time": seconds})
        if epoch is not None:
            tail.tb_logger.scalars("diag", metrics, epoch + 1)
        shown = ", ".join(f"{key} {metrics[key]:.3f}" for key in sorted(metrics) if key.count("/") == 1)
        say(f"reference diagnostics on {len(self.indices)} probe images in {format_seconds(seconds)}"
            + (f": {shown}" if shown else ""), flush=True)
        return metrics
