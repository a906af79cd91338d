"""A configuration that cannot work is one line naming the flag or file (exit 2), before anything
is written: numeric domains, YAML files, paths, the two-stage query count, the attention
implementation; an lr drop past the last epoch is a warning."""
import os

import pytest

import main as main_module
from cli.config import validate_paths
from tests.helpers import TINY
from tests.run_helpers import assert_one_line_error, cli, small_coco, synthetic_flags


# ----------------------------------------------------------------------------- flags and config files

@pytest.mark.parametrize("extra,expected", [
    (["--lr", "-1"], "--lr -1.0 must be > 0.0"),
    (["--lr", "nan"], "--lr nan must be > 0.0"),
    (["--lr_backbone", "-1"], "--lr_backbone -1.0 must be >= 0.0 (0 freezes the backbone)"),
    (["--weight_decay", "-1"], "--weight_decay -1.0 must be >= 0.0"),
    (["--num_workers", "-1"], "--num_workers -1 must be >= 0"),
    (["--min_size", "0"], "--min_size 0 must be >= 1"),
    (["--max_size", "0"], "--max_size 0 must be >= 1"),
    (["--nheads", "0"], "--nheads 0 must be >= 1"),
    (["--nheads", "3"], "--hidden_dim 64 is not divisible by --nheads 3"),
    (["--dropout", "1.5"], "--dropout 1.5 must be >= 0.0 and <= 1.0"),
    (["--eval_every", "0"], "--eval_every 0 must be >= 1"),
])
def test_numeric_flags_outside_their_domain(tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    code, err = cli([*TINY, "--output_dir", out, *extra], capsys)
    assert_one_line_error(code, err, expected)
    assert not out.exists()  # before any work


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1.0e-4\nepochs: [3\nbatch_size: 2\n")
    code, err = cli(["--config", path], capsys)
    assert_one_line_error(code, err, str(path), "malformed YAML at line 3")


def test_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1.0e-4\nepochs: 3\nlr: 2.0e-4\n")
    code, err = cli(["--config", config, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(config), "line 3", "key 'lr' appears twice (first at line 1)")


def test_two_stage_queries_that_cannot_fit_the_tokens_fail_at_start_up(tmp_path, capsys):
    from tests.helpers import TINY

    code, err = cli([*TINY, "--two_stage", "--num_queries_one2one", "400", "--min_size", "64", "--max_size", "64",
                     "--eval_size", "64"], capsys)
    # 64 px: 8x8 + 4x4 + 2x2 + 1x1 = 85 tokens
    assert_one_line_error(code, err, "--two_stage selects 400 queries", "has only 85")


def test_lr_drops_after_the_last_epoch_are_warned_about(capsys):
    from cli.config import parse_args

    parse_args(["--device", "cpu", "--epochs", "5", "--lr_drop_epochs", "3", "5", "8"])
    assert "--lr_drop_epochs 5 8: not before --epochs 5" in capsys.readouterr().out


# ----------------------------------------------------------------------------- paths and devices

def test_paths_are_checked_before_any_work(tmp_path, capsys):
    code, err = cli([*TINY, "--coco_path", tmp_path / "nowhere", "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "--coco_path", "nowhere", "not found")
    assert not (tmp_path / "out").exists()
    small_coco(str(tmp_path / "data"))
    os.rename(tmp_path / "data" / "train2017", tmp_path / "data" / "training")
    code, err = cli([*TINY, "--coco_path", tmp_path / "data"], capsys)
    assert_one_line_error(code, err, "train2017", "not found")
    validate_paths(main_module.parse_args([*TINY, "--coco_path", str(tmp_path / "data"), "--eval"]))  # val only
    (tmp_path / "file").write_text("")
    code, err = cli([*TINY, "--dataset_file", "synthetic", "--coco_path", tmp_path / "data2",
                     "--output_dir", tmp_path / "file" / "out"], capsys)
    assert_one_line_error(code, err, "--output_dir", "cannot be created", "is not a folder")


@pytest.mark.parametrize("impl,named", [("bogus", "expected one of auto, cuda, triton, pytorch"),
                                        ("triton", "MSDA_IMPL=triton"), ("cuda", "MSDA_IMPL=cuda")])
def test_an_unusable_msda_impl_is_one_line_before_anything_is_written(tmp_path, synthetic_dir, capsys, monkeypatch,
                                                                      impl, named):
    monkeypatch.setenv("MSDA_IMPL", impl)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "out"
    code, err = cli(synthetic_flags(synthetic_dir, out, "--epochs", "1"), capsys)
    assert_one_line_error(code, err, named)
    assert not out.exists()  # no config.yaml, no log.jsonl, no lock
