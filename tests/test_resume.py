"""--resume is exact: 2 epochs straight == 1 epoch, stop, resume, 1 more epoch (same final weights)."""
import pytest
import torch

import main as main_module
from tests.helpers import TINY
from util.checkpoint import load_checkpoint
from cli.config import parse_args
from util.errors import InputError


def _flags(data_dir, out, *extra):
    return [*TINY, "--with_box_refine", "--dataset_file", "synthetic", "--coco_path", str(data_dir),
            "--synthetic_num_train", "8", "--synthetic_num_val", "2", "--synthetic_image_size", "96",
            "--min_size", "80", "96", "--max_size", "128", "--batch_size", "2", "--max_iters_per_epoch", "3",
            "--print_freq", "2", "--lr_drop", "1", "--seed", "7", "--no-tensorboard", "--output_dir", str(out),
            *extra]


def _run(argv):
    main_module.main(parse_args(argv))


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_resume_matches_straight_run(tmp_path, num_workers):
    data = tmp_path / "data"
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    _run(_flags(data, straight, "--epochs", "2", "--num_workers", num_workers))
    _run(_flags(data, first, "--epochs", "1", "--num_workers", num_workers))
    _run(_flags(data, resumed, "--epochs", "2", "--num_workers", num_workers,
                "--resume", str(first / "checkpoint.pth")))

    a = load_checkpoint(str(straight / "checkpoint.pth"))
    b = load_checkpoint(str(resumed / "checkpoint.pth"))
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ after resuming: {different[:5]}"
    assert a["lr_scheduler"] == b["lr_scheduler"]
    # the first run really trained: the weights moved away from the resumed run's start
    start = load_checkpoint(str(first / "checkpoint.pth"))["model"]
    assert any(not torch.equal(start[k], b["model"][k]) for k in start)


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path):
    data = tmp_path / "data"
    _run(_flags(data, tmp_path / "a", "--epochs", "1", "--num_workers", "0"))
    # the checkpoint records its flags: the error names the one that differs, before any load
    with pytest.raises(InputError, match=r"other experiment-defining flags: --two_stage True \(checkpoint: False\)"):
        _run(_flags(data, tmp_path / "b", "--epochs", "2", "--num_workers", "0", "--two_stage",
                    "--resume", str(tmp_path / "a" / "checkpoint.pth")))
