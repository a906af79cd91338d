"""The controls of design §10 in whole runs: the oracle source (references from ground-truth boxes)
reaches training, evaluation, the diagnostics and the pictures through the forward's ``guidance``
argument, is marked as a control, and predict/export refuse it; the random ranking resumes bit-exactly.
"""
import json
import os
import sys

import pytest
import torch
import yaml

import main as main_module
from cli.config import parse_args
from models import build_model
from models.diagnostics import ReferenceDiagnostics
from models.recording import record_forward
from models.guidance import guidance_inputs
from tests.helpers import TINY, one_epoch_smoke_flags, tiny_args
from util.checkpoint import load_checkpoint
from util.nested_tensor import NestedTensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import export  # noqa: E402
import predict  # noqa: E402


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def one_padded_image():
    """A one-image batch padded on the right (valid width 48 of 64), and its three GT boxes (one inside
    another), normalised to the valid region."""
    image = torch.zeros(1, 3, 64, 64)
    image[0, :, :, :48] = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, :, 48:] = True
    boxes = torch.tensor([[0.45, 0.5, 0.7, 0.8], [0.4, 0.45, 0.22, 0.24], [0.86, 0.14, 0.2, 0.2]])
    return NestedTensor(image, mask), [{"boxes": boxes, "labels": torch.tensor([0, 1, 2])}]


def guided_record(variant):
    """The second encoder layer's record (guided by decoder layer 0) of a tiny oracle model, eval mode."""
    args = tiny_args("--variant", variant, "--enc_n_points", "4")
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    model.eval()
    samples, targets = one_padded_image()
    with torch.no_grad(), record_forward(model) as record:
        model(samples, guidance=guidance_inputs(args, targets, (0,)))
    return record.encoder[1], targets[0]["boxes"]


@pytest.mark.parametrize("variant", ["v3.0.4_gt", "v3.0.4_gt_distance"])
def test_oracle_references_are_gt_centres_in_the_model(variant):
    """Every map-derived reference of the guided layer is a GT centre times the level's valid ratio,
    exactly, distinct within a token; for ``distance`` a token inside a box starts with its smallest one."""
    record, boxes = guided_record(variant)
    vr = record.layout.valid_ratios[0]
    assert vr[0, 0] == 0.75 and vr[0, 1] == 1.0  # the padding is real
    refs = record.reference_points[0]  # (T, L, P, 2), point 0 the token itself
    centres = boxes[:, :2][:, None, :] * vr[None]  # (G, L, 2)
    own = refs[:, :, 0]
    image_tokens = ~record.layout.padding_mask[0]
    from_gt = 0
    for token in torch.nonzero(image_tokens)[:, 0].tolist():
        seen = []
        for point in range(1, refs.shape[2]):
            ref = refs[token, :, point]
            match = [g for g in range(len(boxes)) if torch.equal(ref, centres[g])]
            assert match or torch.equal(ref, own[token]), (token, point)
            if match:
                assert match[0] not in seen
                seen.append(match[0])
        from_gt += len(seen)
        if variant.endswith("distance"):
            assert len(seen) == 3  # three GT boxes for three map slots
            level = sum(token >= start for start in record.layout.level_start_index.tolist()) - 1
            x, y = (own[token, level] / vr[level]).tolist()
            inside = [g for g in range(len(boxes)) if abs(x - boxes[g, 0]) <= boxes[g, 2] / 2
                      and abs(y - boxes[g, 1]) <= boxes[g, 3] / 2]
            if inside:
                assert seen[0] == min(inside, key=lambda g: float(boxes[g, 2] * boxes[g, 3]))
    assert from_gt > 0


def test_oracle_diagnostics_read_gt_candidates_and_padding():
    """Two images with 2 and 1 GT boxes (one padding candidate): the picked references are all inside
    GT boxes (D2 in_box 1.0, mean IoU 1.0), so no padding candidate was ever picked."""
    args = tiny_args("--variant", "v3.0.4_gt_distance")
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    diagnostics = ReferenceDiagnostics(model, seed=args.seed)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 80, generator=g), torch.randn(3, 80, 48, generator=g)]
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.3, 0.4], [0.7, 0.6, 0.3, 0.3]]), "labels": torch.tensor([0, 1]),
                "image_id": 1},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]]), "labels": torch.tensor([2]), "image_id": 2}]
    diagnostics.start()
    diagnostics.update(images, targets)
    metrics = diagnostics.finish()
    assert metrics["D2/in_box"] == 1.0 and metrics["D2/mean_iou"] == pytest.approx(1.0)
    assert metrics["D1/dup_iou07"] == 0.0 and metrics["D6/coverage"] == 1.0
    assert 0 < metrics["D6/slot_coverage"] < 1  # image 2 has one GT box for three slots


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """One tiny v3.0.4_gt run with diagnostics and pictures: (output dir, data dir)."""
    root = tmp_path_factory.mktemp("oracle")
    out, data = root / "run", root / "data"
    flags = one_epoch_smoke_flags(data, out) + ["--variant", "v3.0.4_gt", "--diag_images", "2", "--tensorboard",
                                                "--vis_images", "1"]
    main_module.main(parse_args(flags))
    return out, data


def test_oracle_run_is_marked_as_a_control(oracle_run):
    out, _ = oracle_run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["control"] == "oracle" and config["ref_source"] == "gt"
    records = _log(out / "log.jsonl")
    epochs = [r for r in records if r["type"] == "epoch"]
    assert epochs and all(r["control"] == "oracle" for r in epochs) and "test_AP" in epochs[0]
    diag = [r for r in records if r["type"] == "diag"]
    assert diag and diag[0]["D2/in_box"] == 1.0
    # config.yaml loads again: the derived key is recomputed, never a flag
    again = parse_args(["--config", str(out / "config.yaml"), "--device", "cpu"])
    assert again.ref_source == "gt"
    assert os.listdir(out / "tensorboard")  # the pictures ran with the targets too


def test_oracle_eval_reads_the_targets(oracle_run, tmp_path):
    out, data = oracle_run
    flags = one_epoch_smoke_flags(data, tmp_path / "eval") + ["--variant", "v3.0.4_gt", "--eval", "--resume",
                                                              str(out / "checkpoint.pth"), "--diag_images", "2"]
    stats = main_module.main(parse_args(flags))
    assert "AP" in stats
    records = _log(tmp_path / "eval" / "log.jsonl")
    assert [r["control"] for r in records if r["type"] == "eval"] == ["oracle"]
    assert [r["type"] for r in records].count("eval_diag") == 1


def test_predict_and_export_refuse_an_oracle_checkpoint(oracle_run, tmp_path, capsys):
    out, data = oracle_run
    images = os.path.join(str(data), "val2017")
    assert predict.main(["--checkpoint", str(out), "--images", images, "--out", str(tmp_path / "p"),
                         "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "reads the ground-truth boxes" in err and "not a detector" in err
    assert not (tmp_path / "p").exists()
    assert export.main(["--checkpoint", str(out / "checkpoint.pth"), "--out", str(tmp_path / "m.pt2"),
                        "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a detector" in err


def _resume_flags(data, out, *extra):
    return [*TINY, "--with_box_refine", "--variant", "v3.0.4_random", "--dataset_file", "synthetic", "--coco_path",
            str(data), "--synthetic_num_train", "8", "--synthetic_num_val", "2", "--synthetic_image_size", "96",
            "--min_size", "96", "--max_size", "128", "--batch_size", "2", "--max_iters_per_epoch", "2",
            "--num_workers", "0", "--seed", "3", "--no-tensorboard", "--output_dir", str(out), *extra]


def test_random_ranking_resumes_bit_exactly(tmp_path):
    data = tmp_path / "data"
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    main_module.main(parse_args(_resume_flags(data, straight, "--epochs", "2")))
    main_module.main(parse_args(_resume_flags(data, first, "--epochs", "1")))
    main_module.main(parse_args(_resume_flags(data, resumed, "--epochs", "2", "--resume",
                                              str(first / "checkpoint.pth"))))
    a = load_checkpoint(str(straight / "checkpoint.pth"))["model"]
    b = load_checkpoint(str(resumed / "checkpoint.pth"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_random_ranking_on_cuda_draws_from_a_cuda_generator_reproducibly():
    """On a GPU the random ranking's generator lives on the device (the fake-CUDA test stands a CPU one
    in): the same seed parts give the same references, other seed parts other ones."""
    args = tiny_args("--variant", "v3.0.4_random", "--enc_n_points", "4")
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    model.cuda().eval()
    samples, targets = one_padded_image()
    samples = NestedTensor(samples.tensors.cuda(), samples.mask.cuda())

    def references(seed_parts):
        with torch.no_grad(), record_forward(model) as record:
            model(samples, guidance=guidance_inputs(args, targets, seed_parts))
        return record.encoder[1].reference_points

    first = references((0, 1, 2))
    assert first.is_cuda and torch.equal(first, references((0, 1, 2)))
    assert not torch.equal(first, references((0, 1, 3)))
