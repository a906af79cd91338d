"""How every script loads a run (cli/run_loading.py): which configuration, strict weights, the class
count from the checkpoint, one-line refusals; and that no script imports main.py."""
import argparse
import ast
import glob
import os
import sys

import pytest
import torch
import yaml

import models
from cli.config import config_dict, parse_args
from cli.run_loading import checkpoint_configuration, load_run, random_init_configuration
from tests.helpers import TINY, tiny_args
from util.checkpoint import atomic_save
from util.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

NAMES = {1: "rectangle", 2: "ellipse"}


def _checkpoint(path, *flags, num_classes=7, upstream=False):
    """A checkpoint of a freshly built tiny model (this project's record, or upstream's Namespace);
    returns the model."""
    args = tiny_args(*flags, num_classes=num_classes)
    torch.manual_seed(1)
    model, _, _ = models.build_model(args)
    record = argparse.Namespace(lr=2e-4, hidden_dim=args.hidden_dim) if upstream else config_dict(args)
    atomic_save({"model": model.state_dict(), "args": record, "epoch": 3, "class_names": NAMES}, str(path))
    return model


def _weights_equal(a, b):
    own = b.state_dict()
    return all(torch.equal(value, own[key]) for key, value in a.state_dict().items())


def test_a_recorded_configuration_parses_as_its_yaml_file_would(tmp_path):
    args = tiny_args("--variant", "v3.0.4", "--topk_eval", "17", num_classes=7)
    record = config_dict(args)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(record))
    from_file, from_values = parse_args(["--config", str(tmp_path / "c.yaml")]), parse_args([], config_values=record)
    assert vars(from_values) == {**vars(from_file), "config": None}
    with pytest.raises(ValueError, match="^the checkpoint: unknown key 'not_a_flag'"):
        parse_args([], config_values={**record, "not_a_flag": 1}, config_source="the checkpoint")


def test_the_configuration_is_config_then_run_directory_then_record_with_flags_over_it(tmp_path):
    """--topk_eval (an evaluation flag, free to differ) tells which configuration was read."""
    ckpt = tmp_path / "run" / "checkpoint.pth"
    ckpt.parent.mkdir()
    model = _checkpoint(ckpt, "--topk_eval", "11")
    run = load_run(str(ckpt), flags=["--device", "cpu"])
    assert run.config.topk_eval == 11 and run.epoch == 3 and run.class_names == NAMES
    assert _weights_equal(model, run.model) and not run.model.training
    (ckpt.parent / "config.yaml").write_text(yaml.safe_dump({**config_dict(tiny_args(num_classes=7)),
                                                             "topk_eval": 12}))
    assert load_run(str(ckpt.parent)).config.topk_eval == 12  # a run directory: its config.yaml
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**config_dict(tiny_args(num_classes=7)), "topk_eval": 13}))
    assert load_run(str(ckpt), config_file=str(other)).config.topk_eval == 13
    assert load_run(str(ckpt), config_file=str(other), flags=["--topk_eval", "14"]).config.topk_eval == 14


def test_model_flags_that_differ_from_the_record_are_one_line(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    _checkpoint(ckpt)
    with pytest.raises(InputError) as raised:
        load_run(str(ckpt), "--resume", flags=["--hidden_dim", "32", "--nheads", "8"])
    message = str(raised.value)
    assert message.startswith(f"--resume {ckpt} was made with other model flags: ") and "\n" not in message
    assert "--hidden_dim 32 (checkpoint: 64)" in message and "--nheads 8 (checkpoint: 4)" in message


def test_the_class_count_comes_from_the_checkpoint_not_the_dataset(tmp_path):
    """An upstream-style checkpoint with a configuration that does not state the class count: the
    classifier's rows (7), not COCO's 91."""
    ckpt = tmp_path / "r50_deformable_detr-checkpoint.pth"
    model = _checkpoint(ckpt, num_classes=7, upstream=True)
    config = {k: v for k, v in config_dict(tiny_args(num_classes=7)).items() if k != "num_classes"}
    (tmp_path / "upstream.yaml").write_text(yaml.safe_dump({**config, "dataset_file": "coco"}))
    with pytest.raises(InputError, match="argparse.Namespace.*pass --config FILE"):
        load_run(str(ckpt))
    run = load_run(str(ckpt), config_file=str(tmp_path / "upstream.yaml"))
    assert run.config.num_classes == 7 and _weights_equal(model, run.model)
    with pytest.raises(InputError, match="its classifier has 7 classes but the configuration says --num_classes 91"):
        load_run(str(ckpt), config_file=str(tmp_path / "upstream.yaml"), flags=["--num_classes", "91"])


def test_weights_that_do_not_fit_are_one_line_naming_the_keys(tmp_path):
    """A bare state dict of a model with two feature levels loaded as one with four: the keys are
    named (nothing is drawn or evaluated partly random)."""
    bare = tmp_path / "bare.pth"
    torch.save(models.build_model(tiny_args("--num_feature_levels", "2", num_classes=7))[0].state_dict(), str(bare))
    with pytest.raises(InputError, match="records no configuration.*pass --config FILE"):
        load_run(str(bare))
    (tmp_path / "four.yaml").write_text(yaml.safe_dump(config_dict(tiny_args(num_classes=7))))
    with pytest.raises(InputError) as raised:
        load_run(str(bare), config_file=str(tmp_path / "four.yaml"))
    message = str(raised.value)
    assert message.startswith(f"--checkpoint {bare} does not match this model's configuration: ")
    assert "50 missing keys (e.g. ['backbone.0.body.layer4." in message and "\n" not in message


def test_a_control_that_reads_the_ground_truth_is_refused_on_images_alone(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    _checkpoint(ckpt, "--variant", "v3.0.4_gt")
    assert load_run(str(ckpt)).config.ref_source == "gt"  # with targets (diagnostics, synthetic images): fine
    with pytest.raises(InputError, match="reads the ground-truth boxes .* not a detector"):
        load_run(str(ckpt), images_only=True)


def test_the_checkpoint_configuration_checks_the_validation_data_when_asked(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    _checkpoint(ckpt, "--dataset_file", "coco", "--coco_path", str(tmp_path / "nowhere"))
    contents = torch.load(str(ckpt), weights_only=False)
    assert checkpoint_configuration(contents, str(ckpt), "--resume").coco_path == str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--coco_path .*nowhere: folder not found"):
        checkpoint_configuration(contents, str(ckpt), "--resume", check_paths=True)


def test_random_init_has_the_flag_or_dataset_class_count_never_a_default(monkeypatch, capsys):
    import bench_model
    import datasets
    from datasets import synthetic

    assert random_init_configuration(TINY + ["--dataset_file", "synthetic"]).num_classes == synthetic.num_classes()
    assert random_init_configuration(TINY + ["--num_classes", "5"]).num_classes == 5

    def unknown(args):
        raise FileNotFoundError("no annotation file to count the classes of")

    monkeypatch.setattr(datasets, "num_classes", unknown)
    code = bench_model.main(TINY + ["--image_size", "64", "64", "--repeats", "1", "--warmup", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: no annotation file to count the classes of"]


def test_visualize_refs_draws_a_checkpoint_exactly_or_not_at_all(tmp_path, capsys):
    """--resume is loaded strictly with the checkpoint's configuration: a configuration of another
    model is one line (it used to be drawn with the weights that fit and the rest random)."""
    import visualize_refs

    ckpt = tmp_path / "checkpoint.pth"
    model = _checkpoint(ckpt)
    run = visualize_refs.load_model(["--resume", str(ckpt)])
    assert _weights_equal(model, run.model) and run.class_names == NAMES
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(config_dict(tiny_args("--hidden_dim", "96", num_classes=7))))
    argv = ["--image", "x.png", "--out", str(tmp_path / "vis"), "--config", str(tmp_path / "wide.yaml"),
            "--resume", str(ckpt)]
    assert visualize_refs.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hidden_dim 96 (checkpoint: 64)" in err[0]
    assert visualize_refs.main(argv[:4] + ["--pretrained", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --pretrained {ckpt}: name the checkpoint to draw with --resume")
    assert not (tmp_path / "vis").exists()


def test_no_script_imports_main():
    """Scripts load runs through cli/run_loading.py, never through the trainer's entry point."""
    importers = []
    for path in sorted(glob.glob(os.path.join(SCRIPTS, "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if "main" in names:
                importers.append(os.path.basename(path))
    assert importers == []
