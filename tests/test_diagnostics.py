"""ReferenceDiagnostics on tiny real models: which metrics exist, that recording changes nothing, and
the numbers against float64 per-token loops over independently captured attention and picks."""
import math

import numpy as np
import pytest
import torch

from models import build_model
from models.diagnostics import ReferenceDiagnostics
from tests.helpers import simple_targets, tiny_args, two_padded_images

CONFIGS = {
    "baseline": ["--variant", "baseline", "--with_box_refine"],
    "v3.0.4": ["--variant", "v3.0.4", "--enc_layers", "3", "--dec_layers", "3", "--with_box_refine",
               "--num_queries_one2many", "12"],
    "v3.0.1": ["--variant", "v3.0.1", "--enc_layers", "3", "--dec_layers", "3", "--with_box_refine"],
}
FOREGROUND_FAMILIES = {"D4/off_image", "D4/fg_in_img", "D4/fg_out_img", "D4/fg_in_chance", "D4/fg_out_chance",
                       "D4/own_in_img"}
GUIDED_FIRST_PASS = {"D1/dup_iou07", "D1/dup_iou05", "D1/distinct_ratio", "D2/in_box", "D2/same_obj",
                     "D2/mean_iou", "D3/jaccard", "D3/chamfer", "D5/entropy", "D5/n_eff", "D5/distance",
                     "D6/coverage", "D6/slot_coverage"} | FOREGROUND_FAMILIES
SAMPLING_FAMILIES = {"D5/entropy", "D5/n_eff", "D5/distance"} | FOREGROUND_FAMILIES
ACROSS_EVALUATIONS = {"D3/token_instability", "D3/matching_instability"}


def make_model(name):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(*CONFIGS[name]))
    return model


def probe_targets(boxes_of_image0=None):
    targets = simple_targets()
    for image_id, target in enumerate(targets):
        target["image_id"] = torch.tensor(image_id)
    if boxes_of_image0 is not None:
        targets[0]["boxes"] = boxes_of_image0
        targets[0]["labels"] = torch.arange(len(boxes_of_image0))
    return targets


def targets_from_candidates(model):
    """Probe targets whose boxes are candidates the guidance picks, so references do match GT boxes.

    Image 0 gets the two candidates that the most tokens picked in the first guidance update, image 1
    the most picked one besides its own box; without guidance, the synthetic boxes.
    """
    targets = probe_targets()
    generator = model.transformer.enc_reference_generator
    if generator is None:
        return targets
    picks = []
    generator.picks_listener = picks.append
    try:
        with torch.no_grad():
            model.eval()(two_padded_images())
    finally:
        generator.picks_listener = None
    first = picks[0]
    for b, count in ((0, 2), (1, 1)):
        chosen = first.chosen[b][first.valid[b]]
        popular = torch.bincount(chosen, minlength=first.candidates.count).argsort(descending=True)[:count]
        boxes = first.candidates.boxes[b, popular].detach().clone()
        if b == 1:
            boxes = torch.cat([targets[1]["boxes"], boxes])
        targets[b]["boxes"], targets[b]["labels"] = boxes, torch.arange(len(boxes))
    return targets


def one_pass(diag, targets, images=None):
    diag.start()
    diag.update(two_padded_images() if images is None else images, targets)
    return diag.finish()


def families(metrics):
    return {"/".join(key.split("/")[:2]) for key in metrics}


def assert_plain_finite(metrics):
    assert metrics and all(type(v) is float and math.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- which metrics exist


@pytest.mark.parametrize("name", ["v3.0.4", "v3.0.1"])
def test_guided_presets_give_d1_to_d6_and_an_unchanged_model_is_stable(name):
    model = make_model(name)
    targets = targets_from_candidates(model)
    diag = ReferenceDiagnostics(model)
    assert diag.guided
    first = one_pass(diag, targets)
    second = one_pass(diag, targets)
    assert_plain_finite(first)
    expected = GUIDED_FIRST_PASS | ({"D5/slot_share", "D5/self_share"} if name == "v3.0.4" else set())
    assert families(first) == expected
    assert families(second) == expected | ACROSS_EVALUATIONS
    assert second["D3/token_instability"] == 0.0 and second["D3/matching_instability"] == 0.0
    assert {k: v for k, v in second.items() if k.split("/")[0] != "D3" or "instability" not in k} == first
    # per-layer keys exist for the guided layers only (the first encoder layer runs before any decoder layer)
    assert "D1/dup_iou07/enc1" in first and "D1/dup_iou07/enc2" in first and "D1/dup_iou07/enc0" not in first
    assert {"D2/in_box/dec0", "D2/in_box/dec1", "D3/jaccard/dec1", "D6/coverage/enc2/lvl3"} <= set(first)
    assert set(ReferenceDiagnostics.describe()) >= families(second)


def test_stock_gives_only_sampling_metrics():
    diag = ReferenceDiagnostics(make_model("baseline"))
    assert not diag.guided
    first = one_pass(diag, probe_targets())
    second = one_pass(diag, probe_targets())
    assert_plain_finite(first)
    assert families(first) == SAMPLING_FAMILIES
    # no D3 either (the matching instability is reported where guidance runs): D4-D5 are the stock comparison
    assert families(second) == SAMPLING_FAMILIES
    assert {f"D4/fg_in_img/enc{e}/lvl{l}" for e in range(2) for l in range(4)} <= set(first)


def test_images_without_boxes_leave_box_metrics_absent():
    diag = ReferenceDiagnostics(make_model("v3.0.4"))
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(i)}
             for i in range(2)]
    for targets in (empty, empty, None):
        metrics = one_pass(diag, targets)
        assert_plain_finite(metrics)
        # the off-image share is geometry: it needs no GT box
        assert families(metrics) == {"D1/dup_iou07", "D1/dup_iou05", "D3/jaccard", "D3/chamfer", "D4/off_image",
                                     "D5/entropy", "D5/n_eff", "D5/distance", "D5/slot_share", "D5/self_share",
                                     "D6/coverage", "D6/slot_coverage"}


# ----------------------------------------------------------------------------- against chance and initialisation


def whole_image_targets():
    return [{"boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]), "labels": torch.tensor([0]),
             "image_id": torch.tensor(i)} for i in range(2)]


@pytest.mark.parametrize("name", ["baseline", "v3.0.4"])
def test_one_box_covering_the_whole_image_gives_foreground_share_one(name):
    """Every in-image sampling location is on the box: the in-image foreground share, the own-object
    share and the chance ratio are exactly 1, although much of the weight lands off the image (padded
    images, untrained offsets reaching past the border); every token is inside the box."""
    model = make_model(name)
    layers = len(model.transformer.encoder.layers)
    metrics = one_pass(ReferenceDiagnostics(model), whole_image_targets())
    for family in ("D4/fg_in_img", "D4/own_in_img", "D4/fg_in_chance"):
        values = {k: v for k, v in metrics.items() if k == family or k.startswith(family + "/")}
        assert len(values) == 1 + layers * 5 and set(values.values()) == {1.0}, family  # overall, per layer, per level
    assert not any(k.startswith(("D4/fg_out_img", "D4/fg_out_chance")) for k in metrics)
    assert 0.2 < metrics["D4/off_image"] < 0.8
    assert metrics["D4/off_image/enc0/lvl3"] > metrics["D4/off_image/enc0/lvl0"]  # coarse levels reach further


def initial_distance(heads: int, points: int) -> float:
    """(P + 1) / 2 times the mean length of the heads' initial offset directions (float64, from the
    definition: direction 2 pi h / H scaled so that its larger coordinate is 1)."""
    lengths = []
    for h in range(heads):
        x, y = math.cos(2 * math.pi * h / heads), math.sin(2 * math.pi * h / heads)
        lengths.append(math.hypot(x, y) / max(abs(x), abs(y)))
    return (points + 1) / 2 * sum(lengths) / heads


def test_initial_offset_distance_is_3_018_cells_at_eight_heads_and_four_points():
    assert initial_distance(8, 4) == pytest.approx(2.5 * (1 + math.sqrt(2)) / 2, abs=1e-12)
    assert round(initial_distance(8, 4), 3) == 3.018
    assert initial_distance(4, 4) == pytest.approx(2.5)  # axis-aligned heads only


@pytest.mark.parametrize("name,heads", [("baseline", 8), ("v3.0.4", 8), ("v3.0.1", 4)])
def test_a_freshly_initialised_model_gives_the_values_fixed_by_construction(name, heads):
    """At initialisation the offsets are the bias alone and the weights are uniform: D5/distance is
    (P + 1) / 2 x the mean direction length in every encoder layer and level (3.018 at H = 8, P = 4),
    D5/entropy 1, D5/n_eff L * P, each slot share 1 / P (v3.0.4: self share 0.25)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(*CONFIGS[name], "--nheads", str(heads)))
    metrics = one_pass(ReferenceDiagnostics(model), probe_targets())
    levels, points = 4, 4
    distance = {k: v for k, v in metrics.items() if k.startswith("D5/distance")}
    assert len(distance) == 1 + len(model.transformer.encoder.layers) * 5
    for key, value in distance.items():
        assert value == pytest.approx(initial_distance(heads, points), rel=1e-6), key
    if heads == 8:
        assert metrics["D5/distance"] == pytest.approx(3.0178, abs=1e-4)
    for key, value in metrics.items():
        if key.startswith("D5/entropy"):
            assert value == pytest.approx(1.0, abs=1e-6), key
        if key.startswith("D5/n_eff"):
            assert value == pytest.approx(levels * points, rel=1e-6), key
        if key.startswith(("D5/slot_share", "D5/self_share")):
            assert value == pytest.approx(1 / points, abs=1e-7), key
    assert ("D5/self_share" in metrics) == (name == "v3.0.4")


def test_finish_without_update_is_empty():
    diag = ReferenceDiagnostics(make_model("baseline"))
    diag.start()
    assert diag.finish() == {}


# ----------------------------------------------------------------------------- recording changes nothing


def test_update_changes_no_state_rng_or_mode_and_leaves_no_hooks():
    model = make_model("v3.0.4")
    model.train()
    model.backbone.eval()  # a mixed-mode model keeps each module's own flag
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    diag = ReferenceDiagnostics(model)
    diag.start()
    diag.update(two_padded_images(), probe_targets())
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert {k: v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")} == \
            {k: v for k, v in attributes[name].items() if k not in ("_parameters", "_buffers", "_modules")}, name
    assert model.transformer.enc_reference_generator.picks_listener is None


def test_the_forward_inside_update_is_the_eval_forward():
    model = make_model("v3.0.4")
    model.train()
    seen = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(
        (module.training, {k: v.clone() for k, v in output.items() if torch.is_tensor(v)})))
    ReferenceDiagnostics(model).update(two_padded_images(), probe_targets())
    handle.remove()
    model.eval()
    with torch.no_grad():
        expected = model(two_padded_images())
    assert len(seen) == 1 and seen[0][0] is False
    assert torch.equal(seen[0][1]["pred_boxes"], expected["pred_boxes"])


# ----------------------------------------------------------------------------- across evaluations


def test_swapped_ground_truth_order_changes_every_matched_query_of_that_image():
    diag = ReferenceDiagnostics(make_model("v3.0.4"))
    one_pass(diag, probe_targets())
    swapped = probe_targets()
    swapped[0]["boxes"], swapped[0]["labels"] = swapped[0]["boxes"].flip(0), swapped[0]["labels"].flip(0)
    # image 0: its 2 matched queries now hold each other's GT index; image 1 (one box) unchanged -> 2 / 3
    assert one_pass(diag, swapped)["D3/matching_instability"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- numbers vs float64 loops


class Capture:
    """Independent hooks: each encoder self-attention's inputs and outputs, and the guidance picks."""

    def __init__(self, model):
        self.layers, self.picks = [], []
        self.generator = model.transformer.enc_reference_generator
        self.handles = [layer.self_attn.register_forward_hook(self._hook)
                        for layer in model.transformer.encoder.layers]
        if self.generator is not None:
            self.generator.picks_listener = self.picks.append

    def _hook(self, module, args, output):
        _, references, _, layout = args
        self.layers.append(dict(references=references.double(), locations=output.sampling_locations.double(),
                                weights=output.attention_weights.double(), layout=layout))

    def close(self):
        for handle in self.handles:
            handle.remove()
        if self.generator is not None:
            self.generator.picks_listener = None


def capture_forward(model, targets):
    """An eval forward seen by the independent capture, then a diagnostics pass on the same batch
    (the eval forward is deterministic, so both see the same attention and picks)."""
    capture = Capture(model)
    try:
        with torch.no_grad():
            model.eval()(two_padded_images())
    finally:
        capture.close()
    diag = ReferenceDiagnostics(model)
    diag.start()
    diag.update(two_padded_images(), targets)
    return diag.finish(), capture


def token_geometry(layout, b):
    """Per image token: (level, x, y in valid-region units) for the unpadded tokens, with their flat index."""
    tokens, start = [], 0
    for lvl, (h, w) in enumerate(layout.shapes):
        ratio_x, ratio_y = layout.valid_ratios[b, lvl].tolist()
        for row in range(h):
            for col in range(w):
                t = start + row * w + col
                if not bool(layout.padding_mask[b, t]):
                    tokens.append((t, lvl, (col + 0.5) / (ratio_x * w), (row + 0.5) / (ratio_y * h)))
        start += h * w
    return tokens


def xyxy_list(boxes_cxcywh):
    return [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for cx, cy, w, h in boxes_cxcywh.tolist()]


def contains(box, x, y):
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def smallest_box(boxes, x, y):
    inside = [(abs((b[2] - b[0]) * (b[3] - b[1])), i) for i, b in enumerate(boxes) if contains(b, x, y)]
    return min(inside)[1] if inside else -1


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("name", ["baseline", "v3.0.4"])
def test_foreground_sampling_and_concentration_match_float64_loops(name):
    model = make_model(name)
    targets = probe_targets()
    # edges off the half-pixel grid of the untrained sampling, where float32 and float64 could disagree
    targets[0]["boxes"] = torch.tensor([[0.303, 0.411, 0.217, 0.313], [0.707, 0.613, 0.291, 0.207]])
    targets[1]["boxes"] = torch.tensor([[0.497, 0.509, 0.409, 0.493]])
    metrics, capture = capture_forward(model, targets)
    gts = [xyxy_list(t["boxes"]) for t in targets]
    # the boxes are disjoint and inside the image, so each image's covered fraction is the sum of the areas
    covers = np.array([sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) for boxes in gts])
    observed = expected = 0.0  # in-box weight of inside tokens, and chance's, over every layer and level
    for e, layer in enumerate(capture.layers):
        layout = layer["layout"]
        levels = len(layout.shapes)
        fg_in, img_in, fg_out, img_out, own, off, total = (np.zeros((2, levels)) for _ in range(7))
        entropy, n_eff, distance = (np.zeros((levels, 2)) for _ in range(3))  # (sum, count) per level
        for b in range(2):
            ratios = layout.valid_ratios[b].double().numpy()
            for t, token_level, x, y in token_geometry(layout, b):
                loc = layer["locations"][b, t].numpy()  # (H, L, P, 2)
                weights = layer["weights"][b, t].numpy()  # (H, L, P)
                own_box = smallest_box(gts[b], x, y)
                for lvl in range(levels):
                    for h in range(loc.shape[0]):
                        for p in range(loc.shape[2]):
                            sx, sy = loc[h, lvl, p] / ratios[lvl]
                            on_image = 0 <= sx <= 1 and 0 <= sy <= 1
                            fg = on_image and any(contains(box, sx, sy) for box in gts[b])
                            a = weights[h, lvl, p]
                            total[b, lvl] += a
                            off[b, lvl] += a * (not on_image)
                            if own_box >= 0:
                                fg_in[b, lvl] += a * fg
                                img_in[b, lvl] += a * on_image
                                own[b, lvl] += a * (on_image and contains(gts[b][own_box], sx, sy))
                            else:
                                fg_out[b, lvl] += a * fg
                                img_out[b, lvl] += a * on_image
                for h in range(weights.shape[0]):
                    flat = weights[h].reshape(-1)
                    ent = -sum(v * math.log(v) for v in flat if v > 0)
                    entropy[token_level] += (ent / math.log(flat.size), 1)
                    n_eff[token_level] += (math.exp(ent), 1)
                refs = np.broadcast_to(capture_references(layer["references"][b, t]), loc.shape)
                for lvl, (hh, ww) in enumerate(layout.shapes):
                    offset = (loc[:, lvl] - refs[:, lvl]) * np.array([ww, hh])
                    distance[lvl] += (np.sqrt((offset ** 2).sum(-1)).sum(), offset.shape[0] * offset.shape[1])
        for lvl in range(levels):
            scope = f"enc{e}/lvl{lvl}"
            assert metrics[f"D4/off_image/{scope}"] == pytest.approx(off[:, lvl].sum() / total[:, lvl].sum(), abs=1e-5)
            assert metrics[f"D4/fg_in_img/{scope}"] == pytest.approx(fg_in[:, lvl].sum() / img_in[:, lvl].sum(),
                                                                     abs=1e-5)
            assert metrics[f"D4/fg_out_img/{scope}"] == pytest.approx(fg_out[:, lvl].sum() / img_out[:, lvl].sum(),
                                                                      abs=1e-5)
            assert metrics[f"D4/own_in_img/{scope}"] == pytest.approx(own[:, lvl].sum() / img_in[:, lvl].sum(),
                                                                      abs=1e-5)
            # pooled over images: observed in-box weight over what chance puts there (cover x in-image weight)
            chance = fg_in[:, lvl].sum() / (covers * img_in[:, lvl]).sum()
            assert metrics[f"D4/fg_in_chance/{scope}"] == pytest.approx(chance, rel=1e-4)
            assert metrics[f"D5/entropy/{scope}"] == pytest.approx(entropy[lvl, 0] / entropy[lvl, 1], abs=1e-5)
            assert metrics[f"D5/n_eff/{scope}"] == pytest.approx(n_eff[lvl, 0] / n_eff[lvl, 1], rel=1e-5)
            assert metrics[f"D5/distance/{scope}"] == pytest.approx(distance[lvl, 0] / distance[lvl, 1], rel=1e-4)
        chance = fg_out.sum() / (covers * img_out.sum(1)).sum()
        assert metrics[f"D4/fg_out_chance/enc{e}"] == pytest.approx(chance, rel=1e-4)
        assert 0.05 < off.sum() / total.sum() < 0.95  # the case has weight both on and off the image
        observed += fg_in.sum()
        expected += (covers * img_in.sum(1)).sum()
    assert metrics["D4/fg_in_chance"] == pytest.approx(observed / expected, rel=1e-4)


def capture_references(references):
    """One token's references (L, 2), (L, P, 2) or (H, L, P, 2) -> broadcastable to (H, L, P, 2)."""
    references = references.numpy()
    if references.ndim == 2:
        return references[None, :, None, :]
    if references.ndim == 3:
        return references[None]
    return references


@pytest.mark.parametrize("name", ["v3.0.4", "v3.0.1"])
def test_guided_token_metrics_match_float64_loops(name):
    model = make_model(name)
    targets = targets_from_candidates(model)
    metrics, capture = capture_forward(model, targets)
    gts = [xyxy_list(t["boxes"]) for t in targets]
    assert len(capture.picks) == 2  # cascade with 3 encoder layers: encoder layers 1 and 2 are guided
    per_update = []
    coverage_per_level = np.zeros((4, 2))  # (covered tokens, tokens) per token level, over the guided layers
    for k, picks in enumerate(capture.picks):
        sums = {key: [0.0, 0] for key in ("dup07", "distinct", "coverage", "in_box", "iou", "same")}
        slots = {}
        for b in range(2):
            boxes = xyxy_list(picks.candidates.boxes[b].double())
            for t, token_level, x, y in token_geometry(capture.layers[k + 1]["layout"], b):
                chosen = [int(c) for c, v in zip(picks.chosen[b, t], picks.valid[b, t]) if v]
                slots[(b, t)] = chosen
                sums["coverage"][0] += bool(chosen)
                sums["coverage"][1] += 1
                coverage_per_level[token_level] += (bool(chosen), 1)
                pairs = [(i, j) for i in range(len(chosen)) for j in range(i + 1, len(chosen))]
                if pairs:
                    dup = sum(iou(boxes[chosen[i]], boxes[chosen[j]]) > 0.7 for i, j in pairs)
                    sums["dup07"][0] += dup / len(pairs)
                    sums["dup07"][1] += 1
                best = [max((iou(boxes[c], g), -i) for i, g in enumerate(gts[b])) for c in chosen]
                matched = [-i for value, i in best if value >= 0.5]
                if matched:
                    sums["distinct"][0] += len(set(matched)) / len(matched)
                    sums["distinct"][1] += 1
                centres = [((boxes[c][0] + boxes[c][2]) / 2, (boxes[c][1] + boxes[c][3]) / 2) for c in chosen]
                for (cx, cy), (value, _) in zip(centres, best):
                    sums["in_box"][0] += any(contains(g, cx, cy) for g in gts[b])
                    sums["in_box"][1] += 1
                    sums["iou"][0] += value
                    sums["iou"][1] += 1
                own_box = smallest_box(gts[b], x, y)
                if own_box >= 0 and chosen:
                    sums["same"][0] += sum(contains(gts[b][own_box], cx, cy) for cx, cy in centres) / len(chosen)
                    sums["same"][1] += 1
        per_update.append(slots)
        mean = {key: total / count for key, (total, count) in sums.items() if count}
        enc, dec = f"enc{k + 1}", f"dec{picks.decoder_layers - 1}"
        assert metrics[f"D6/coverage/{enc}"] == pytest.approx(mean["coverage"], abs=1e-6)
        assert metrics[f"D1/dup_iou07/{enc}"] == pytest.approx(mean["dup07"], abs=1e-5)
        if k == 0:  # the targets are candidates of this update, so its references match GT boxes
            assert "distinct" in mean
        if "distinct" in mean:
            assert metrics[f"D1/distinct_ratio/{enc}"] == pytest.approx(mean["distinct"], abs=1e-5)
        else:
            assert f"D1/distinct_ratio/{enc}" not in metrics
        assert metrics[f"D2/in_box/{dec}"] == pytest.approx(mean["in_box"], abs=1e-5)
        assert metrics[f"D2/mean_iou/{dec}"] == pytest.approx(mean["iou"], abs=1e-5)
        assert metrics[f"D2/same_obj/{dec}"] == pytest.approx(mean["same"], abs=1e-5)
    for lvl, (covered, tokens) in enumerate(coverage_per_level):
        assert metrics[f"D6/coverage/lvl{lvl}"] == pytest.approx(covered / tokens, abs=1e-6)
    jaccard = [len(set(a) & set(per_update[1][key])) / len(set(a) | set(per_update[1][key]))
               for key, a in per_update[0].items() if set(a) | set(per_update[1][key])]
    later = f"dec{capture.picks[1].decoder_layers - 1}"
    assert metrics[f"D3/jaccard/{later}"] == pytest.approx(np.mean(jaccard), abs=1e-5)
    # Chamfer between the two updates' centre sets, in input pixels over the image diagonal
    sizes = [(128.0, 96.0), (80.0, 112.0)]  # (W, H) of two_padded_images
    chamfer = []
    for (b, t), first in per_update[0].items():
        second = per_update[1][(b, t)]
        if first and second:
            def centre(picks, c):
                cx, cy = picks.candidates.boxes[b, c, :2].double().tolist()
                return cx * sizes[b][0], cy * sizes[b][1]
            set_a = [centre(capture.picks[0], c) for c in first]
            set_b = [centre(capture.picks[1], c) for c in second]
            a_to_b = np.mean([min(math.dist(p, q) for q in set_b) for p in set_a])
            b_to_a = np.mean([min(math.dist(p, q) for q in set_a) for p in set_b])
            chamfer.append((a_to_b + b_to_a) / 2 / math.hypot(*sizes[b]))
    assert metrics[f"D3/chamfer/{later}"] == pytest.approx(np.mean(chamfer), abs=1e-6)
    if name != "v3.0.4":
        assert not any(key.startswith("D5/slot_share") for key in metrics)  # per-level references have no slots
        return
    # v3.0.4 slot shares: slot 0 is the token itself
    self_shares = []
    for e in (1, 2):
        layer = capture.layers[e]
        shares = []
        for b in range(2):
            for t, _, _, _ in token_geometry(layer["layout"], b):
                shares.append(layer["weights"][b, t].sum(1).mean(0).numpy())  # (P,)
        shares = np.stack(shares)
        for slot in range(shares.shape[1]):
            assert metrics[f"D5/slot_share/enc{e}/slot{slot}"] == pytest.approx(shares[:, slot].mean(), abs=1e-6)
        self_shares.append(shares[:, 0])
    assert metrics["D5/self_share"] == pytest.approx(np.concatenate(self_shares).mean(), abs=1e-6)
    assert "D5/slot_share/enc0/slot0" not in metrics  # the first layer's references are the stock ones


def test_two_stage_has_no_matching_instability():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(*CONFIGS["v3.0.4"], "--two_stage", "--mixed_selection"))
    targets = targets_from_candidates(model)
    diag = ReferenceDiagnostics(model)
    one_pass(diag, targets)
    second = one_pass(diag, targets)
    assert "D3/token_instability" in second and second["D3/token_instability"] == 0.0
    assert "D3/matching_instability" not in second  # proposals, not learned queries: no query identity


def test_token_instability_after_swapping_two_ground_truth_boxes_matches_loops():
    model = make_model("v3.0.4")
    targets = targets_from_candidates(model)
    _, capture = capture_forward(model, targets)
    diag = ReferenceDiagnostics(model)
    one_pass(diag, targets)
    swapped = [dict(t) for t in targets]
    swapped[0]["boxes"], swapped[0]["labels"] = targets[0]["boxes"].flip(0), targets[0]["labels"].flip(0)
    metrics = one_pass(diag, swapped)
    gts = xyxy_list(targets[0]["boxes"])
    for k, picks in enumerate(capture.picks):
        changed = guided = 0
        boxes = xyxy_list(picks.candidates.boxes[0].double())
        for b in range(2):
            for t, _, _, _ in token_geometry(capture.layers[k + 1]["layout"], b):
                chosen = [int(c) for c, v in zip(picks.chosen[b, t], picks.valid[b, t]) if v]
                guided += bool(chosen)
                if b == 0 and chosen:
                    # swapping GT 0 and 1 changes the multiset exactly when they are held unequally often
                    best = [max((iou(boxes[c], g), -i) for i, g in enumerate(gts)) for c in chosen]
                    ids = [-i for value, i in best if value >= 0.5]
                    changed += ids.count(0) != ids.count(1)
        assert metrics[f"D3/token_instability/enc{k + 1}"] == pytest.approx(changed / guided, abs=1e-6)
        if k == 0:
            assert changed > 0
