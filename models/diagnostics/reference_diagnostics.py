"""Reference diagnostics (docs/design.md §9): how the encoder's references and sampling relate to the objects.

    diag = ReferenceDiagnostics(model)   # the eager DeformableDETR (unwrapped)
    diag.start()                         # each evaluation
    for samples, targets in probe_batches:
        diag.update(samples, targets)    # one no_grad forward in eval mode, hooks attached only here
    metrics = diag.finish()              # {"D4/fg_in_img": ..., "D4/fg_in_img/enc0/lvl1": ..., ...}

Keys are '<family>[/<scope>...]': a family alone is the overall mean, scopes narrow it to an
encoder layer (encN), a level (lvlN: the token's level for D5 entropy/N_eff and D6, the sampled
level for D4 and D5 distance), a decoder layer (decN: references made after it) or a reference
slot (slotN); D6/coverage also has lvlN alone (over the guided layers). Means pool the items of
every probe image (tokens, references, weight): every ratio is a ratio of sums over the probe
set, so no single image dominates. A metric with no item (no GT boxes, no guidance, first
evaluation for the across-evaluation ones) is absent, never NaN.

Read each number against chance and against initialisation (``describe()`` says what is fixed
by construction: under the offset and weight initialisation of MSDeformAttn the attention
weights are uniform, so D5/entropy = 1, D5/n_eff = L * P, D5/slot_share = 1 / P, and
D5/distance = (P + 1) / 2 times the mean initial direction length, 3.018 cells at H = 8, P = 4).
Runs log one pass before the first training step (epoch -1) for exactly that comparison.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from util.box_ops import box_cxcywh_to_xyxy
from util.modes import modes_kept
from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

from ..deformable_transformer import encoder_reference_points
from ..enc_reference import GuidancePicks
from ..guidance import guidance_inputs
from ..level_layout import LevelLayout, valid_size
from ..matcher import HungarianMatcher
from ..recording import EncoderLayerRecord, record_forward
from ..stages import guided_encoder_layers
from . import metrics
from .geometry import covered_area_fraction, inside_any_box, match_to_ground_truth, smallest_containing_box
from .tally import Tally, scoped_keys

DESCRIPTIONS = {
    "D1/dup_iou07": "per guided token, fraction of pairs of its map-derived references whose candidate boxes "
                    "have IoU > 0.7 (duplicates; self point excluded)",
    "D1/dup_iou05": "as D1/dup_iou07 with IoU > 0.5",
    "D1/distinct_ratio": "per guided token, unique matched GT ids / map-derived references matched to a GT "
                         "(1 = every matched reference is a different object)",
    "D2/in_box": "fraction of map-derived reference centres made after decoder layer l that lie in a GT box",
    "D2/same_obj": "for tokens inside a GT box, fraction of their map-derived reference centres inside that "
                   "(smallest containing) box",
    "D2/mean_iou": "mean best-GT IoU of the candidate boxes behind the map-derived references",
    "D3/jaccard": "within one forward, Jaccard overlap of a token's candidate-query sets between consecutive "
                  "guidance updates (decN: the update after decoder layer N vs the one before)",
    "D3/chamfer": "within one forward, symmetric Chamfer distance (mean of the two directed means) between a "
                  "token's reference centre sets of consecutive updates, over the image diagonal",
    "D3/token_instability": "across evaluations, fraction of guided tokens whose multiset of matched GT ids "
                            "(of their map-derived references) changed since the previous evaluation",
    "D3/matching_instability": "across evaluations, guided learned-query configurations: of the one-to-one queries matched in "
                               "either evaluation (Hungarian, scipy, the criterion's default costs), the "
                               "fraction whose matched GT changed (DN-DETR)",
    "D4/off_image": "share of the attention weight whose sampling location lies outside the image's valid "
                    "region (all tokens; never foreground; fixed by geometry at init, large on coarse levels)",
    "D4/fg_in_img": "tokens inside a GT box: of their in-image attention weight, the share at locations inside "
                    "any GT box (1.0 when one box covers the whole image)",
    "D4/fg_out_img": "as D4/fg_in_img for tokens outside every GT box",
    "D4/fg_in_chance": "D4/fg_in_img over the GT-covered area fraction, pooled: sum of in-box weight / sum of "
                       "(covered fraction x in-image weight) over images (1 = chance, i.e. in-image weight "
                       "spread uniformly over the image)",
    "D4/fg_out_chance": "as D4/fg_in_chance for tokens outside every GT box",
    "D4/own_in_img": "tokens inside a GT box: of their in-image attention weight, the share inside that "
                     "(smallest containing) box",
    "D5/entropy": "per token and head, entropy of the attention weights over levels x points / log(L*P) "
                  "(1 = uniform weights, which is also its value at init)",
    "D5/n_eff": "per token and head, effective number of samples exp(entropy in nats), between 1 and L*P "
                "(L*P under uniform weights and at init; not exp of D5/entropy)",
    "D5/distance": "mean distance of sampling locations from their reference, in pixels (strides) of the level; "
                   "at init (P+1)/2 x the mean offset-direction length: 2.5(1+sqrt2)/2 = 3.018 at H=8, P=4",
    "D5/slot_share": "per-point references: mean attention weight share of each reference slot "
                     "(1/P under uniform weights and at init)",
    "D5/self_share": "v3.0.4 (ref_keep_self): weight share of slot 0, the token's own location "
                     "(1/P = 0.25 at P=4 under uniform weights and at init)",
    "D6/coverage": "fraction of tokens with at least one reference from the map (not the own-location fallback); "
                   "lvlN alone: over the guided layers, per token level",
    "D6/slot_coverage": "fraction of map-derived reference slots filled from the map",
}


@dataclass
class _ProbeImage:
    """One probe image's ground truth, in coordinates of its valid region, and its token geometry."""
    image_id: Optional[int]
    boxes: torch.Tensor                    # (G, 4) cxcywh
    boxes_xyxy: torch.Tensor               # (G, 4)
    labels: Optional[torch.Tensor]         # (G,)
    size: torch.Tensor                     # (2,) valid (W, H) in input pixels
    valid: Optional[torch.Tensor] = None   # (T,) bool, True on image tokens (set from the layout)
    levels: Optional[torch.Tensor] = None  # (T',) level of each image token
    token_box: Optional[torch.Tensor] = None  # (T',) smallest GT box containing the token, -1: none
    cover: Optional[torch.Tensor] = None   # () GT-covered fraction of the image
    candidate_matches: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def has_boxes(self) -> bool:
        return self.boxes.shape[0] > 0


def _per_group(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """values (N, ...) and groups (N,) -> per group sums (num_groups,) and item counts (num_groups,)."""
    per_row = values.float().reshape(values.shape[0], -1)
    sums = per_row.new_zeros(num_groups).index_add_(0, groups, per_row.sum(1))
    counts = per_row.new_zeros(num_groups).index_add_(0, groups, per_row.new_full(groups.shape, per_row.shape[1]))
    return sums, counts


class ReferenceDiagnostics:
    """D1-D6 of docs/design.md §9 on a fixed probe set (see the module doc for the protocol and the keys).

    model: the eager DeformableDETR. matcher: the one-to-one matcher of D3's matching instability
    (default: HungarianMatcher with the flags' default costs; pass the criterion's to use its costs).
    seed: the run's --seed; a guidance that draws random numbers gets (seed, probe batch index).
    A guidance that reads the ground truth (the oracle source) gets the probe images' targets.
    """

    def __init__(self, model, matcher: Optional[HungarianMatcher] = None, match_threshold: float = 0.5,
                 seed: int = 0):
        self.model = model
        transformer = model.transformer
        self.generator = transformer.enc_reference_generator
        self.guided = self.generator is not None and bool(guided_encoder_layers(transformer.stages))
        # D3 describes guidance like D1, D2 and D6: a stock configuration reports D4-D5 only, the
        # comparison every variant is read against (issue 18); two-stage queries are not learned
        self.learned_queries = self.guided and not model.two_stage
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.match_threshold = match_threshold
        self.seed = seed
        self._batches = 0  # probe batches of this pass (the random ranking's seed)
        self._previous: Dict[int, dict] = {}  # image_id -> what the previous evaluation saw
        self._current: Dict[int, dict] = {}
        self._tally = Tally()

    @staticmethod
    def describe() -> Dict[str, str]:
        """One line per metric family: what it measures."""
        return dict(DESCRIPTIONS)

    def start(self) -> None:
        """Begin an evaluation pass; the last pass's memory stays for the across-evaluation metrics."""
        if self._current:
            self._previous = self._current
        self._current = {}
        self._tally = Tally()
        self._batches = 0

    def finish(self) -> Dict[str, float]:
        """The pass's metrics: flat {key: float}; metrics without any item are absent."""
        return self._tally.means()

    def measure(self, batches: Iterable[Tuple[NestedTensor, List[Dict]]], stop=None) -> Optional[Dict[str, float]]:
        """One whole pass (``start``, ``update`` per batch, ``finish``) over the probe ``batches``
        ((NestedTensor (B, 3, H, W), targets), on any device); returns the metrics, or None when a
        stop signal arrived during it (``stop``: a ``util.interrupt.StopSignals``): the pass then
        ends after that batch, unfinished. Nothing collective runs inside, so one process can
        measure alone; random generators are not drawn from here (the caller's data may be)."""
        self.start()
        for samples, targets in batches:
            self.update(samples, targets)
            if stop is not None and stop.requested:
                return None
        return self.finish()

    # ------------------------------------------------------------------ one probe batch

    @torch.no_grad()
    def update(self, samples: Union[NestedTensor, List[torch.Tensor]], targets: Optional[List[Dict]]) -> None:
        """One forward on a probe batch (eval mode, no_grad), folded into the pass's sums.

        samples: NestedTensor or list of (3, H, W); targets: per image 'boxes' (G, 4) cxcywh normalised
        to the image, optionally 'labels' (G,) and 'image_id' (the across-evaluation memory's key).
        The model's training flags are restored; nothing else of it changes and no RNG is drawn.
        """
        device = next(self.model.parameters()).device
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        samples = samples.to(device)
        images = self._probe_images(samples, targets, device)
        guidance = guidance_inputs(self.generator, targets, (self.seed, self._batches))
        self._batches += 1
        with modes_kept(self.model):
            self.model.eval()
            with record_forward(self.model, lambda layer: self._encoder_layer(layer, images)) as record:
                outputs = self.model(samples, guidance=guidance)
        for picks in record.picks:
            self._reliability(picks, images)
        for before, after in zip(record.picks, record.picks[1:]):
            self._update_stability(before, after, images)
        if self.learned_queries:
            self._matching_instability(outputs, images)

    def _probe_images(self, samples: NestedTensor, targets: Optional[List[Dict]], device) -> List[_ProbeImage]:
        """Ground truth per image of the batch (no targets: images without boxes)."""
        bs = samples.tensors.shape[0]
        if samples.mask is not None:
            sizes = valid_size(samples.mask)
        else:
            sizes = torch.tensor(samples.tensors.shape[-1:-3:-1], dtype=torch.float32, device=device).expand(bs, 2)
        targets = targets if targets is not None else [{} for _ in range(bs)]
        if len(targets) != bs:
            raise ValueError(f"ReferenceDiagnostics.update: {len(targets)} targets for {bs} images")
        images = []
        for target, size in zip(targets, sizes):
            boxes = torch.as_tensor(target.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).to(device)
            boxes = boxes.reshape(-1, 4)
            labels = target.get("labels")
            image_id = target.get("image_id")
            images.append(_ProbeImage(None if image_id is None else int(image_id), boxes, box_cxcywh_to_xyxy(boxes),
                                      None if labels is None else labels.to(device), size))
        return images

    def _token_geometry(self, image: _ProbeImage, b: int, layout: LevelLayout) -> None:
        """Set the image's token masks, levels and containing boxes (once per forward)."""
        if image.valid is not None:
            return
        num_tokens = layout.num_tokens
        device = layout.spatial_shapes.device
        image.valid = (~layout.padding_mask[b] if layout.padding_mask is not None
                       else torch.ones(num_tokens, dtype=torch.bool, device=device))
        sizes = torch.tensor([h * w for h, w in layout.shapes], device=device)
        image.levels = torch.repeat_interleave(torch.arange(len(layout.shapes), device=device), sizes)[image.valid]
        # a token's own location, from the level-0 column of the stock references, in valid-region units
        own = encoder_reference_points(layout)[b, :, 0] / layout.valid_ratios[b, 0]
        image.token_box = smallest_containing_box(own[image.valid], image.boxes_xyxy)
        image.cover = covered_area_fraction(image.boxes_xyxy)

    # ------------------------------------------------------------------ per encoder layer: D1, D3 (tokens), D4-D6

    def _encoder_layer(self, record: EncoderLayerRecord, images: List[_ProbeImage]) -> None:
        layout = record.layout
        for b, image in enumerate(images):
            self._token_geometry(image, b, layout)
            valid = image.valid
            locations = record.sampling_locations[b][valid]      # (T', H, L, P, 2)
            weights = record.attention_weights[b][valid].float()  # (T', H, L, P)
            references = self._sample_references(record.reference_points[b], layout)[valid]
            per_point = record.reference_points.dim() == 5  # (bs, T, L, P, 2): one reference per point slot
            self._concentration(record.index, locations, weights, references, per_point, image, layout)
            # image-region coordinates: the operator's locations are fractions of the padded level
            region = locations.float() / layout.valid_ratios[b].float()[None, None, :, None, :]
            self._add_per_level("D4/off_image", record.index, *metrics.off_image_sampling(region, weights))
            if image.has_boxes:
                self._foreground(record.index, region, weights, image)
            if record.picks is not None:
                self._guided_tokens(record.index, record.picks, b, image, len(layout.shapes))

    @staticmethod
    def _sample_references(references: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        """One image's encoder references (T, L, 2|4), (T, L, P, 2) or (T, H, L, P, 2) -> broadcastable to
        the sampling locations (T, H, L, P, 2), padded-level coordinates."""
        if references.dim() == 3:
            return references[:, None, :, None, :2]
        if references.dim() == 4:
            return references[:, None]
        return references

    def _add_per_level(self, name: str, layer: int, totals: torch.Tensor, counts: torch.Tensor,
                       level_alone: bool = False) -> None:
        """Per-level sums (L,) and item counts (L,) of one layer -> keys name[/encN[/lvlL]], and name/lvlL
        (over the layers) when ``level_alone`` (one host read)."""
        for lvl, (total, count) in enumerate(zip(totals.tolist(), counts.tolist())):
            keys = scoped_keys(name, f"enc{layer}", f"lvl{lvl}") + ([f"{name}/lvl{lvl}"] if level_alone else [])
            self._tally.add(keys, total, count)

    def _concentration(self, layer: int, locations, weights, references, per_point: bool, image: _ProbeImage,
                       layout: LevelLayout) -> None:
        """D5 of one encoder layer on one image (tokens already restricted to the image): locations
        (T', H, L, P, 2), weights (T', H, L, P), references broadcastable to the locations."""
        num_levels = len(layout.shapes)
        entropy, n_eff = metrics.weight_entropy(weights)  # (T', H), grouped by the token's level
        self._add_per_level("D5/entropy", layer, *_per_group(entropy, image.levels, num_levels))
        self._add_per_level("D5/n_eff", layer, *_per_group(n_eff, image.levels, num_levels))
        level_sizes = layout.spatial_shapes.flip(-1)  # (L, 2) as (W, H)
        distance = metrics.sampling_distance(locations, references, level_sizes)  # (T', H, L, P), sampled level
        per_level = distance.transpose(0, 2).reshape(num_levels, -1)
        self._add_per_level("D5/distance", layer, per_level.sum(1), torch.full((num_levels,), per_level.shape[1]))
        if per_point:
            shares = metrics.slot_share(weights).sum(0).tolist()  # (P,) summed over tokens
            count = weights.shape[0]
            for slot, share in enumerate(shares):
                self._tally.add([f"D5/slot_share/enc{layer}/slot{slot}", f"D5/slot_share/slot{slot}"], share, count)
            if self.generator is not None and self.generator.ref_keep_self:
                self._tally.add(scoped_keys("D5/self_share", f"enc{layer}"), shares[0], count)

    def _foreground(self, layer: int, locations, weights, image: _ProbeImage) -> None:
        """D4 of one encoder layer on one image with GT boxes; locations in image-region coordinates.

        Shares are of the in-image weight. The chance ratio adds this image's in-box weight over the
        in-box weight chance would give it (its in-image weight spread uniformly over the image, so
        covered fraction x in-image weight): the tally's total / count is then a ratio of sums over
        images, the pooled share over the pooled covered fraction.
        """
        sums = metrics.foreground_sampling(locations, weights, image.token_box, image.boxes_xyxy)
        self._add_per_level("D4/fg_in_img", layer, sums.fg_in, sums.img_in)
        self._add_per_level("D4/fg_out_img", layer, sums.fg_out, sums.img_out)
        self._add_per_level("D4/own_in_img", layer, sums.own_in, sums.img_in)
        cover = image.cover.to(sums.img_in)
        self._add_per_level("D4/fg_in_chance", layer, sums.fg_in, cover * sums.img_in)
        self._add_per_level("D4/fg_out_chance", layer, sums.fg_out, cover * sums.img_out)

    # ------------------------------------------------------------------ guided tokens: D1, D3 across, D6

    def _slots(self, picks: GuidancePicks, b: int, image: _ProbeImage):
        """One image's picks restricted to its tokens: candidate index (T', S), valid (T', S), the candidates'
        matched GT (C,) and best IoU (C,) (cached per update)."""
        chosen = picks.chosen[b][image.valid]
        valid = picks.valid[b][image.valid]
        key = id(picks)
        if key not in image.candidate_matches:
            image.candidate_matches[key] = match_to_ground_truth(picks.candidates.boxes[b].detach(), image.boxes,
                                                                 self.match_threshold)
        return chosen, valid, image.candidate_matches[key]

    def _guided_tokens(self, layer: int, picks: GuidancePicks, b: int, image: _ProbeImage, num_levels: int) -> None:
        """D1, D6 and the across-evaluation token instability of one guided encoder layer on one image."""
        chosen, valid, (candidate_gt, _) = self._slots(picks, b, image)
        guided = valid.any(1)
        self._add_per_level("D6/coverage", layer, *_per_group(guided, image.levels, num_levels), level_alone=True)
        self._tally.add_values(scoped_keys("D6/slot_coverage", f"enc{layer}"), valid.reshape(-1))
        boxes = picks.candidates.boxes[b].detach()[chosen]  # (T', S, 4)
        for name, threshold in (("D1/dup_iou07", 0.7), ("D1/dup_iou05", 0.5)):
            fraction, defined = metrics.duplicate_fraction(boxes, valid, threshold)
            self._tally.add_values(scoped_keys(name, f"enc{layer}"), fraction, defined & guided)
        if not image.has_boxes:
            return
        slot_gt = candidate_gt[chosen]
        ratio, defined = metrics.distinct_object_ratio(slot_gt, valid)
        self._tally.add_values(scoped_keys("D1/distinct_ratio", f"enc{layer}"), ratio, defined)
        self._token_instability(layer, metrics.multiset_signature(slot_gt, valid), guided, image)

    def _token_instability(self, layer: int, signature, guided, image: _ProbeImage) -> None:
        """Remember this evaluation's multisets; compare with the previous evaluation's (same image and layer)."""
        if image.image_id is None:
            return
        memory_key = f"tokens/enc{layer}"
        # kept in host memory: it lives across the training epochs between two evaluations
        signature, guided = signature.cpu(), guided.cpu()
        self._current.setdefault(image.image_id, {})[memory_key] = (signature, guided)
        previous = self._previous.get(image.image_id, {}).get(memory_key)
        if previous is None or previous[0].shape != signature.shape:
            return
        before, guided_before = previous
        changed = ~guided_before | (before != signature).any(1)
        self._tally.add_values(scoped_keys("D3/token_instability", f"enc{layer}"), changed, guided)

    # ------------------------------------------------------------------ per guidance update: D2, D3 within

    def _reliability(self, picks: GuidancePicks, images: List[_ProbeImage]) -> None:
        """D2 of the references one guidance update made."""
        scope = f"dec{picks.decoder_layers - 1}"
        for b, image in enumerate(images):
            if not image.has_boxes or image.valid is None:
                continue
            chosen, valid, (_, best_iou) = self._slots(picks, b, image)
            centres = picks.candidates.boxes[b].detach()[..., :2][chosen].float()  # (T', S, 2)
            in_box = inside_any_box(centres, image.boxes_xyxy)
            self._tally.add_values(scoped_keys("D2/in_box", scope), in_box.reshape(-1), valid.reshape(-1))
            self._tally.add_values(scoped_keys("D2/mean_iou", scope), best_iou[chosen].reshape(-1),
                                   valid.reshape(-1))
            inside = image.token_box >= 0
            fraction, defined = metrics.same_object_fraction(centres[inside], valid[inside],
                                                             image.boxes_xyxy[image.token_box[inside]])
            self._tally.add_values(scoped_keys("D2/same_obj", scope), fraction, defined)

    def _update_stability(self, before: GuidancePicks, after: GuidancePicks, images: List[_ProbeImage]) -> None:
        """D3 within one forward: consecutive guidance updates compared token by token."""
        scope = f"dec{after.decoder_layers - 1}"
        for b, image in enumerate(images):
            if image.valid is None:
                continue
            ids_a, valid_a, _ = self._slots(before, b, image)
            ids_b, valid_b, _ = self._slots(after, b, image)
            jaccard, defined = metrics.set_jaccard(ids_a, valid_a, ids_b, valid_b)
            self._tally.add_values(scoped_keys("D3/jaccard", scope), jaccard, defined)
            # centres in input pixels, so the distance over the pixel diagonal is the image's own scale
            size = image.size.float()
            centres_a = before.candidates.boxes[b].detach()[..., :2].float()[ids_a] * size
            centres_b = after.candidates.boxes[b].detach()[..., :2].float()[ids_b] * size
            distance, defined = metrics.symmetric_chamfer(centres_a, valid_a, centres_b, valid_b)
            self._tally.add_values(scoped_keys("D3/chamfer", scope), distance / size.norm(), defined)

    # ------------------------------------------------------------------ D3 across: matching instability

    def _matching_instability(self, outputs: Dict, images: List[_ProbeImage]) -> None:
        """Hungarian assignment of the final one-to-one predictions, compared with the previous evaluation."""
        usable = [b for b, image in enumerate(images)
                  if image.image_id is not None and image.has_boxes and image.labels is not None]
        if not usable:
            return
        num_queries = outputs["pred_logits"].shape[1]
        indices = self.matcher({"pred_logits": outputs["pred_logits"][usable],
                                "pred_boxes": outputs["pred_boxes"][usable]},
                               [{"labels": images[b].labels, "boxes": images[b].boxes} for b in usable])
        for b, (query_index, gt_index) in zip(usable, indices):
            assignment = torch.full((num_queries,), -1, dtype=torch.int64)
            assignment[query_index] = gt_index
            image = images[b]
            self._current.setdefault(image.image_id, {})["matching"] = assignment
            before = self._previous.get(image.image_id, {}).get("matching")
            if before is None or before.shape != assignment.shape:
                continue
            either = (before >= 0) | (assignment >= 0)
            self._tally.add_values(["D3/matching_instability"], before != assignment, either)
