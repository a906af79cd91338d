"""Bad configurations stop with one clear line before any work; configs, presets and optimiser groups."""
import os
import subprocess
import sys

import pytest
import torch

import main as main_module
from tests.helpers import TINY, tiny_args
from cli.config import config_dict, get_args_parser, parse_args, resolve_config, save_config, validate_args
from util.optim import build_lr_scheduler, build_optimizer, build_param_groups, lr_drop_epochs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def _cli_error(argv, capsys):
    """Run main.cli; returns (exit code, stderr). argparse's own errors exit through SystemExit."""
    try:
        code = main_module.cli(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_yaml_key(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli_error(["--config", _write(tmp_path, "lr: 1.0e-4\nlearning_rate: 3\n"),
                            "--output_dir", str(out)], capsys)
    assert code == 2
    assert "unknown key 'learning_rate'" in err
    assert not out.exists()  # stopped before any work


def test_wrong_type_in_yaml(tmp_path, capsys):
    code, err = _cli_error(["--config", _write(tmp_path, "lr: fast\n")], capsys)
    assert code == 2 and "--lr" in err and "fast" in err
    code, err = _cli_error(["--config", _write(tmp_path, "with_box_refine: 1\n")], capsys)
    assert code == 2 and "with_box_refine" in err


def test_incompatible_flags(tmp_path, capsys):
    code, err = _cli_error(["--device", "cpu", "--mixed_selection"], capsys)
    assert code == 2 and "--mixed_selection needs --two_stage" in err
    code, err = _cli_error(["--device", "cpu", "--amp", "fp16"], capsys)
    assert code == 2 and "--amp fp16" in err
    code, err = _cli_error(["--stages", "3:3", "--enc_layers", "6"], capsys)
    assert code == 2 and "--stages" in err


def test_missing_config_file(capsys):
    code, err = _cli_error(["--config", "no/such/file.yaml"], capsys)
    assert code == 2 and "no/such/file.yaml" in err


def test_unknown_flag_exits_2_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--no_such_flag", "1",
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--no_such_flag" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["demo.yaml", "minitrain_r18.yaml", "minitrain_r18_two_stage.yaml"])
def test_shipped_configs_parse(name):
    args = parse_args(["--config", os.path.join(CONFIGS, name)])
    assert args.stages


def test_minitrain_uses_the_research_setting():
    args = parse_args(["--config", os.path.join(CONFIGS, "minitrain_r18_two_stage.yaml")])
    assert args.backbone == "resnet18" and args.train_ann == "instances_minitrain2017.json"
    assert args.min_size == [480] and args.two_stage and args.mixed_selection
    assert args.enc_layers == args.dec_layers == 6 and args.dim_feedforward == 2048 and args.dropout == 0.0
    assert args.epochs == 12 and args.lr_drop == 11 and args.batch_size == 4
    assert args.with_box_refine and args.look_forward_twice and args.use_ms_detr and args.use_aux_ffn
    assert (args.cls_loss_coef, args.o2m_cls_loss_coef, args.enc_cls_loss_coef) == (1.0, 2.0, 2.0)


def test_named_stage_schedules_follow_the_depth(capsys):
    assert parse_args(TINY + ["--variant", "v3.0.4"]).stages == "1:1,1:1"
    assert parse_args(TINY + ["--variant", "baseline"]).stages == "2:2"
    assert parse_args(TINY + ["--stages", "cascade", "--enc_layers", "3", "--dec_layers", "3"]).stages == "1:1,1:1,1:1"
    code, err = _cli_error(TINY + ["--stages", "cascade", "--enc_layers", "3"], capsys)
    assert code == 2 and "--stages cascade" in err and "--enc_layers (3)" in err


def test_config_yaml_roundtrip(tmp_path):
    args = parse_args(TINY + ["--variant", "v3.0.2", "--stages", "1:1,1:1", "--lr_drop_epochs", "8", "11", "--epochs", "12"])
    path = str(tmp_path / "config.yaml")
    save_config(args, path)
    again = parse_args(["--config", path])
    assert config_dict(again) == config_dict(args)
    # flags still win over the saved file
    assert parse_args(["--config", path, "--lr", "1e-3"]).lr == 1e-3


def test_resolved_configuration_is_read_only_and_complete():
    args = tiny_args("--stages", "cascade", "--lr_drop_epochs", "8", "11", "--resume", __file__, "--auto_resume",
                     num_classes=None)
    config = resolve_config(args, num_classes=7)
    assert config.num_classes == 7 and config.stages == "1:1,1:1" and config.lr_drop_epochs == (8, 11)
    assert args.num_classes is None  # the parsed flags are left as they were
    with pytest.raises(AttributeError, match="read-only"):
        config.num_classes = 3
    with pytest.raises(AttributeError, match="read-only"):
        del config.lr
    # exactly what config.yaml saves: every flag but where the run starts from
    flags = [a.dest for a in get_args_parser()._actions if a.dest != "help"]
    assert sorted(vars(config)) == sorted(set(flags) - {"config", "resume", "auto_resume", "unsafe_trust_checkpoint"})
    assert config_dict(config) == {**config_dict(args), "num_classes": 7}


def test_validation_leaves_the_flags_unchanged():
    """Named schedules are expanded by parsing; validate_args only checks (here: an unexpanded name)."""
    args = tiny_args()
    args.stages = "cascade"
    before = dict(vars(args))
    validate_args(args)
    assert vars(args) == before
    args.stages = "bogus"
    with pytest.raises(ValueError, match="--stages 'bogus'"):
        validate_args(args)


def _group(groups, name):
    return next(g for g in groups if g["name"] == name)


def test_param_groups_follow_upstream():
    import models

    args = tiny_args("--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_linear_proj_mult", "0.1")
    model, _, _ = models.build_model(args)
    groups = build_param_groups(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    backbone, proj, rest = (_group(groups, k) for k in ("backbone", "linear_proj", "default"))
    assert backbone["lr"] == 1e-4 and proj["lr"] == pytest.approx(1e-4) and rest["lr"] == 1e-3
    assert all(names[id(p)].startswith("backbone.0") for p in backbone["params"])
    assert all(("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]) for p in proj["params"])
    assert proj["params"] and rest["params"]
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == trainable  # each parameter in exactly one group

    frozen = tiny_args("--lr_backbone", "0")
    model, _, _ = models.build_model(frozen)
    assert all(g["name"] != "backbone" for g in build_param_groups(model, frozen))


def _lrs_per_epoch(opt, sched, epochs):
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # as in training: the optimiser steps before the scheduler
        sched.step()
    return lrs


def test_lr_schedules():
    model = torch.nn.Linear(2, 2)
    args = tiny_args("--epochs", "12", "--lr_drop", "5", "--lr", "1.0")
    opt = build_optimizer(model, args)
    lrs = _lrs_per_epoch(opt, build_lr_scheduler(opt, args), 12)
    assert lrs[:5] == [1.0] * 5 and lrs[5] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01)
    assert lr_drop_epochs(args) == [5, 10]

    args = tiny_args("--epochs", "12", "--lr_drop_epochs", "11", "8", "--lr", "1.0")
    opt = build_optimizer(model, args)
    lrs = _lrs_per_epoch(opt, build_lr_scheduler(opt, args), 12)
    assert lrs[7] == 1.0 and lrs[8] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.01)
    assert lr_drop_epochs(args) == [8, 11]


def test_every_flag_is_documented():
    undocumented = [a.option_strings[0] for a in get_args_parser()._actions
                    if a.option_strings and a.dest != "help" and not (a.help or "").strip()]
    assert undocumented == []


def test_flags_page_table_is_current():
    """docs/flags.md holds the table the parser generates (scripts/flags_table.py --check's default)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "flags_table.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(REPO, "docs", "flags.md")) as f:
        assert "`--enc_ref_mode`" in f.read()
