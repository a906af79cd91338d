"""Pictures of detections: the drawing module and the validation images training sends to TensorBoard."""
import itertools

import numpy as np
import pytest
from PIL import Image

import main
from datasets import synthetic
from extras.validation_pictures import picture_indices
from tests.helpers import one_epoch_smoke_flags
from util import draw
from util.checkpoint import load_checkpoint, saved_class_names


def test_class_colours_are_distinct_and_stable():
    colours = [draw.class_colour(i) for i in range(12)]
    assert colours == [draw.class_colour(i) for i in range(12)]
    closest = min(sum((a - b) ** 2 for a, b in zip(c1, c2)) ** 0.5 for c1, c2 in itertools.combinations(colours, 2))
    assert closest > 20  # no two of the first 12 classes look alike


def test_draw_boxes_outlines_in_the_class_colour_and_leaves_the_rest():
    image = Image.new("RGB", (400, 400), (128, 128, 128))
    out = draw.draw_boxes(image, [[100, 150, 300, 350]], [2], [0.9], {2: "ellipse"})
    pixels = np.asarray(out)
    colour = np.array(draw.class_colour(2))
    assert (pixels[250, 100] == colour).all() and (pixels[350, 200] == colour).all()  # left and bottom edges
    assert (pixels[250, 200] == 128).all() and (pixels[20, 20] == 128).all()  # inside and outside untouched
    assert (pixels[150 - 5, 102] == colour).all()  # the label's background sits on top of the box
    assert np.asarray(image).max() == 128  # the input is not drawn on


def test_prediction_panel_draws_what_scores_at_least_the_threshold_else_the_best_dashed():
    """The one panel of detections (predict.py, the validation pictures, visualize_refs): boxes scoring
    >= the threshold; when none does, the ``fallback`` best dashed; with fallback 0, none."""
    import torch

    image = Image.new("RGB", (400, 400), (128, 128, 128))
    result = {"scores": torch.tensor([0.2, 0.6]), "labels": torch.tensor([1, 2]),
              "boxes": torch.tensor([[10.0, 200.0, 110.0, 300.0], [200.0, 100.0, 300.0, 200.0]])}
    # left edges, halfway down each box (away from the label and the caption band)
    first, second = (250, 10), (150, 200)

    def edge(picture, at, label):
        return (np.asarray(picture)[at] == np.array(draw.class_colour(label))).all()

    drawn = draw.prediction_panel(image, 1.0, result, {2: "ellipse"}, 0.6, caption=False)
    assert edge(drawn, second, 2) and not edge(drawn, first, 1)  # 0.6 >= 0.6, 0.2 < 0.6
    scaled = draw.prediction_panel(image.resize((800, 800)), 2.0, result, None, 0.6, caption=False)
    assert edge(scaled, (300, 400), 2)  # boxes in image pixels, drawn on the enlarged picture
    none_pass = draw.prediction_panel(image, 1.0, result, None, 0.9, fallback=1, caption=False)
    column = np.asarray(none_pass)[100:200, 200]  # the best box's left edge, dashed: partly coloured
    coloured = (column == np.array(draw.class_colour(2))).all(axis=1)
    assert 0 < coloured.sum() < len(column) and not edge(none_pass, first, 1)
    assert np.array_equal(np.asarray(draw.prediction_panel(image, 1.0, result, None, 0.9, fallback=0,
                                                           caption=False)), np.asarray(image))
    captioned = draw.prediction_panel(image, 1.0, result, None, 0.6)
    assert (np.asarray(captioned)[2, 2] == 0).all()  # the caption band in the top-left corner


def test_label_text_uses_names_and_falls_back_to_ids():
    assert draw.label_text(2, 0.876, {2: "ellipse"}) == "ellipse 0.88"
    assert draw.label_text(5, 0.5, {}) == "5 0.50" and draw.label_text(5, None, None) == "5"


def test_small_images_are_enlarged_large_ones_kept():
    small, scale = draw.enlarged(Image.new("RGB", (128, 96)))
    assert small.size == (512, 384) and scale == 4.0
    big = Image.new("RGB", (800, 600))
    assert draw.enlarged(big) == (big, 1.0)


def test_display_array_inverts_normalisation():
    from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, ToTensor
    assert (draw.IMAGENET_MEAN, draw.IMAGENET_STD) == (IMAGENET_MEAN, IMAGENET_STD)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor, _ = Normalize()(*ToTensor()(Image.fromarray(pixels), None))
    assert np.array_equal(np.asarray(draw.to_pil(tensor)), pixels)


@pytest.mark.parametrize("size, count, expected", [(10, 4, [0, 3, 6, 9]), (3, 5, [0, 1, 2]), (7, 1, [0]),
                                                   (7, 0, [])])
def test_picture_indices_fixed_and_spread(size, count, expected):
    assert picture_indices(size, count) == expected


def test_one_epoch_run_writes_validation_pictures_to_tensorboard(tmp_path):
    """A guided variant: ground truth | predictions | references, per fixed validation image, per evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = [f for f in one_epoch_smoke_flags(tmp_path / "data", tmp_path / "run", num_train=4, num_val=4)
             if f != "--no-tensorboard"]
    assert main.cli(flags + ["--vis_images", "2", "--variant", "v3.0.4"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val_images/0", "val_images/3"]
    for tag in events.Tags()["images"]:
        (picture,) = events.Images(tag)
        assert picture.step == 1 and picture.height >= draw.MIN_SIDE
        assert picture.width > 3 * picture.height * 0.8 - 10  # three panels of roughly square images
    names = saved_class_names(load_checkpoint(str(tmp_path / "run" / "checkpoint.pth")))
    assert names == {c["id"]: c["name"] for c in synthetic.CATEGORIES}
