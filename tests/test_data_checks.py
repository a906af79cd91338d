"""Training and evaluation data are checked before any work: annotation files (structure, category
ids, listed sizes), images (truncated files, 16-bit PNGs, thin strips), and what the data summary
reports. Runs go through ``main.cli`` on tiny COCO files written by the test."""
import json
import os

import numpy as np
import pytest

import datasets
import main as main_module
from datasets.coco import AnnotationError, BadImageError
from tests.run_helpers import assert_one_line_error, cli, coco_flags, small_coco
from tests.test_datasets import ann, rectangle_image, write_coco
from util.logger import read_jsonl


# ----------------------------------------------------------------------------- annotation files

@pytest.mark.parametrize("category,expected", [
    (-1, "category_id -1, outside the classifier's range 0..2 (--num_classes 3)"),
    (7, "category_id 7, which is not in 'categories'"),
    (500, "category_id 500, outside the classifier's range 0..2 (--num_classes 3)"),
])
def test_category_ids_are_checked_at_load_time(tmp_path, capsys, category, expected):
    categories = ({"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": -1, "name": "neg"},
                  {"id": 500, "name": "far"})
    small_coco(str(tmp_path / "data"), train_anns=[ann(1, (4, 4, 8, 8)), ann(2, (4, 4, 8, 8), category)],
               categories=categories)
    code, err = cli(coco_flags(tmp_path / "data", tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "instances_train2017.json", "annotation id 2", expected)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()  # before any training


def _rewrite(path, change):
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


@pytest.mark.parametrize("change,expected", [
    (lambda d: d.pop("categories"), "has no 'categories' key"),                       # finding 7
    (lambda d: d.pop("images"), "has no 'images' key"),
    (lambda d: d.pop("annotations"), "has no 'annotations' key"),
    (lambda d: d.update(images=[]), "lists no images"),
    (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 is listed twice"),
    (lambda d: d["annotations"][0].pop("bbox"), "annotation id 1 has no 'bbox'"),
    (lambda d: d["annotations"][0].update(image_id=99), "refers to image id 99"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 1 has bbox [1, 2, 3]; it must be four"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), "annotation id 1 has bbox [1, 2, '3', 4]"),
    (lambda d: d["annotations"][0].update(bbox={"x": 1}), "annotation id 1 has bbox {'x': 1}"),
    (lambda d: d["annotations"][0].update(area="big"), "annotation id 1 has area 'big'; it must be a number"),
])
def test_annotation_file_structure_is_checked_before_training(tmp_path, capsys, change, expected):
    train, _ = small_coco(str(tmp_path / "data"))
    _rewrite(train, change)
    code, err = cli(coco_flags(tmp_path / "data", tmp_path / "out"), capsys)
    assert_one_line_error(code, err, train, expected)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_not_json_names_the_file(tmp_path, capsys):
    train, _ = small_coco(str(tmp_path / "data"))
    open(train, "w").write('{"images": [1, 2,\n oops')
    code, err = cli(coco_flags(tmp_path / "data", tmp_path / "out"), capsys)
    assert_one_line_error(code, err, f"annotation file {train} is not valid JSON", "line 2")


def test_eval_on_an_empty_split_is_an_error(tmp_path, capsys):
    _, val = small_coco(str(tmp_path / "data"))
    _rewrite(val, lambda d: d.update(images=[], annotations=[]))
    code, err = cli(coco_flags(tmp_path / "data", tmp_path / "out", "--eval"), capsys)
    assert_one_line_error(code, err, val, "lists no images")


def test_empty_annotation_list_warns(tmp_path):
    small_coco(str(tmp_path), train_anns=[])
    args = main_module.parse_args(coco_flags(tmp_path, tmp_path / "out"))
    with pytest.warns(RuntimeWarning, match="has no annotations"):
        dataset = datasets.build_dataset("train", args)
    assert len(dataset) == 2


def test_listed_size_must_match_the_file(tmp_path):
    """An annotation that says 64x64 for a 32x32 file: its boxes were clipped to the wrong size."""
    small_coco(str(tmp_path))
    path = os.path.join(tmp_path, "annotations", "instances_val2017.json")
    _rewrite(path, lambda d: d["images"][0].update(width=64, height=64))
    args = main_module.parse_args(coco_flags(tmp_path, tmp_path / "out"))
    dataset = datasets.build_dataset("val", args)
    with pytest.raises(BadImageError, match=r"is 32x32 pixels but .* says 64x64"):
        dataset[0]


def test_data_summary_and_skipped_images_are_reported(tmp_path, capsys):
    """Clipped/dropped boxes: one line per split, printed and in log.jsonl; skipped unreadable
    images: counted in the epoch record (training and evaluation)."""
    images = [(i, rectangle_image(32, 32, (4, 4, 20, 20)), (32, 32)) for i in (1, 2, 3)]
    anns = [ann(1, (4, 4, 16, 16)), ann(2, (20, 20, 30, 30)), ann(3, (4, 4, 0, 5)), ann(3, (40, 40, 4, 4))]
    write_coco(str(tmp_path), images, anns, split="train")  # one clipped, two dropped
    write_coco(str(tmp_path), images[:2], [ann(1, (4, 4, 16, 16))], split="val")
    (tmp_path / "train2017" / "000002.png").write_bytes(b"broken")
    (tmp_path / "val2017" / "000001.png").write_bytes(b"broken")
    out = tmp_path / "out"
    argv = coco_flags(tmp_path, out, "--skip_bad_images", "--max_iters_per_epoch", "3")
    with pytest.warns(RuntimeWarning, match="skipping bad image"):
        code, _ = cli(argv, capsys)
    assert code == 0
    records = read_jsonl(str(out / "log.jsonl"))
    data = {r["split"]: r for r in records if r["type"] == "data"}
    assert (data["train"]["images"], data["train"]["annotations"]) == (3, 4)  # all four are in the file
    assert (data["train"]["clipped_boxes"], data["train"]["dropped_boxes"]) == (1, 2)
    assert (data["val"]["clipped_boxes"], data["val"]["dropped_boxes"]) == (0, 0)
    epoch = [r for r in records if r["type"] == "epoch"][0]
    assert epoch["train_skipped_images"] == 1  # image 2 once per epoch (batch 1, 3 iterations)
    assert epoch["test_skipped_images"] == 1


def test_load_coco_counts_match_the_file(tmp_path):
    """The count check is against an independent tally of the file."""
    images = [(1, None, (40, 30))]
    anns = [ann(1, (5, 5, 10, 10)), ann(1, (35, 5, 10, 10)), ann(1, (5, 5, -1, 3))]
    path = write_coco(str(tmp_path), images, anns)
    coco = datasets.coco.load_coco(path, num_classes=3)
    assert (coco.num_clipped, coco.num_dropped) == (1, 1)
    datasets.coco.load_coco(path, num_classes=2)  # category 1 is index 1 of 0..1
    with pytest.raises(AnnotationError, match=r"category_id 1, outside the classifier's range 0..0"):
        datasets.coco.load_coco(path, num_classes=1)


# ----------------------------------------------------------------------------- images

def test_a_16_bit_png_keeps_its_contrast(tmp_path):
    """Pillow's convert('RGB') clips 16-bit grey at 255 (an all-white image); read_image rescales."""
    import PIL.Image

    from datasets.coco import read_image

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # 0 .. 65535 left to right
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(ramp).save(path)
    with PIL.Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    pixels = np.asarray(read_image(str(path), 7))
    assert pixels.shape == (8, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert np.array_equal(pixels[0, :, 0], np.round(ramp[0] / 257).astype(np.uint8))  # linear, by hand


def test_a_thin_strip_resizes_to_a_usable_image(tmp_path):
    """A 1 x 5000 image: the shorter side would round to 0 (an error that names no file)."""
    from datasets.transforms import scaled_size

    assert scaled_size((1, 5000), 800, 1333) == (1333, 1)
    assert scaled_size((5000, 1), 800, 1333) == (1, 1333)
    # ordinary images as upstream: 800 * 640 / 480 = 1066.67, floored
    assert scaled_size((640, 480), 800, 1333) == (800, 1066)


def _coco_run(tmp_path, capsys, mutate=None, *extra, images=None):
    import json

    from tests.test_datasets import ann, rectangle_image, write_coco

    root = tmp_path / "coco"
    images = images or [(i, rectangle_image(32, 32, (4, 4, 20, 20)), (32, 32)) for i in (1, 2)]
    anns = [ann(1, (4, 4, 16, 16)), ann(2, (4, 4, 16, 16), 2)]
    for split in ("train", "val"):
        path = write_coco(str(root), images, anns, split=split)
        if mutate is not None:
            with open(path) as f:
                data = json.load(f)
            mutate(data, root / f"{split}2017")
            with open(path, "w") as f:
                json.dump(data, f)
    return cli(coco_flags(str(root), str(tmp_path / "out"), *extra), capsys)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_truncated_image_is_one_line_naming_the_file(tmp_path, capsys, workers):
    def truncate(data, folder):
        path = folder / data["images"][1]["file_name"]
        path.write_bytes(path.read_bytes()[:60])

    code, err = _coco_run(tmp_path, capsys, truncate, "--num_workers", workers)
    assert_one_line_error(code, err, "000002.png", "image id 2")


@pytest.mark.parametrize("value", [0, "abc", -3])
def test_an_image_size_that_is_not_a_positive_integer_is_one_line(tmp_path, capsys, value):
    def bad_width(data, folder):
        data["images"][0]["width"] = value

    code, err = _coco_run(tmp_path, capsys, bad_width)
    assert_one_line_error(code, err, "image id 1", f"width {value!r}", "positive integer")
