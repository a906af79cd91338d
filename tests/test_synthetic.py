"""The synthetic shapes dataset: deterministic, well-formed COCO files, generated once, safe to race."""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

import datasets
from datasets import synthetic
from cli.config import get_args_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root):
    """{relative path: sha256} of the generated files (images and annotations)."""
    digests = {}
    for folder in ("train2017", "val2017", "annotations"):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            with open(os.path.join(root, folder, name), "rb") as f:
                digests[f"{folder}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return digests


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.generate_synthetic_coco(str(tmp_path / name), num_train=6, num_val=3, image_size=64, seed=seed)
    a, b, c = (tree_digest(str(tmp_path / n)) for n in "abc")
    assert a == b and len(a) == 6 + 3 + 2
    assert a["annotations/instances_train2017.json"] != c["annotations/instances_train2017.json"]
    assert a["train2017/000000000001.jpg"] != c["train2017/000000000001.jpg"]
    # image i depends on (seed, split, i) only: asking for more images keeps the first ones
    synthetic.generate_synthetic_coco(str(tmp_path / "d"), num_train=8, num_val=3, image_size=64, seed=3)
    d = tree_digest(str(tmp_path / "d"))
    assert all(d[k] == v for k, v in a.items() if k.endswith(".jpg"))


def test_files_are_well_formed_coco(tmp_path):
    root = str(tmp_path)
    synthetic.generate_synthetic_coco(root, num_train=50, num_val=10, image_size=96, seed=0)
    coco = COCO(os.path.join(root, "annotations", "instances_train2017.json"))
    assert len(coco.getImgIds()) == 50
    assert {c["id"] for c in coco.loadCats(coco.getCatIds())} == set(range(1, 7))
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    assert len(used) == 6  # every class appears in 50 images
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    counts = []
    for image in coco.loadImgs(coco.getImgIds()):
        with open(os.path.join(root, "train2017", image["file_name"]), "rb") as f:
            from PIL import Image
            size = Image.open(f).size
        assert size == (image["width"], image["height"])
        assert 0.75 * 96 < image["width"] < 1.25 * 96 and 0.75 * 96 < image["height"] < 1.25 * 96
        anns = coco.imgToAnns[image["id"]]
        counts.append(len(anns))
        for a in anns:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            assert 0 < a["area"] <= w * h + 1e-6 and a["iscrowd"] == 0
    assert max(counts) <= 6 and counts[24] == 0 and counts[49] == 0  # every 25th image is empty
    assert sum(c > 0 for c in counts) == 48
    sides = [min(a["bbox"][2:]) for a in coco.dataset["annotations"]]
    assert np.median(sides) > 0.1 * 96  # objects are not tiny on average


def test_objects_are_visible_and_clutter_is_not_an_object(tmp_path):
    """Objects are vivid, clutter is muted: every box is largely vivid pixels, the rest of the image hardly any."""
    root = str(tmp_path)
    synthetic.generate_synthetic_coco(root, num_train=30, num_val=0, image_size=128, seed=1)
    coco = COCO(os.path.join(root, "annotations", "instances_train2017.json"))
    from PIL import Image
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(os.path.join(root, "train2017", image["file_name"])), dtype=np.float32)
        vivid = pixels.max(axis=2) - pixels.min(axis=2) > 70
        covered = np.zeros_like(vivid)
        for a in coco.imgToAnns[image["id"]]:
            x, y, w, h = (int(round(v)) for v in a["bbox"])
            # even a thin ring or a partly covered shape fills a good part of its box
            assert vivid[y:y + h, x:x + w].mean() > 0.2, (image["file_name"], a)
            covered[y:y + h, x:x + w] = True
        assert vivid[~covered].mean() < 0.02, image["file_name"]


def synthetic_args(root, **overrides):
    values = dict(dataset_file="synthetic", coco_path=str(root), synthetic_num_train=6, synthetic_num_val=4,
                  synthetic_image_size=64, synthetic_seed=0, min_size=[64], max_size=96, random_crop=False)
    values.update(overrides)
    return argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **values})


def test_build_dataset_generates_once_and_regenerates_on_new_parameters(tmp_path):
    args = synthetic_args(tmp_path)
    val = datasets.build_dataset("val", args)
    assert len(val) == 4 and datasets.num_classes(args) == 7
    params_file = tmp_path / synthetic.PARAMS_FILE
    stamp = params_file.stat().st_mtime_ns
    train = datasets.build_dataset("train", args)
    assert len(train) == 6 and params_file.stat().st_mtime_ns == stamp  # reused, not rewritten
    image, target = train[0]
    assert image.shape[0] == 3 and target["boxes"].shape[1] == 4
    assert ((target["boxes"] > 0) & (target["boxes"] <= 1)).all()
    assert target["labels"].min() >= 1 and target["labels"].max() <= 6
    assert not synthetic.ensure_synthetic_coco(str(tmp_path), 6, 4, 64, 0)
    # other parameters: the data is made again
    assert len(datasets.build_dataset("val", synthetic_args(tmp_path, synthetic_num_val=5))) == 5
    assert json.loads(params_file.read_text())["num_val"] == 5
    assert len(os.listdir(tmp_path / "val2017")) == 5
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthetic-")]  # no scratch left behind


def test_refuses_to_overwrite_real_coco(tmp_path):
    os.makedirs(tmp_path / "annotations")
    (tmp_path / "annotations" / "instances_train2017.json").write_text('{"info": {"description": "COCO"}}')
    with pytest.raises(FileExistsError, match="not synthetic"):
        synthetic.ensure_synthetic_coco(str(tmp_path), 4, 2, 32, 0)


def test_two_processes_at_once(tmp_path):
    """Two processes that start together both get the complete data, generated once."""
    code = ("import sys; from datasets.synthetic import ensure_synthetic_coco; "
            "print(ensure_synthetic_coco(sys.argv[1], 40, 10, 64, 0, verbose=False))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["False", "True"]
    reference = tmp_path / "reference"
    synthetic.generate_synthetic_coco(str(reference), 40, 10, 64, 0)
    assert tree_digest(str(tmp_path)) == tree_digest(str(reference))


def test_learnable_split_feeds_the_loader(tmp_path):
    dataset = datasets.build_dataset("val", synthetic_args(tmp_path))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=datasets.collate_fn)
    samples, targets = next(iter(loader))
    assert samples.tensors.shape[:2] == (2, 3) and samples.mask.dtype == torch.bool
    assert all(t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 for t in targets)
