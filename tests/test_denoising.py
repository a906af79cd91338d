"""DINO contrastive denoising (--use_dn): groups, attention mask, losses, isolation from the encoder guidance."""
import json
from types import SimpleNamespace

import pytest
import torch

import main as main_module
from models import build_model
from models.criterion import build_weight_dict
from models.deformable_detr import DeformableDETR
from models.denoising import (DenoisingConfig, denoising_attn_mask, make_denoising_groups, num_denoising_groups)
from tests.helpers import one_epoch_smoke_flags, simple_targets, tiny_args, two_padded_images
from util.box_ops import box_cxcywh_to_xyxy
from cli.config import parse_args

# ----------------------------------------------------------------------------- group construction


def three_and_zero_boxes():
    """Two images: three small boxes well inside the image (no clamping under noise), and none."""
    return [
        {"labels": torch.tensor([2, 0, 4]),
         "boxes": torch.tensor([[0.3, 0.4, 0.1, 0.2], [0.5, 0.5, 0.2, 0.1], [0.7, 0.6, 0.15, 0.15]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]


def test_group_count_follows_dino():
    assert num_denoising_groups(100, 3) == 33
    assert num_denoising_groups(100, 7) == 14
    assert num_denoising_groups(2, 5) == 1      # at least one group
    assert num_denoising_groups(100, 0) == 1    # a batch without boxes


def test_groups_hand_worked_layout():
    """3 and 0 boxes, dn_number 6 -> 2 groups of 6 slots: [pos 0 1 2 | neg 0 1 2] twice."""
    targets = three_and_zero_boxes()
    config = DenoisingConfig(num_classes=5, dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.0)
    groups = make_denoising_groups(targets, config)
    assert (groups.num_groups, groups.group_size, groups.size) == (2, 6, 12)
    assert groups.positive.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert groups.valid[0].all() and not groups.valid[1].any()
    assert groups.gt_index.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], [-1] * 12]
    # without noise the inputs are the ground truth, repeated in every half
    assert groups.labels[0].tolist() == [2, 0, 4] * 4
    assert torch.equal(groups.boxes[0], targets[0]["boxes"].repeat(4, 1))
    # padding slots: the image without boxes
    assert groups.labels[1].tolist() == [0] * 12 and torch.all(groups.boxes[1] == 0.5)
    slots, gts = zip(*groups.assignment())
    assert slots[0].tolist() == [0, 1, 2, 6, 7, 8] and gts[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert slots[1].numel() == 0 and gts[1].numel() == 0


def _corner_noise(groups, targets, scale):
    """Per slot of image 0, corner displacement / (half size x scale): (D, 4)."""
    gt = targets[0]["boxes"][groups.gt_index[0]]
    half = torch.cat([gt[:, 2:], gt[:, 2:]], -1) / 2
    moved = box_cxcywh_to_xyxy(groups.boxes[0]) - box_cxcywh_to_xyxy(gt)
    return moved / (half * scale)


def test_box_noise_bounds_positive_and_negative():
    """Positives: |noise| < lambda (in half sizes); negatives: lambda <= |noise| < 2 lambda; both ranges covered."""
    targets = three_and_zero_boxes()
    scale = 0.4
    config = DenoisingConfig(num_classes=5, dn_number=300, label_noise_ratio=0.0, box_noise_scale=scale)
    generator = torch.Generator().manual_seed(0)
    pos, neg = [], []
    for _ in range(20):
        groups = make_denoising_groups(targets, config, generator)
        noise = _corner_noise(groups, targets, scale).abs()
        pos.append(noise[groups.positive])
        neg.append(noise[~groups.positive])
    pos, neg = torch.cat(pos), torch.cat(neg)
    tol = 1e-4
    assert pos.max() < 1 + tol and neg.min() > 1 - tol and neg.max() < 2 + tol
    assert pos.min() < 0.05 and pos.max() > 0.95 and neg.min() < 1.05 and neg.max() > 1.95
    # labels untouched without label noise
    assert groups.labels[0].tolist() == [2, 0, 4] * (groups.size // 3)


def test_label_noise_rate_over_many_draws():
    """DINO resamples a label with probability ratio / 2, uniformly over the K classes."""
    targets = three_and_zero_boxes()
    num_classes, ratio = 10, 0.5
    config = DenoisingConfig(num_classes=num_classes, dn_number=300, label_noise_ratio=ratio, box_noise_scale=0.4)
    generator = torch.Generator().manual_seed(1)
    original = torch.tensor([2, 0, 4])
    changed, total, seen = 0, 0, torch.zeros(num_classes, dtype=torch.long)
    for _ in range(60):
        groups = make_denoising_groups(targets, config, generator)
        labels = groups.labels[0]
        expected = original[groups.gt_index[0]]
        changed += int((labels != expected).sum())
        total += labels.numel()
        seen += torch.bincount(labels[labels != expected], minlength=num_classes)
        assert (groups.labels[1] == 0).all()  # padding keeps a fixed label
    rate = changed / total   # ~36000 draws: standard error ~0.002
    assert abs(rate - ratio / 2 * (num_classes - 1) / num_classes) < 0.015
    assert (seen > 0).all()  # every class is drawn as a replacement


# ----------------------------------------------------------------------------- attention mask

def brute_force_mask(num_one2one, num_one2many, num_groups, group_size):
    """Loop over every (query, key) pair and apply the rules by role."""
    num_queries = num_one2one + num_one2many
    total = num_queries + num_groups * group_size

    def role(i):
        if i < num_one2one:
            return ("o2o", None)
        if i < num_queries:
            return ("o2m", None)
        return ("dn", (i - num_queries) // group_size)

    mask = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            (ri, gi), (rj, gj) = role(i), role(j)
            if ri in ("o2o", "o2m"):
                blocked = rj == "dn" or (rj != ri)          # hybrid groups apart, never a denoising key
            else:
                blocked = rj == "o2m" or (rj == "dn" and gi != gj)
            mask[i, j] = blocked
    return mask


@pytest.mark.parametrize("num_one2many", [0, 4])
def test_attn_mask_matches_brute_force(num_one2many):
    num_one2one, groups, size = 3, 3, 4
    # the detector's own hybrid mask, which reads only num_queries_one2one
    hybrid = DeformableDETR._hybrid_attn_mask(SimpleNamespace(num_queries_one2one=num_one2one),
                                              num_one2one + num_one2many, "cpu")
    assert (hybrid is None) == (num_one2many == 0)
    mask = denoising_attn_mask(hybrid, num_one2one + num_one2many, num_one2one, groups, size)
    assert torch.equal(mask, brute_force_mask(num_one2one, num_one2many, groups, size))


def test_attn_mask_without_boxes_is_the_matching_mask():
    hybrid = torch.rand(5, 5) > 0.5
    assert torch.equal(denoising_attn_mask(hybrid, 5, 3, 1, 0), hybrid)


# ----------------------------------------------------------------------------- losses

def _dn_outputs_equal_to_targets(groups, targets, num_classes, aux_layers=1):
    """Logits +-1e4 (ground-truth class on positives, nothing elsewhere), positives' boxes = ground truth."""
    bs, size = groups.labels.shape
    logits = torch.full((bs, size, num_classes), -1e4)
    boxes = torch.rand(bs, size, 4) * 0.5 + 0.25
    for b, (slots, gts) in enumerate(groups.assignment()):
        logits[b, slots, targets[b]["labels"][gts]] = 1e4
        boxes[b, slots] = targets[b]["boxes"][gts]
    layer = {"pred_logits": logits, "pred_boxes": boxes}
    return {**layer, "aux_outputs": [dict(layer) for _ in range(aux_layers)], "groups": groups}


def _criterion(num_classes=5):
    _, criterion, _ = build_model(tiny_args("--use_dn", num_classes=num_classes))
    return criterion


def _main_outputs(bs, num_classes=5, queries=4):
    layer = {"pred_logits": torch.randn(bs, queries, num_classes), "pred_boxes": torch.rand(bs, queries, 4) * 0.5 + 0.2}
    return {**layer, "aux_outputs": [dict(layer)]}


def test_denoising_loss_is_zero_when_predictions_equal_targets():
    targets = three_and_zero_boxes()
    config = DenoisingConfig(num_classes=5, dn_number=6, label_noise_ratio=0.5, box_noise_scale=0.4)
    groups = make_denoising_groups(targets, config, torch.Generator().manual_seed(0))
    criterion = _criterion()
    losses = criterion({**_main_outputs(2), "dn_outputs": _dn_outputs_equal_to_targets(groups, targets, 5)},
                       targets)
    dn = {k: float(v) for k, v in losses.items() if "_dn" in k}
    assert sorted(dn) == sorted(f"{k}_dn{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0"))
    assert all(v == 0.0 for v in dn.values()), dn


def test_denoising_loss_known_assignment_and_negatives():
    """A shifted positive costs its L1 / (num_boxes x groups); a negative predicting its class costs focal loss."""
    targets = three_and_zero_boxes()
    config = DenoisingConfig(num_classes=5, dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.4)
    groups = make_denoising_groups(targets, config, torch.Generator().manual_seed(0))
    criterion = _criterion()
    dn = _dn_outputs_equal_to_targets(groups, targets, 5, aux_layers=0)
    dn["pred_boxes"][0, 7, 0] += 0.06                   # group 1, positive of box 1: cx off by 0.06
    dn["pred_logits"][0, 3, targets[0]["labels"][0]] = 1e4   # group 0, negative of box 0, predicts its class
    losses = criterion({**_main_outputs(2), "dn_outputs": dn}, targets)
    assert float(losses["loss_bbox_dn"]) == pytest.approx(0.06 / (3 * 2), rel=1e-4)
    assert float(losses["loss_giou_dn"]) > 0
    # focal loss of a confident false positive: (1 - alpha) * 1e4 (BCE) * 1 ((p_t)^gamma), / (3 boxes x 2 groups)
    assert float(losses["loss_ce_dn"]) == pytest.approx(0.75 * 1e4 / 6, rel=1e-4)


def test_denoising_loss_weights_reuse_main_unless_given():
    args = tiny_args("--use_dn", "--cls_loss_coef", "1.5")
    weights = build_weight_dict(args)
    assert weights["loss_ce_dn"] == weights["loss_ce_dn_0"] == 1.5 and weights["loss_bbox_dn"] == 5.0
    weights = build_weight_dict(tiny_args("--use_dn", "--dn_bbox_loss_coef", "3", "--dn_giou_loss_coef", "1"))
    assert weights["loss_bbox_dn_0"] == 3.0 and weights["loss_giou_dn"] == 1.0 and weights["loss_ce_dn"] == 2.0
    assert not any("_dn" in k for k in build_weight_dict(tiny_args()))


def test_flags_are_validated():
    with pytest.raises(ValueError, match="--dn_number"):
        tiny_args("--dn_number", "50")
    with pytest.raises(ValueError, match="--dn_cls_loss_coef"):
        tiny_args("--dn_cls_loss_coef", "1")
    with pytest.raises(ValueError, match="--dn_label_noise_ratio"):
        tiny_args("--use_dn", "--dn_label_noise_ratio", "1.5")
    with pytest.raises(ValueError, match="--dn_box_noise_scale"):
        tiny_args("--use_dn", "--dn_box_noise_scale", "-0.1")


# ----------------------------------------------------------------------------- model

GUIDED = {
    "v3.0.2": ["--variant", "v3.0.2", "--stages", "1:1,1:1"],
    "v3.0.3_hybrid": ["--variant", "v3.0.3", "--stages", "1:1,1:1", "--ref_queries", "all",
                      "--num_queries_one2many", "6", "--with_box_refine"],
    "v3.0.1_two_stage_mixed": ["--variant", "v3.0.1", "--stages", "0:1,1:0,1:1", "--two_stage", "--mixed_selection",
                               "--with_box_refine", "--look_forward_twice", "--use_ms_detr"],
}


def _run_capturing_encoder_refs(model, images, targets):
    """Forward in training mode; returns (outputs, references given to every encoder layer's self-attention)."""
    refs = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda _m, args: refs.append(args[1].clone()))
             for layer in model.transformer.encoder.layers]
    try:
        torch.manual_seed(0)
        outputs = model(images, targets)
    finally:
        for h in hooks:
            h.remove()
    return outputs, refs


def _moved_targets():
    """simple_targets with every box moved and a label changed: same counts, other ground truth."""
    moved = simple_targets()
    moved[0] = {"labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.6, 0.3, 0.3, 0.2], [0.2, 0.7, 0.2, 0.4]])}
    moved[1] = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.45, 0.2, 0.3]])}
    return moved


@pytest.mark.parametrize("name", sorted(GUIDED))
def test_ground_truth_never_reaches_the_encoder(name):
    """Other ground truth changes the denoising outputs, but no encoder reference and no matching output."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("--use_dn", *GUIDED[name]))
    model.train()
    images = two_padded_images()
    out_a, refs_a = _run_capturing_encoder_refs(model, images, simple_targets())
    out_b, refs_b = _run_capturing_encoder_refs(model, images, _moved_targets())
    assert len(refs_a) == len(model.transformer.encoder.layers) == len(refs_b)
    # the guidance is really on: the last encoder layer's references are not the stock ones
    generator, model.transformer.enc_reference_generator = model.transformer.enc_reference_generator, None
    _, refs_stock = _run_capturing_encoder_refs(model, images, simple_targets())
    model.transformer.enc_reference_generator = generator
    assert refs_a[-1].shape != refs_stock[-1].shape or not torch.equal(refs_a[-1], refs_stock[-1])
    for a, b in zip(refs_a, refs_b):
        assert torch.equal(a, b)
    assert not torch.equal(out_a["dn_outputs"]["pred_boxes"], out_b["dn_outputs"]["pred_boxes"])
    assert not torch.equal(out_a["dn_outputs"]["aux_outputs"][0]["pred_logits"],
                           out_b["dn_outputs"]["aux_outputs"][0]["pred_logits"])
    for key in out_a:
        if key == "dn_outputs":
            continue
        flat_a = torch.nn.utils.parameters_to_vector(_tensors(out_a[key]))
        flat_b = torch.nn.utils.parameters_to_vector(_tensors(out_b[key]))
        assert torch.equal(flat_a, flat_b), key


def _tensors(value):
    """All tensors of a nested output value, flattened."""
    if torch.is_tensor(value):
        return [value.reshape(-1)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [t for v in value for t in _tensors(v)]


def test_guidance_candidates_exclude_denoising_queries():
    """The reference generator is handed exactly the matching queries' candidates and sampling."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("--use_dn", *GUIDED["v3.0.2"]))
    model.train()
    seen = []
    generator = model.transformer.enc_reference_generator
    original_new_state = generator.new_state

    def recording_new_state(*args, **kwargs):
        state = original_new_state(*args, **kwargs)
        original_observe = state.observe

        def observe(locations, weights, candidates):
            seen.append((locations.shape[1], weights.shape[1], candidates.count))
            return original_observe(locations, weights, candidates)

        state.observe = observe
        return state

    generator.new_state = recording_new_state
    out = model(two_padded_images(), simple_targets())
    queries = model.num_queries_one2one
    assert out["dn_outputs"]["pred_logits"].shape[1] > 0
    assert seen == [(queries, queries, queries)] * len(model.transformer.decoder.layers)


@pytest.mark.parametrize("extra", [[], ["--two_stage", "--mixed_selection", "--with_box_refine", "--use_ms_detr"]])
def test_inference_unchanged_and_state_dict_gains_only_label_enc(extra):
    torch.manual_seed(0)
    with_dn, _, _ = build_model(tiny_args("--use_dn", *extra))
    without, _, _ = build_model(tiny_args(*extra))
    added = set(with_dn.state_dict()) - set(without.state_dict())
    assert added == {"label_enc.weight"} and not set(without.state_dict()) - set(with_dn.state_dict())
    assert tuple(with_dn.state_dict()["label_enc.weight"].shape) == (5 + 1, 64)
    result = without.load_state_dict(with_dn.state_dict(), strict=False)
    assert result.unexpected_keys == ["label_enc.weight"] and not result.missing_keys
    with_dn.eval()
    without.eval()
    with torch.no_grad():
        a = with_dn(two_padded_images(), simple_targets())   # targets are ignored at inference
        b = without(two_padded_images())
    assert "dn_outputs" not in a
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


# ----------------------------------------------------------------------------- configs and main.py

def test_dino_configs_parse_and_compose_with_variants():
    dino = parse_args(["--config", "configs/dino_r50.yaml"])
    assert dino.use_dn and dino.two_stage and dino.mixed_selection and dino.look_forward_twice
    assert dino.with_box_refine and dino.num_queries_one2one == 900 and dino.topk_eval == 300
    assert dino.num_feature_levels == 4 and dino.epochs == 12 and dino.lr == 1e-4
    for variant in ("baseline", "cascade", "v3.0.1", "v3.0.2", "v3.0.3", "v3.0.4"):
        args = parse_args(["--config", "configs/minitrain_r18_dino.yaml", "--variant", variant])
        assert args.use_dn and args.two_stage and args.mixed_selection and args.variant == variant
        assert args.backbone == "resnet18" and args.train_ann == "instances_minitrain2017.json"
    assert parse_args(["--config", "configs/minitrain_r18_dino.yaml", "--variant", "v3.0.4"]).ref_keep_self


E2E = {
    "baseline": ["--variant", "baseline", "--stages", "2:2"],
    "cascade": ["--variant", "cascade", "--stages", "1:1,1:1"],
    "v3.0.1": ["--variant", "v3.0.1", "--stages", "1:1,1:1", "--use_ms_detr"],
    "v3.0.2": ["--variant", "v3.0.2", "--stages", "1:1,1:1", "--two_stage", "--mixed_selection",
               "--look_forward_twice"],
    "v3.0.3": ["--variant", "v3.0.3", "--stages", "1:1,1:1", "--num_queries_one2many", "12", "--k_one2many", "2"],
    "v3.0.4": ["--variant", "v3.0.4", "--stages", "1:1,1:1", "--use_ms_detr"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("denoising_data")


@pytest.mark.parametrize("name", sorted(E2E))
def test_use_dn_trains_and_evaluates_in_every_variant(name, data_dir, tmp_path):
    out = tmp_path / name
    args = parse_args(one_epoch_smoke_flags(data_dir, out, num_train=4, num_val=2) + ["--use_dn"] + E2E[name])
    torch.manual_seed(0)
    stats = main_module.main(args)
    assert 0.0 <= stats["AP50"] <= 1.0
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    for key in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0", "loss_bbox_dn_0", "loss_giou_dn_0"):
        assert all(key in r and r[key] == r[key] for r in train), key
    assert any(r["loss_bbox_dn_unscaled"] > 0 for r in train)
    epoch = [r for r in records if r["type"] == "epoch"]
    assert len(epoch) == 1 and "test_AP" in epoch[0]


def test_assignment_agrees_with_the_slot_layout():
    """The layout-built assignment equals the valid positive slots read off the tensors."""
    targets = three_and_zero_boxes()[::-1] + [simple_targets()[0]]
    groups = make_denoising_groups(targets, DenoisingConfig(num_classes=5, dn_number=10),
                                   torch.Generator().manual_seed(0))
    for b, (slots, gts) in enumerate(groups.assignment()):
        expected = torch.nonzero(groups.valid[b] & groups.positive).flatten()
        assert torch.equal(slots, expected) and torch.equal(gts, groups.gt_index[b, expected])
