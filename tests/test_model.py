"""Every documented configuration builds, runs on padded images, gives finite losses and gradients."""
import pytest
import torch

from models import build_model
from tests.helpers import simple_targets, tiny_args, two_padded_images

CONFIGS = {
    "stock": [],
    "box_refine": ["--with_box_refine"],
    "two_stage": ["--with_box_refine", "--two_stage"],
    "two_stage_no_refine": ["--two_stage"],
    "hybrid": ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
               "--num_queries_one2many", "24", "--k_one2many", "2"],
    "mixed": ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice", "--use_ms_detr"],
    "mixed_no_aux_ffn": ["--with_box_refine", "--use_ms_detr", "--no-use_aux_ffn"],
    "cascade": ["--with_box_refine", "--stages", "1:1,1:1"],
    "decoder_first": ["--with_box_refine", "--two_stage", "--stages", "0:1,2:1"],
    "single_level": ["--num_feature_levels", "1"],
    "progressive": ["--enc_ref_progressive"],
    "trained_backbone_bn": ["--backbone_norm", "bn"],
}


def _losses(model, criterion, seed=0):
    outputs = model(two_padded_images(seed))
    loss_dict = criterion(outputs, simple_targets())
    weighted = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    return outputs, loss_dict, weighted


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configuration_trains(name):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*CONFIGS[name]))
    model.train()
    outputs, loss_dict, total = _losses(model, criterion)
    assert outputs["pred_logits"].shape == (2, 12, 5)
    assert outputs["pred_boxes"].shape == (2, 12, 4)
    assert len(outputs["aux_outputs"]) == 1
    for key, value in loss_dict.items():
        assert torch.isfinite(value).all(), f"{name}: loss {key} is not finite"
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not
                                                                               torch.isfinite(p.grad).all())]
    assert no_grad == [], f"{name}: parameters without a finite gradient: {no_grad}"


def test_one2many_outputs_only_in_training():
    model, _, _ = build_model(tiny_args(*CONFIGS["hybrid"]))
    model.train()
    out = model(two_padded_images())
    assert out["pred_logits_one2many"].shape == (2, 24, 5)
    assert out["enc_outputs"]["pred_boxes"].shape[-1] == 4
    model.eval()
    with torch.no_grad():
        out = model(two_padded_images())
    assert "pred_logits_one2many" not in out and out["pred_logits"].shape == (2, 12, 5)


def test_mixed_supervision_shares_queries():
    model, _, _ = build_model(tiny_args(*CONFIGS["mixed"]))
    model.train()
    out = model(two_padded_images())
    assert out["pred_logits_one2many"].shape == out["pred_logits"].shape
    # the aux FFN makes the one-to-many stream differ from the one-to-one stream
    assert not torch.allclose(out["pred_logits_one2many"], out["pred_logits"])


def test_hybrid_groups_do_not_see_each_other():
    """One-to-one predictions must not depend on the one-to-many queries (masked self-attention)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("--with_box_refine", "--num_queries_one2many", "24"))
    model.train()
    images = two_padded_images()
    with torch.no_grad():
        first = model(images)["pred_boxes"]
        model.query_embed.weight[12:] += torch.randn_like(model.query_embed.weight[12:])
        second = model(images)["pred_boxes"]
    torch.testing.assert_close(first, second)


def test_list_and_nested_tensor_inputs_agree():
    from util.nested_tensor import nested_tensor_from_tensor_list
    model, _, _ = build_model(tiny_args())
    model.eval()
    images = two_padded_images()
    with torch.no_grad():
        a = model(images)["pred_boxes"]
        b = model(nested_tensor_from_tensor_list(images))["pred_boxes"]
    torch.testing.assert_close(a, b)


def test_progressive_references_are_previous_sampling_locations():
    """--enc_ref_progressive: encoder layer i>0 takes layer i-1's sampling locations (per head) as references,
    also across a decoder layer run in between (stage 1:1, then 2:1)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("--enc_layers", "3", "--stages", "1:1,2:1", "--enc_ref_progressive"))
    model.eval()
    seen = []  # (references given, sampling locations returned) per encoder layer

    def record(module, args, kwargs, output):
        seen.append((args[2], output.sampling_locations))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.transformer.encoder.layers]
    with torch.no_grad():
        model(two_padded_images())
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    first_refs, first_locations = seen[0]
    assert first_refs.dim() == 4  # stock (bs, tokens, levels, 2)
    assert first_locations.shape[2:] == (4, 4, 4, 2)  # (bs, tokens, heads, levels, points, 2)
    for (_, previous_locations), (refs, _) in zip(seen[:-1], seen[1:]):
        assert refs.shape == previous_locations.shape
        assert torch.equal(refs, previous_locations)


# levels 1 uses the stride-32 map (layer4, which needs the stages before it); 2 uses strides 8 and 16 only
@pytest.mark.parametrize("levels,stages", [(1, {"layer2", "layer3", "layer4"}), (2, {"layer2", "layer3"}),
                                           (3, {"layer2", "layer3", "layer4"})])
def test_fewer_levels_build_only_the_backbone_stages_they_use(levels, stages):
    """Every trainable parameter gets a gradient (what DDP with find_unused_parameters off needs)."""
    import models
    from tests.helpers import simple_targets, two_padded_images
    from util.nested_tensor import nested_tensor_from_tensor_list

    args = tiny_args("--num_feature_levels", str(levels), "--no-find_unused_parameters")
    model, criterion, _ = models.build_model(args)
    body = model.backbone[0].body
    assert {name for name in ("layer2", "layer3", "layer4") if hasattr(body, name)} == stages
    samples = nested_tensor_from_tensor_list(two_padded_images())
    losses = criterion(model(samples), simple_targets())
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad[:5]}"
