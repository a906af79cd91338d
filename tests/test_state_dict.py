"""State-dict compatibility with the published Deformable DETR, H-Deformable-DETR and MS-DETR models.

The expected key names below are written from the upstream module layout (not read from our
model), so a renamed attribute here would break loading of their checkpoints.
"""
import pytest
import torch
import torchvision

from models import build_model, load_pretrained
from cli.config import parse_args


def _wb(prefix):
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _msda(prefix):
    return sum((_wb(f"{prefix}.{m}") for m in ("sampling_offsets", "attention_weights", "value_proj",
                                                "output_proj")), [])


def expected_keys(enc=6, dec=6, levels=4, two_stage=False, refine=False, mixed_selection=False, ms_detr=False,
                  backbone="resnet50"):
    """Key names of the upstream detector for the given configuration (heads not aliased)."""
    tv = getattr(torchvision.models, backbone)().state_dict()
    keys = [f"backbone.0.body.{k}" for k in tv if not k.startswith("fc.") and "num_batches_tracked" not in k]
    for i in range(levels):
        keys += _wb(f"input_proj.{i}.0") + _wb(f"input_proj.{i}.1")
    keys.append("transformer.level_embed")
    for i in range(enc):
        p = f"transformer.encoder.layers.{i}"
        keys += _msda(f"{p}.self_attn") + _wb(f"{p}.norm1") + _wb(f"{p}.linear1") + _wb(f"{p}.linear2") + \
            _wb(f"{p}.norm2")
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}"
        keys += _msda(f"{p}.cross_attn") + _wb(f"{p}.norm1")
        keys += [f"{p}.self_attn.in_proj_weight", f"{p}.self_attn.in_proj_bias"] + _wb(f"{p}.self_attn.out_proj")
        keys += _wb(f"{p}.norm2") + _wb(f"{p}.linear1") + _wb(f"{p}.linear2") + _wb(f"{p}.norm3")
        if ms_detr:
            keys += _wb(f"{p}.linear3") + _wb(f"{p}.linear4") + _wb(f"{p}.norm4")
    if two_stage:
        for m in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm"):
            keys += _wb(f"transformer.{m}")
    else:
        keys += _wb("transformer.reference_points")
    if not two_stage or mixed_selection:
        keys.append("query_embed.weight")
    num_pred = dec + 1 if two_stage else dec
    for i in range(num_pred):
        keys += _wb(f"class_embed.{i}") + sum((_wb(f"bbox_embed.{i}.layers.{j}") for j in range(3)), [])
    return sorted(keys)


@pytest.fixture(scope="module")
def r50_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return str(path)


def _model(weights, *flags):
    args = parse_args(["--device", "cpu", "--backbone_weights", weights] + list(flags))
    args.num_classes = 91
    return build_model(args)[0]


PUBLISHED = {
    # Deformable DETR, stock (no refine, no two-stage)
    "deformable_detr": ([], {}),
    # Deformable DETR ++ two-stage (with box refine)
    "deformable_detr_two_stage": (["--with_box_refine", "--two_stage"], dict(two_stage=True, refine=True)),
    # H-Deformable-DETR: hybrid branch 300 + 1500 queries, two-stage, refine, mixed selection, look-forward-twice
    "h_deformable_detr": (["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
                           "--num_queries_one2many", "1500", "--dim_feedforward", "2048", "--dropout", "0"],
                          dict(two_stage=True, refine=True, mixed_selection=True)),
    # MS-DETR: mixed supervision with the auxiliary FFN
    "ms_detr": (["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice", "--use_ms_detr",
                 "--dim_feedforward", "2048", "--dropout", "0"],
                dict(two_stage=True, refine=True, mixed_selection=True, ms_detr=True)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_state_dict_keys_match_upstream(name, r50_weights):
    flags, layout = PUBLISHED[name]
    state = _model(r50_weights, *flags).state_dict()
    assert sorted(state) == expected_keys(**layout)


def test_hybrid_shapes(r50_weights):
    state = _model(r50_weights, *PUBLISHED["h_deformable_detr"][0]).state_dict()
    assert state["query_embed.weight"].shape == (1800, 256)
    assert state["class_embed.6.weight"].shape == (91, 256)
    assert state["transformer.decoder.layers.0.linear1.weight"].shape == (2048, 256)
    assert state["transformer.pos_trans.weight"].shape == (512, 512)


def test_loader_drops_upstream_head_aliases(tmp_path, r50_weights):
    """An upstream checkpoint (heads saved twice, under the decoder too) loads with nothing missing."""
    flags = PUBLISHED["h_deformable_detr"][0]
    source = _model(r50_weights, *flags)
    state = dict(source.state_dict())
    for key in list(state):
        if key.startswith(("class_embed.", "bbox_embed.")):
            state["transformer.decoder." + key] = state[key]
    path = tmp_path / "upstream.pth"
    torch.save({"model": state, "epoch": 11}, path)
    target = _model(r50_weights, *flags)
    missing, unexpected = load_pretrained(target, str(path), verbose=False)
    assert missing == [] and unexpected == []
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])


def test_loader_reports_shape_mismatch(tmp_path, r50_weights):
    source = _model(r50_weights)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    args = parse_args(["--device", "cpu", "--backbone_weights", r50_weights])
    args.num_classes = 3  # another dataset: the classifier cannot be loaded
    target = build_model(args)[0]
    missing, unexpected = load_pretrained(target, str(path), verbose=False)
    assert unexpected == []
    assert set(missing) == {f"class_embed.{i}.{p}" for i in range(6) for p in ("weight", "bias")}


def test_stock_r50_parameter_count(r50_weights):
    """Deformable DETR R50, 4 levels, 300 queries, single-stage, no refinement.

    The paper (Zhu et al., ICLR 2021, Table 1) reports 40M parameters; counting trainable
    parameters as upstream main.py does (frozen stem, layer1 and BatchNorm) gives exactly
    39,847,265 for this layout.
    """
    model = _model(r50_weights)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 39_847_265
