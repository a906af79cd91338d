"""The recorder of a forward pass (models/recording.py): what it records against the test's own hooks,
that it leaves nothing behind, and its one forward-argument rule."""
import pytest
import torch

from models import build_model
from models.recording import forward_argument, record_forward, run_recorded
from tests.helpers import tiny_args, two_padded_images

GUIDED = ["--variant", "v3.0.4", "--enc_layers", "3", "--dec_layers", "3", "--with_box_refine"]


def guided_model():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(*GUIDED))
    return model.eval()


class _OwnHooks:
    """The test's own view of the same calls: (args, output) of every encoder self-attention and decoder
    cross-attention, and the guidance updates."""

    def __init__(self, model):
        self.encoder, self.decoder, self.picks = [], [], []
        transformer = model.transformer
        self.handles = [layer.self_attn.register_forward_hook(lambda m, a, o: self.encoder.append((a, o)))
                        for layer in transformer.encoder.layers]
        self.handles += [layer.cross_attn.register_forward_hook(lambda m, a, o: self.decoder.append((a, o)))
                         for layer in transformer.decoder.layers]
        self.generator = transformer.enc_reference_generator
        self.generator.picks_listener = self.picks.append

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.generator.picks_listener = None


def test_the_record_holds_what_each_attention_call_received_and_returned():
    model = guided_model()
    own = _OwnHooks(model)
    try:
        with torch.no_grad():
            expected = model(two_padded_images())
    finally:
        own.close()
    outputs, record = run_recorded(model, two_padded_images())
    assert torch.equal(outputs["pred_boxes"], expected["pred_boxes"])  # recording changes nothing
    assert [layer.index for layer in record.encoder] == [0, 1, 2] and [d.index for d in record.decoder] == [0, 1, 2]
    for layer, (args, output) in zip(record.encoder, own.encoder):
        assert torch.equal(layer.reference_points, args[1])
        assert torch.equal(layer.sampling_locations, output.sampling_locations)
        assert torch.equal(layer.attention_weights, output.attention_weights)
        assert torch.equal(layer.layout.padding_mask, args[3].padding_mask)
    for layer, (args, output) in zip(record.decoder, own.decoder):
        assert torch.equal(layer.reference_points, args[1])
        assert torch.equal(layer.sampling_locations, output.sampling_locations)
        assert torch.equal(layer.attention_weights, output.attention_weights)
    # the guidance updates, and which encoder layers received each one's references
    assert len(record.picks) == len(own.picks) > 0
    assert all(torch.equal(a.chosen, b.chosen) for a, b in zip(record.picks, own.picks))
    for layer in record.encoder:
        if layer.picks is None:
            assert layer.reference_points.dim() == 4  # the stock references (bs, T, L, 2)
        else:
            assert torch.equal(layer.picks.references, layer.reference_points)
    assert record.encoder[0].picks is None and record.encoder[-1].picks is record.picks[-1]
    assert record.encoder_references[-1] is record.encoder[-1].reference_points
    assert record.layout.shapes == record.decoder[-1].layout.shapes


def test_a_layer_callback_gets_each_encoder_record_instead_of_the_list():
    model = guided_model()
    _, kept = run_recorded(model, two_padded_images())
    handed = []
    with torch.no_grad(), record_forward(model, on_encoder_layer=handed.append) as record:
        model(two_padded_images())
    assert record.encoder == [] and len(record.decoder) == 3
    assert [r.index for r in handed] == [0, 1, 2]
    assert all(torch.equal(a.sampling_locations, b.sampling_locations) for a, b in zip(handed, kept.encoder))


def test_nothing_is_left_on_the_model_after_the_block_even_on_an_error():
    model = guided_model()
    with pytest.raises(RuntimeError, match="inside the block"):
        with record_forward(model):
            raise RuntimeError("inside the block")
    with record_forward(model):
        assert model.transformer.enc_reference_generator.picks_listener is not None
        assert any(m._forward_hooks for m in model.modules())
    assert model.transformer.enc_reference_generator.picks_listener is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Attention(torch.nn.Module):
    pass


def test_forward_argument_positional_keyword_or_a_clear_error():
    module = _Attention()
    assert forward_argument(module, ("q", "refs"), {}, 1, "reference_points") == "refs"
    assert forward_argument(module, ("q",), {"reference_points": "refs"}, 1, "reference_points") == "refs"
    with pytest.raises(TypeError, match=r"recording _Attention.forward: argument 'layout' \(position 3\) was not "
                                        "passed"):
        forward_argument(module, ("q", "refs"), {}, 3, "layout")
