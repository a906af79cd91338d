"""A diverging run stops: a NaN/inf loss, prediction or gradient is one line naming the epoch,
iteration and terms (exit 1), an ``error`` record, and no checkpoint of the diverged weights."""
import torch

import main as main_module
from engine import train_step
from tests.helpers import tiny_args
from tests.run_helpers import cli, synthetic_flags
from util.checkpoint import load_checkpoint
from util.logger import LossWindow, read_jsonl
from util.optim import build_optimizer


class _NaNBoxesAfter(torch.nn.Module):
    """Wraps the detector: from call ``start`` on, every predicted box is NaN (the loss is computed
    from them, so the matcher sees NaN boxes first)."""

    def __init__(self, model, start):
        super().__init__()
        self.model, self.start, self.calls = model, start, 0

    def forward(self, samples, targets=None, guidance=None):
        out = self.model(samples, targets, guidance=guidance)
        self.calls += 1
        if self.calls > self.start:
            out["pred_boxes"] = out["pred_boxes"] * float("nan")
        return out


def test_nonfinite_predictions_stop_like_a_nonfinite_loss(tmp_path, synthetic_dir, monkeypatch, capsys):
    import models

    build = models.build_model

    def build_with_fault(args):
        model, criterion, post = build(args)
        return _NaNBoxesAfter(model, start=2 + 1 + 1), criterion, post  # 2 steps, 1 eval batch, 1 step

    monkeypatch.setattr(models, "build_model", build_with_fault)
    out = tmp_path / "run"
    code = main_module.cli([str(a) for a in synthetic_flags(synthetic_dir, out, "--epochs", "3",
                                                            "--max_iters_per_epoch", "2")])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss at epoch 1, iteration 2/2" in err and "predictions" in err
    assert "boxes1" not in err  # not the matcher's assertion
    assert load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 0  # no checkpoint of diverged weights
    errors = [r for r in read_jsonl(str(out / "log.jsonl")) if r["type"] == "error"]
    assert len(errors) == 1 and "epoch 1, iteration 2/2" in errors[0]["message"]


def test_real_divergence_with_a_huge_learning_rate(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    code, err = cli(synthetic_flags(synthetic_dir, out, "--lr", "1e5", "--epochs", "2", "--max_iters_per_epoch", "2"),
                    capsys)
    assert code == 1, err
    assert "non-finite loss at epoch 0" in err and "Traceback" not in err
    assert not (out / "checkpoint.pth").exists()
    assert [r["type"] for r in read_jsonl(str(out / "log.jsonl")) if r["type"] == "error"] == ["error"]


def test_diverged_step_is_flagged_without_a_host_sync():
    """train_step returns a device flag; LossWindow counts it like a non-finite loss at window close."""
    import models

    args = tiny_args()
    model, criterion, _ = models.build_model(args)
    optimizer = build_optimizer(model, args)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    from tests.helpers import simple_targets, two_padded_images
    from util.nested_tensor import nested_tensor_from_tensor_list

    samples = nested_tensor_from_tensor_list(two_padded_images())
    values, diverged = train_step(model, criterion, samples, simple_targets(), optimizer, torch.device("cpu"),
                                  "off", 0.1, params)
    assert diverged.dtype == torch.bool and diverged.dim() == 0 and not bool(diverged)
    window = LossWindow("cpu")
    window.add(1, values, diverged=diverged)
    window.add(2, values, diverged=torch.tensor(True))
    assert window.close()["_nonfinite"] > 0
    report = window.nonfinite_report()
    assert report == {"iteration": 2, "terms": [], "outputs": True}
