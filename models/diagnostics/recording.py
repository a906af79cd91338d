"""Capture what the encoder's deformable self-attention and the guidance did in one forward pass.

``record_encoder(model, on_layer)`` attaches forward hooks to every encoder layer's
self-attention and sets the guidance generator's ``picks_listener``; both are removed when the
block ends, so a model outside the block carries no hook and does no extra work.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, List, NamedTuple, Optional

import torch

from ..enc_reference import GuidancePicks
from ..level_layout import LevelLayout


class EncoderLayerRecord(NamedTuple):
    """One encoder layer's self-attention call."""
    index: int                        # encoder layer
    reference_points: torch.Tensor    # as the layer received them: (bs, T, L, 2), (bs, T, L, P, 2), ...
    sampling_locations: torch.Tensor  # (bs, T, H, L, P, 2) normalised to the padded levels
    attention_weights: torch.Tensor   # (bs, T, H, L, P)
    layout: LevelLayout               # the token axis, with padding mask and valid ratios
    picks: Optional[GuidancePicks]    # the guidance update that made reference_points; None: stock


def _argument(args: tuple, kwargs: dict, position: int, name: str):
    """A forward argument passed positionally or by keyword."""
    return kwargs[name] if name in kwargs else args[position]


@contextmanager
def record_encoder(model, on_layer: Callable[[EncoderLayerRecord], None]) -> Iterator[List[GuidancePicks]]:
    """Within the block, every encoder layer of ``model`` (a DeformableDETR) calls ``on_layer`` right
    after its self-attention; yields the list that collects the guidance updates in order."""
    transformer = model.transformer
    generator = transformer.enc_reference_generator
    updates: List[GuidancePicks] = []

    def picks_for(references: torch.Tensor) -> Optional[GuidancePicks]:
        # the encoder layers of one stage share the update's reference tensor itself
        for picks in reversed(updates):
            if picks.references is references:
                return picks
        return None

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            # MSDeformAttn.forward(query, reference_points, input_flatten, layout) -> MSDeformAttnOutput
            references = _argument(args, kwargs, 1, "reference_points")
            on_layer(EncoderLayerRecord(index, references, output.sampling_locations, output.attention_weights,
                                        _argument(args, kwargs, 3, "layout"), picks_for(references)))
        return hook

    handles = [layer.self_attn.register_forward_hook(make_hook(index), with_kwargs=True)
               for index, layer in enumerate(transformer.encoder.layers)]
    if generator is not None:
        generator.picks_listener = updates.append
    try:
        yield updates
    finally:
        for handle in handles:
            handle.remove()
        if generator is not None:
            generator.picks_listener = None
