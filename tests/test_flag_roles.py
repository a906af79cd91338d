"""Every flag declares its role where it is defined, and the roles alone decide how a run is held
against a checkpoint (issue 27, defect 1): checked here flag by flag, for every flag of the parser."""
import argparse

import pytest
import yaml

from cli.checkpoint_config import check_checkpoint_configuration, configuration_for_checkpoint
from cli.config import config_dict, get_args_parser, parse_args, resolve_config, roles_of_flags, save_config
from cli.roles import EVALUATION, MODEL, ROLES, RUN, SCHEDULE, START, TRAINING, flag_roles, with_roles
from tests.helpers import TINY
from util.errors import InputError

# the flags the issue found unchecked on resume (ref_eval_one2many aside), and the ones it found checked
UNCHECKED_BEFORE = ("ref_keep_self", "ref_queries", "ref_rank", "attn_map_accum", "enc_ref_progressive")
CHECKED_BEFORE = ("stages", "enc_ref_mode", "enc_n_points")


class _Other:
    """A value no flag has: whatever the flag, the checkpoint 'recorded another value'."""

    def __repr__(self):
        return "<other>"


def test_every_flag_declares_a_role():
    roles = flag_roles(get_args_parser())
    parser_flags = {a.dest for a in get_args_parser()._actions if a.dest != "help"}
    assert set(roles) == parser_flags
    assert set(roles.values()) <= set(ROLES)
    for name in UNCHECKED_BEFORE + CHECKED_BEFORE:
        assert roles[name] == MODEL, name
    assert roles["ref_grad"] == TRAINING  # only the gradient: the trained network computes the same
    assert roles["ref_eval_one2many"] == EVALUATION and roles["variant"] == EVALUATION
    assert roles["lr"] == SCHEDULE and roles["output_dir"] == RUN and roles["resume"] == START


def test_a_flag_without_a_role_is_refused():
    parser = get_args_parser()
    parser.add_argument("--new_idea", type=int, default=0)  # added the old way: no role
    with pytest.raises(ValueError, match="--new_idea declares no role"):
        flag_roles(parser)
    with pytest.raises(TypeError, match="role"):
        with_roles(argparse.ArgumentParser()).add_argument("--x")
    with pytest.raises(ValueError, match="unknown role 'architecture'"):
        with_roles(argparse.ArgumentParser()).add_argument("--x", role="architecture")


def _config(*extra):
    return resolve_config(parse_args(TINY + ["--variant", "v3.0.2", "--use_ms_detr", *extra]), num_classes=5)


@pytest.mark.parametrize("evaluating", [False, True], ids=["resume", "eval"])
def test_each_flag_is_compared_as_its_role_says(evaluating):
    """For every flag in turn, a checkpoint that recorded another value of it: refused (naming the
    flag and both values) exactly for the roles that must match; taken from the checkpoint for
    the roles it gives; else this run's value."""
    config = _config(*(["--eval"] if evaluating else []))
    must_match = {MODEL} if evaluating else {MODEL, TRAINING, EVALUATION}
    taken = {TRAINING, SCHEDULE} if evaluating else {SCHEDULE}
    for name, role in roles_of_flags().items():
        if role == START:
            continue  # never in a checkpoint's configuration
        saved = {**config_dict(config), name: _Other()}
        if role in must_match:
            with pytest.raises(InputError) as error:
                configuration_for_checkpoint(saved, config, "ckpt.pth", "--resume")
            message = str(error.value)
            assert f"--{name} " in message and "(checkpoint: <other>)" in message, (name, message)
            assert "\n" not in message
        else:
            value = getattr(configuration_for_checkpoint(saved, config, "ckpt.pth", "--resume"), name)
            assert isinstance(value, _Other) == (role in taken), (name, role)


def test_the_refusal_names_each_flag_with_both_values_and_the_way_out():
    config = _config("--variant", "v3.0.4")
    saved = config_dict(_config())  # v3.0.2
    with pytest.raises(InputError) as error:
        check_checkpoint_configuration(saved, config, "run/checkpoint.pth", "--resume", evaluating=False)
    message = str(error.value)
    assert "--ref_keep_self True (checkpoint: False)" in message
    assert "--variant v3.0.4 (checkpoint: v3.0.2)" in message
    assert "another --output_dir" in message and "--pretrained run/checkpoint.pth" in message
    # evaluating: the variant label may change, the model may not
    with pytest.raises(InputError) as error:
        check_checkpoint_configuration(saved, config.replace(eval=True), "run/checkpoint.pth", "--eval --resume",
                                       evaluating=True)
    message = str(error.value)
    assert "other model flags: --ref_keep_self True (checkpoint: False)." in message
    assert "--pretrained run/checkpoint.pth" in message


def test_eval_takes_the_training_flags_from_the_checkpoint(capsys):
    """They do not change what the trained network computes: an evaluation need not repeat them,
    and its config.yaml records the checkpoint's (seed included, which summaries pair runs by)."""
    saved = config_dict(_config("--seed", "3", "--cls_loss_coef", "1.0", "--max_iters_per_epoch", "7"))
    evaluated = configuration_for_checkpoint(saved, _config("--eval"), "c.pth", "--eval --resume")
    assert (evaluated.seed, evaluated.cls_loss_coef, evaluated.max_iters_per_epoch) == (3, 1.0, 7)
    assert "--seed 42 (checkpoint: 3)" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"--seed 42 \(checkpoint: 3\)"):
        configuration_for_checkpoint(saved, _config(), "c.pth", "--resume")


def test_ref_eval_one2many_may_change_for_eval_only():
    """The upstream-eval row: a v3.0.2 checkpoint evaluated with --no-ref_eval_one2many (or as
    --variant v3.0.2_upstream_eval) is allowed; training it on with that flag is not."""
    saved = config_dict(_config())
    upstream_eval = _config("--variant", "v3.0.2_upstream_eval", "--eval")
    assert configuration_for_checkpoint(saved, upstream_eval, "c.pth", "--eval --resume").ref_eval_one2many is False
    with pytest.raises(InputError, match=r"--ref_eval_one2many False \(checkpoint: True\)"):
        configuration_for_checkpoint(saved, _config("--no-ref_eval_one2many"), "c.pth", "--resume")


def test_schedule_flags_continue_from_the_checkpoint_and_run_flags_are_listed(capsys):
    saved = config_dict(_config("--lr", "1e-4", "--clip_max_norm", "0.5", "--batch_size", "4"))
    resumed = configuration_for_checkpoint(saved, _config("--lr", "5e-4", "--epochs", "9"), "c.pth", "--resume")
    assert resumed.lr == 1e-4 and resumed.clip_max_norm == 0.5  # the checkpoint's optimiser and schedule
    assert resumed.batch_size == 2 and resumed.epochs == 9        # run flags: this invocation's
    printed = capsys.readouterr().out
    assert "--lr 0.0005 is not used" in printed and "--clip_max_norm 0.1 is not used" in printed
    assert "--batch_size 2 (checkpoint: 4)" in printed and "--epochs 9 (checkpoint: 50)" in printed


def test_flags_a_checkpoint_does_not_record_are_not_compared():
    check_checkpoint_configuration({"hidden_dim": 64, "masks": True}, _config(), "c.pth", "--resume",
                                   evaluating=False)


def test_config_yaml_has_one_section_per_role_and_loads_back(tmp_path):
    config = _config("--lr_drop_epochs", "8", "11", "--epochs", "12")
    path = tmp_path / "config.yaml"
    save_config(config, str(path))
    text = path.read_text()
    headers = [line.split(":")[0][2:] for line in text.splitlines()[1:] if line.startswith("# ")]
    assert headers == [MODEL, TRAINING, EVALUATION, SCHEDULE, RUN]
    sections = text.split("\n# ")[1:]
    roles = roles_of_flags()
    for section in sections:
        role, _, body = section.partition(":")
        assert {roles[name] for name in yaml.safe_load(body.split("\n", 1)[1])} == {role}
    assert config_dict(parse_args(["--config", str(path)])) == config_dict(config)
