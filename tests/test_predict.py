"""scripts/predict.py: detections equal to evaluation's, class names through the checkpoint, bad input."""
import json
import os
import shutil
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import datasets
import models
from datasets import synthetic
from engine import evaluate
from tests.helpers import TINY
from util.checkpoint import atomic_save, checkpoint_state, load_checkpoint, saved_class_names
from cli.config import config_dict, parse_args, save_config
from util.optim import build_lr_scheduler, build_optimizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import predict  # noqa: E402

SYNTHETIC_NAMES = {c["id"]: c["name"] for c in synthetic.CATEGORIES}


def data_flags(root):
    return ["--dataset_file", "synthetic", "--coco_path", str(root), "--synthetic_num_train", "2",
            "--synthetic_num_val", "4", "--synthetic_image_size", "80", "--min_size", "64", "--max_size", "96",
            "--no-random_crop", "--num_workers", "0", "--batch_size", "2", "--with_box_refine"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory like main.py writes: config.yaml and checkpoint.pth of a (random-init) tiny model,
    plus the evaluation detections of that model on the 4 synthetic validation images."""
    root = tmp_path_factory.mktemp("predict")
    args = parse_args(TINY + data_flags(root / "data"))
    args.num_classes = datasets.num_classes(args)
    torch.manual_seed(0)
    model, _, postprocessors = models.build_model(args)
    with torch.no_grad():  # spread the scores so that the ranking is not a tie
        model.class_embed[-1].bias.normal_(0, 2)
    model.eval()
    val = datasets.build_dataset("val", args)
    loader = DataLoader(val, batch_size=2, shuffle=False, collate_fn=datasets.collate_fn)
    run = root / "run"
    run.mkdir()
    evaluate(model, postprocessors, loader, datasets.get_coco_api(val), torch.device("cpu"), amp="off",
             print_freq=10, output_dir=str(run))
    optimizer = build_optimizer(model, args)
    state = checkpoint_state(model, optimizer, build_lr_scheduler(optimizer, args), None, 0, config_dict(args),
                             class_names=datasets.class_names(val))
    atomic_save(state, str(run / "checkpoint.pth"))
    save_config(args, str(run / "config.yaml"))
    return {"root": root, "run": run, "val": val, "args": args}


def test_predictions_equal_evaluation_detections(run_dir, tmp_path):
    """Same images, same batches: predict.py's detections are engine.evaluate's, file by file."""
    images = os.path.join(run_dir["root"], "data", "val2017")
    out = tmp_path / "preds"
    argv = ["--checkpoint", str(run_dir["run"]), "--images", images, "--out", str(out), "--batch_size", "2",
            "--score_thr", "0", "--device", "cpu"]
    assert predict.main(argv) == 0
    got = json.loads((out / "detections.json").read_text())
    expected = json.loads((run_dir["run"] / "detections_val.json").read_text())
    coco = datasets.get_coco_api(run_dir["val"])
    file_to_id = {img["file_name"]: img["id"] for img in coco.dataset["images"]}
    per_image = min(100, 12 * run_dir["args"].num_classes)  # topk_eval (query x class pairs), threshold 0
    assert len(got) == len(expected) == 4 * per_image
    for det, ref in zip(sorted(got, key=lambda d: (file_to_id[os.path.basename(d["file_name"])], -d["score"])),
                        sorted(expected, key=lambda d: (d["image_id"], -d["score"]))):
        assert file_to_id[os.path.basename(det["file_name"])] == ref["image_id"]
        assert det["category_id"] == ref["category_id"]
        assert det["score"] == pytest.approx(ref["score"], abs=1e-6)
        assert det["bbox"] == pytest.approx(ref["bbox"], abs=1e-4)
    assert sorted(os.listdir(out)) == sorted(["detections.json"] + [n.replace(".jpg", ".png") for n in file_to_id])


def test_class_names_round_trip_through_the_checkpoint(run_dir, tmp_path):
    names = datasets.class_names(run_dir["val"])
    assert names == SYNTHETIC_NAMES
    contents = load_checkpoint(str(run_dir["run"] / "checkpoint.pth"))
    assert saved_class_names(contents) == names
    # plain ints and strings: the entry loads with weights_only=True
    torch.save({"class_names": contents["class_names"]}, tmp_path / "names.pth")
    assert torch.load(tmp_path / "names.pth", weights_only=True)["class_names"] == names
    predictor = predict.load_predictor(str(run_dir["run"]), "cpu")
    assert predictor.class_names == names
    # an older checkpoint (no names): labels are ids
    del contents["class_names"]
    torch.save(contents, tmp_path / "old.pth")
    shutil.copy(run_dir["run"] / "config.yaml", tmp_path / "config.yaml")
    assert predict.load_predictor(str(tmp_path / "old.pth"), "cpu").class_names == {}


def test_file_checkpoint_without_config_uses_the_recorded_configuration(run_dir, tmp_path):
    shutil.copy(run_dir["run"] / "checkpoint.pth", tmp_path / "alone.pth")
    predictor = predict.load_predictor(str(tmp_path / "alone.pth"), "cpu", topk=7)
    assert predictor.args.hidden_dim == run_dir["args"].hidden_dim and predictor.postprocess.topk == 7


def test_corrupt_file_is_skipped_counted_and_named(run_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(run_dir["root"], "data", "val2017"), folder)
    good = sorted(os.listdir(folder))
    (folder / "broken.jpg").write_bytes((folder / good[0]).read_bytes()[:200])
    out = tmp_path / "preds"
    argv = ["--checkpoint", str(run_dir["run"]), "--images", str(folder), str(folder / good[1]), "--out", str(out),
            "--device", "cpu", "--score_thr", "0.05"]
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image:" in printed and str(folder / "broken.jpg") in printed
    assert sorted(os.listdir(out)) == sorted(["detections.json"] + [n.replace(".jpg", ".png") for n in good])
    dets = json.loads((out / "detections.json").read_text())
    assert all(d["score"] >= 0.05 for d in dets)
    assert {d["file_name"] for d in dets} <= {str(folder / n) for n in good}


def test_glob_inputs_in_order_each_once(run_dir):
    folder = os.path.join(run_dir["root"], "data", "val2017")
    paths = predict.collect_images([os.path.join(folder, "*2.jpg"), folder])
    assert [os.path.basename(p) for p in paths] == ["000000000002.jpg", "000000000001.jpg", "000000000003.jpg",
                                                    "000000000004.jpg"]


@pytest.mark.parametrize("case", ["missing", "empty_folder", "empty_glob", "mismatch", "not_a_checkpoint"])
def test_bad_input_is_a_one_line_error(run_dir, tmp_path, capsys, case):
    images = os.path.join(run_dir["root"], "data", "val2017")
    checkpoint = str(run_dir["run"])
    if case == "missing":
        (tmp_path / "val2017").mkdir()
        images = str(tmp_path / "val")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("x")
        images = str(tmp_path / "empty")
    elif case == "empty_glob":
        images = str(tmp_path / "*.png")
    elif case == "mismatch":  # the checkpoint with a config.yaml of another width
        shutil.copy(run_dir["run"] / "checkpoint.pth", tmp_path / "checkpoint.pth")
        text = (run_dir["run"] / "config.yaml").read_text().replace("hidden_dim: 64", "hidden_dim: 32")
        (tmp_path / "config.yaml").write_text(text)
        checkpoint = str(tmp_path)
    else:
        (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
        checkpoint = str(tmp_path / "junk.pth")
    argv = ["--checkpoint", checkpoint, "--images", images, "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if case == "mismatch":
        assert "--hidden_dim 32 (checkpoint: 64)" in err[0]
    if case == "missing":
        assert err[0].endswith(f"no such file or folder (did you mean {tmp_path / 'val2017'}?)")


def test_legacy_pickle_is_refused_unless_trusted(run_dir, tmp_path, capsys):
    """A checkpoint whose unpickling needs a class outside the allowlist (here fractions.Fraction) is a
    one-line error; naming it in --unsafe_trust_checkpoint loads it."""
    from fractions import Fraction
    contents = load_checkpoint(str(run_dir["run"] / "checkpoint.pth"))
    contents["extra"] = Fraction(1, 3)
    torch.save(contents, tmp_path / "legacy.pth")
    shutil.copy(run_dir["run"] / "config.yaml", tmp_path / "config.yaml")
    images = os.path.join(run_dir["root"], "data", "val2017", "000000000001.jpg")
    argv = ["--checkpoint", str(tmp_path / "legacy.pth"), "--images", images, "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to load" in err[0] and "Fraction" in err[0]
    assert predict.main(argv + ["--unsafe_trust_checkpoint", str(tmp_path / "legacy.pth")]) == 0
