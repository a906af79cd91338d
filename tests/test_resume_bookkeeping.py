"""What a resumed run finds and keeps: the log cleaned of an interrupted epoch's records (past an
unreadable line too), stale temporary files removed, config.yaml without resume state and with the
schedule it continues, and an unfinished epoch finished, also through a symlinked folder."""
import json

import pytest

import main as main_module
from cli.config import config_dict
from tests.helpers import TINY
from tests.run_helpers import cli, synthetic_flags
from util.checkpoint import load_checkpoint
from util.logger import JsonlLogger, read_jsonl


# ----------------------------------------------------------------------------- the log

def test_log_keeps_each_epoch_once(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [{"type": "data", "split": "train"}, {"type": "train", "epoch": 0, "iter": 2},
             {"type": "epoch", "epoch": 0}, {"type": "train", "epoch": 1, "iter": 2},
             {"type": "error", "epoch": 1, "message": "x"}, {"type": "epoch", "epoch": 0},
             {"type": "train", "epoch": 1, "iter": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "train", "ep')  # cut by a kill
    logger = JsonlLogger(str(path))
    assert logger.drop_epochs_from(1) == (3, 1)  # epoch-1 records and a repeated epoch record; the cut line
    assert read_jsonl(str(path)) == [lines[0], lines[1], lines[2], lines[4]]
    assert logger.has_epoch_record(0) and not logger.has_epoch_record(1)
    assert logger.drop_epochs_from(1) == (0, 0)  # nothing more to remove


def test_an_invalid_utf8_byte_in_the_log_does_not_block_resuming(tmp_path, capsys):
    from util.logger import JsonlLogger, read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"type": "epoch", "epoch": 0}\n{"type": "train", "epoch": 1, "x": "\xff"}\n'
                     b'{"type": "train", "epoch": 1}\n')
    logger = JsonlLogger(str(path))
    assert logger.has_epoch_record(0)
    assert logger.drop_epochs_from(1) == (1, 1)  # one record of epoch 1, one unreadable line
    assert read_jsonl(str(path)) == [{"type": "epoch", "epoch": 0}]


def _drop_epoch_records(log):
    """The log as a kill after the checkpoint leaves it: the epoch record (written last) missing."""
    import json

    lines = [line for line in log.read_text().splitlines() if json.loads(line).get("type") != "epoch"]
    log.write_text("".join(line + "\n" for line in lines))


def test_a_symlinked_output_dir_finishes_the_unfinished_epoch(tmp_path, synthetic_dir, capsys):
    from util.logger import read_jsonl

    real, link = tmp_path / "real", tmp_path / "link"
    code, err = cli(synthetic_flags(synthetic_dir, real, "--epochs", "1", "--max_iters_per_epoch", "1"), capsys)
    assert code == 0, err
    _drop_epoch_records(real / "log.jsonl")
    link.symlink_to(real, target_is_directory=True)
    code, err = cli(synthetic_flags(synthetic_dir, link, "--epochs", "1", "--max_iters_per_epoch", "1",
                                    "--resume", real / "checkpoint.pth"), capsys)
    assert code == 0, err
    epochs = [r["epoch"] for r in read_jsonl(str(real / "log.jsonl")) if r.get("type") == "epoch"]
    assert epochs == [0]  # the tail of epoch 0 (evaluation, epoch record) was redone, once


# ----------------------------------------------------------------------------- the folder and config.yaml

def test_stale_temp_files_are_removed_at_start_up(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pth.abc123.tmp").write_bytes(b"x" * 1000)
    code, err, printed = cli(synthetic_flags(synthetic_dir, out, "--epochs", "0"), capsys, with_stdout=True)
    assert code == 0, err
    assert "removed 1 temporary files" in printed
    assert not (out / ".checkpoint.pth.abc123.tmp").exists()


def test_config_yaml_holds_no_resume_bookkeeping(tmp_path):
    args = main_module.parse_args([*TINY, "--resume", __file__, "--auto_resume"])
    config = config_dict(args)
    assert "resume" not in config and "auto_resume" not in config and config["hidden_dim"] == 64


def test_resume_with_another_lr_records_the_lr_it_trains_with(tmp_path, synthetic_dir, capsys):
    import yaml

    out = tmp_path / "out"
    flags = synthetic_flags(synthetic_dir, out, "--max_iters_per_epoch", "1", "--lr", "1e-4")
    code, err = cli([*flags, "--epochs", "1"], capsys)
    assert code == 0, err
    code, printed = cli([*flags, "--epochs", "2", "--auto_resume", "--lr", "5e-4"], capsys, with_stdout=True)[::2]
    assert code == 0
    assert "--lr 0.0005 is not used" in printed and "config.yaml records 0.0001" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-4
    assert load_checkpoint(str(out / "checkpoint.pth"))["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
