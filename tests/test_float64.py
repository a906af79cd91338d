"""The box path runs in float32 or wider (docs/design.md §6, Precision): a float64 model stays float64.

Half types go up to float32 on the box path (the bf16 / fp16 autocast checks are in
tests/test_research_semantics.py); float64 must not come down, because upstream-equivalence
checks and gradchecks run the model in float64. A dispatch mode records every op that turns a
float64 input into a narrower float, so a silent cast is caught even where the outputs would
still come out float64.
"""
import copy
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import build_model
from models.deformable_transformer import fp32_head, refine_boxes
from models.position_encoding import box_sine_embedding
from models.transformer_layers import MLP
from tests.helpers import simple_targets, tiny_args, two_padded_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_STAGE_REFINE = ["--with_box_refine", "--two_stage"]
# guidance ranks candidates by keys built from float32 bit patterns (models/guidance/top_per_token.py):
# these casts order candidates and carry no gradient, so they are the only ones allowed
RANKING_ONLY = {"_class_scores", "entry_keys"}


class DowncastRecorder(TorchDispatchMode):
    """Records (op, innermost project function, 'path:line') for every op with a float64 tensor
    input and a narrower floating-point output."""

    def __init__(self):
        super().__init__()
        self.downcasts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if (any(t.dtype == torch.float64 for t in inputs)
                and any(t.is_floating_point() and t.dtype != torch.float64 for t in outputs)):
            self.downcasts.append((str(func),) + _project_site())
        return out


def _project_site():
    """(function, 'path:line') of the innermost stack frame in models/ or util/."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.relpath(frame.filename, ROOT)
        if path.split(os.sep)[0] in ("models", "util"):
            return frame.name, f"{path}:{frame.lineno}"
    return "?", "?"


def perturbed_model(*flags):
    """A tiny model with every weight moved off its initialisation (zero-initialised box heads
    would hide the box path)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(*flags))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def forward(model, images, train: bool, targets=None):
    """One forward (same denoising noise for every call: the global seed is reset)."""
    model.train(train)
    torch.manual_seed(1)
    return model(images, targets)


def float64_run(model, train: bool, targets=None):
    """The same weights in float64 on float64 images -> (outputs, recorded downcasts)."""
    model64 = copy.deepcopy(model).double()
    images = [image.double() for image in two_padded_images()]
    with DowncastRecorder() as recorder:
        outputs = forward(model64, images, train, targets)
    return outputs, recorder.downcasts


def paired_predictions(out64, out32):
    """(name, float64 tensor, float32 tensor) for every prediction both runs returned."""
    pairs = []

    def visit(name, a, b):
        if isinstance(a, torch.Tensor):
            pairs.append((name, a, b))
        elif isinstance(a, dict):
            for key in a:
                if key != "groups":  # the denoising layout (noised targets), not a prediction
                    visit(f"{name}.{key}", a[key], b[key])
        elif isinstance(a, list):
            for i, (x, y) in enumerate(zip(a, b)):
                visit(f"{name}[{i}]", x, y)

    visit("out", out64, out32)
    return pairs


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_dn"])
def test_two_stage_refinement_runs_in_float64_and_agrees_with_float32(train):
    """--with_box_refine --two_stage (and denoising in training): every prediction is float64, no op
    narrows a float64 tensor, and the result equals the float32 run of the same weights to float32
    tolerance."""
    flags = TWO_STAGE_REFINE + (["--use_dn", "--dn_number", "8"] if train else [])
    model = perturbed_model(*flags)
    targets = simple_targets() if train else None
    out32 = forward(model, two_padded_images(), train, targets)
    out64, downcasts = float64_run(model, train, targets)
    assert downcasts == []
    pairs = paired_predictions(out64, out32)
    names = [name for name, _, _ in pairs]
    assert "out.enc_outputs.pred_boxes" in names and "out.aux_outputs[0].pred_boxes" in names
    assert train == ("out.dn_outputs.pred_boxes" in names)
    for name, t64, t32 in pairs:
        assert t64.dtype == torch.float64, name
        torch.testing.assert_close(t64.float(), t32, msg=lambda m: f"{name}: {m}")  # float32 tolerances


@pytest.mark.parametrize("flags", [
    ["--variant", "v3.0.1", "--with_box_refine", "--use_ms_detr", "--ref_grad"],
    ["--variant", "v3.0.4", *TWO_STAGE_REFINE, "--num_queries_one2many", "24", "--ref_grad"],
], ids=["v3.0.1-mixed", "v3.0.4-hybrid"])
def test_guided_training_step_stays_float64(flags):
    """A training forward with guidance and denoising on float64 targets: guided encoder references
    and every prediction are float64; the only narrowing casts are the ranking keys' (they order
    candidates and carry no gradient)."""
    model = perturbed_model(*flags, "--use_dn", "--dn_number", "8").double()
    targets = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in simple_targets()]
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
             for layer in model.transformer.encoder.layers]
    with DowncastRecorder() as recorder:
        outputs = forward(model, [image.double() for image in two_padded_images()], True, targets)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 2 and all(refs.dtype == torch.float64 for refs in seen)
    assert seen[1].dim() == (4 if "v3.0.1" in flags else 5)  # layer 2 is guided (cascade)
    predictions = [t for name, t, _ in paired_predictions(outputs, outputs)]
    assert len(predictions) > 10 and all(t.dtype == torch.float64 for t in predictions)
    assert outputs["dn_outputs"]["groups"].boxes.dtype == torch.float64
    narrowing_sites = {function for _, function, _ in recorder.downcasts}
    assert narrowing_sites and narrowing_sites <= RANKING_ONLY, recorder.downcasts


def test_box_path_pieces_pass_gradcheck_in_float64():
    """The box head + refinement and the box sine embedding are differentiable in float64 (a float32
    cast inside would fail the finite-difference comparison, or the dtype check of the head)."""
    torch.manual_seed(0)
    head = MLP(8, 8, 4, 3).double()
    features = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    reference = torch.rand(1, 3, 4, dtype=torch.float64).clamp(0.1, 0.9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, r: refine_boxes(fp32_head(head, f), r), (features, reference))
    boxes = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert box_sine_embedding(boxes, 16).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda b: box_sine_embedding(b, 16), (boxes,))


def test_train_step_keeps_float64_losses_and_gradients():
    """engine.train_step on a float64 model: the criterion sees float64 predictions (only half types
    are widened to float32), so the loss, every logged term and every gradient stay float64."""
    from engine import train_step
    from util.nested_tensor import nested_tensor_from_tensor_list
    from util.optim import build_optimizer

    args = tiny_args(*TWO_STAGE_REFINE, "--use_ms_detr")
    model = perturbed_model(*TWO_STAGE_REFINE, "--use_ms_detr").double().train()
    _, criterion, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    samples = nested_tensor_from_tensor_list([image.double() for image in two_padded_images()])
    targets = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in simple_targets()]
    values, diverged = train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"), "off",
                                  0.1, params)
    assert not bool(diverged)
    assert values["loss"].dtype == torch.float64 and values["loss_bbox_enc"].dtype == torch.float64
    assert all(p.grad.dtype == torch.float64 for p in params if p.grad is not None)
