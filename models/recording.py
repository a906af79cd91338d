"""What one forward pass of a DeformableDETR did inside its transformer, recorded with forward hooks.

    with record_forward(model) as record:   # the hooks exist only inside the block
        outputs = model(samples)
    record.encoder   # per encoder layer: the references it received, its self-attention's sampling
    record.decoder   # per decoder layer: its cross-attention's sampling
    record.picks     # every guidance update (which candidate filled which reference slot), in order

The model is not changed: forward hooks on every encoder layer's self-attention and every decoder
layer's cross-attention, and the guidance generator's ``picks_listener``, are set when the block
starts and removed when it ends, so a model outside the block carries no hook and recording costs
nothing when off. The reference diagnostics (``models.diagnostics``), the validation pictures of
training and ``scripts/visualize_refs.py`` read forward passes through here only;
``models.record_views`` turns a record into what the pictures show.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from .enc_reference import GuidancePicks
from .level_layout import LevelLayout


def forward_argument(module, args: tuple, kwargs: dict, position: int, name: str):
    """The argument ``name`` a hook saw ``module``'s forward receive, passed at ``position`` or by keyword.

    Raises TypeError naming the module and the argument when it was passed neither way: the forward's
    signature changed under the recorder, which then says so instead of recording None.
    """
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise TypeError(f"recording {type(module).__name__}.forward: argument '{name}' (position {position}) was not "
                    "passed; the recorder (models/recording.py) reads the forward's signature")


class EncoderLayerRecord(NamedTuple):
    """One encoder layer's self-attention call (tensors detached, as computed)."""
    index: int                        # encoder layer
    reference_points: torch.Tensor    # as the layer received them: (bs, T, L, 2), (bs, T, L, P, 2), ...
    sampling_locations: torch.Tensor  # (bs, T, H, L, P, 2) normalised to the padded levels
    attention_weights: torch.Tensor   # (bs, T, H, L, P)
    layout: LevelLayout               # the token axis, with padding mask and valid ratios
    picks: Optional[GuidancePicks]    # the guidance update that made reference_points; None: stock


class DecoderLayerRecord(NamedTuple):
    """One decoder layer's cross-attention call (tensors detached, as computed)."""
    index: int                        # decoder layer
    reference_points: torch.Tensor    # (bs, Q, L, 2|4)
    sampling_locations: torch.Tensor  # (bs, Q, H, L, P, 2) normalised to the padded levels
    attention_weights: torch.Tensor   # (bs, Q, H, L, P)
    layout: LevelLayout               # the token axis the queries sample


@dataclass
class ForwardRecord:
    """What the hooks saw during one forward pass, in call order."""
    encoder: List[EncoderLayerRecord] = field(default_factory=list)
    decoder: List[DecoderLayerRecord] = field(default_factory=list)
    picks: List[GuidancePicks] = field(default_factory=list)

    @property
    def encoder_references(self) -> List[torch.Tensor]:
        """The references every encoder layer received, in layer order."""
        return [layer.reference_points for layer in self.encoder]

    @property
    def layout(self) -> LevelLayout:
        """The token axis of the pass (one layout per forward)."""
        return (self.decoder or self.encoder)[-1].layout


@contextmanager
def record_forward(model, on_encoder_layer: Optional[Callable[[EncoderLayerRecord], None]] = None
                   ) -> Iterator[ForwardRecord]:
    """Within the block, every forward of ``model`` (a DeformableDETR) is recorded into the yielded
    ``ForwardRecord``. ``on_encoder_layer``: called with each encoder layer's record right after its
    self-attention, and that record is then not kept (a caller that reduces the sampling at once
    never holds more than one layer's)."""
    transformer = model.transformer
    generator = transformer.enc_reference_generator
    record = ForwardRecord()

    def picks_for(references: torch.Tensor) -> Optional[GuidancePicks]:
        # the encoder layers of one stage share the update's reference tensor itself
        for picks in reversed(record.picks):
            if picks.references is references:
                return picks
        return None

    def encoder_hook(index: int):
        def hook(module, args, kwargs, output):
            # MSDeformAttn.forward(query, reference_points, input_flatten, layout) -> MSDeformAttnOutput
            references = forward_argument(module, args, kwargs, 1, "reference_points")
            layer = EncoderLayerRecord(index, references.detach(), output.sampling_locations.detach(),
                                       output.attention_weights.detach(),
                                       forward_argument(module, args, kwargs, 3, "layout"), picks_for(references))
            if on_encoder_layer is None:
                record.encoder.append(layer)
            else:
                on_encoder_layer(layer)
        return hook

    def decoder_hook(index: int):
        def hook(module, args, kwargs, output):
            record.decoder.append(DecoderLayerRecord(
                index, forward_argument(module, args, kwargs, 1, "reference_points").detach(),
                output.sampling_locations.detach(), output.attention_weights.detach(),
                forward_argument(module, args, kwargs, 3, "layout")))
        return hook

    handles = [layer.self_attn.register_forward_hook(encoder_hook(index), with_kwargs=True)
               for index, layer in enumerate(transformer.encoder.layers)]
    handles += [layer.cross_attn.register_forward_hook(decoder_hook(index), with_kwargs=True)
                for index, layer in enumerate(transformer.decoder.layers)]
    if generator is not None:
        generator.picks_listener = record.picks.append
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        if generator is not None:
            generator.picks_listener = None


def run_recorded(model, samples, guidance=None) -> Tuple[Dict, ForwardRecord]:
    """One no-grad forward of ``model`` on ``samples`` (NestedTensor or list of (3, H, W)), recorded;
    ``guidance``: the forward's ``GuidanceInputs`` (``models.guidance``), when the model's guidance
    reads the ground truth or a seed. Returns (outputs, record)."""
    with torch.no_grad(), record_forward(model) as record:
        outputs = model(samples, guidance=guidance)
    return outputs, record
