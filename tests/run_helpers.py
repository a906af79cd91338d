"""Running main.py and the scripts in this process as a user runs them (exit code, the one line on
stderr) on tiny checkpoints and data: what the tests of checkpoints, locks, signals, data checks,
resuming and the scripts' inputs share."""
import torch

import main as main_module
from cli.config import config_dict
from tests.helpers import TINY, tiny_args
from tests.test_datasets import ann, rectangle_image, write_coco
from util.checkpoint import atomic_save, load_checkpoint
from util.optim import build_optimizer


def cli(argv, capsys, with_stdout=False):
    """(exit code, stderr[, stdout]) of main.cli; argparse's own errors exit through SystemExit."""
    try:
        code = main_module.cli([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return (code, captured.err, captured.out) if with_stdout else (code, captured.err)


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def small_coco(root, train_anns=None, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"})):
    """A 2-image train and 1-image val split of 32x32 images with one box each under ``root``."""
    images = [(i, rectangle_image(32, 32, (4, 4, 20, 20)), (32, 32)) for i in (1, 2)]
    anns = train_anns if train_anns is not None else [ann(1, (4, 4, 16, 16)), ann(2, (4, 4, 16, 16), 2)]
    train = write_coco(root, images, anns, categories=categories, split="train")
    val = write_coco(root, images[:1], [ann(1, (4, 4, 16, 16))], categories=categories, split="val")
    return train, val


def coco_flags(root, out, *extra):
    return [str(a) for a in [*TINY, "--dataset_file", "coco", "--coco_path", root, "--num_classes", "3",
            "--min_size", "32", "--max_size", "32", "--no-random_crop", "--num_workers", "0", "--batch_size", "1",
            "--epochs", "1", "--max_iters_per_epoch", "2", "--no-tensorboard", "--output_dir", out, *extra]]


def synthetic_flags(data_dir, out, *extra):
    return [*TINY, "--dataset_file", "synthetic", "--coco_path", data_dir, "--synthetic_num_train", "4",
            "--synthetic_num_val", "2", "--synthetic_image_size", "64", "--min_size", "64", "--max_size", "64",
            "--no-random_crop", "--num_workers", "0", "--batch_size", "2", "--no-tensorboard", "--output_dir", out,
            *extra]


def tiny_checkpoint(path, *extra):
    """A training-style checkpoint of a freshly built tiny model (no training needed)."""
    import models

    args = tiny_args(*extra, num_classes=7)
    model, _, _ = models.build_model(args)
    optimizer = build_optimizer(model, args)
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                 "lr_scheduler": {}, "args": config_dict(args)}, str(path))
    return model


class _OpensAFile:
    """Unpickling this object calls ``open(marker, 'w')``: the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_running_checkpoint(path, marker):
    model = tiny_checkpoint(path)  # a real checkpoint, then the same with one poisoned entry
    state = load_checkpoint(str(path))
    state["payload"] = _OpensAFile(marker)
    torch.save(state, str(path))
    return model


def synthetic_model_flags(data_dir):
    """The synthetic data flags a checkpoint records, so that the scripts' probe and images need no others."""
    return ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--synthetic_num_train", "4",
            "--synthetic_num_val", "2", "--synthetic_image_size", "64", "--min_size", "64", "--max_size", "64",
            "--no-random_crop"]


def run_script(capsys, script_main, argv):
    """(exit code, stderr) of a script's main(argv)."""
    try:
        code = script_main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err
