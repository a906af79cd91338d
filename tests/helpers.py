"""Small builders shared by the tests: tiny configurations and images."""
from typing import List

import torch

from cli.config import parse_args

TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
        "--nheads", "4", "--dim_feedforward", "128", "--enc_layers", "2", "--dec_layers", "2",
        "--num_queries_one2one", "12", "--num_feature_levels", "4", "--dropout", "0.0"]


def tiny_args(*extra: str, num_classes: int = 5):
    """Parsed and validated flags for a fast CPU model; ``extra`` flags override."""
    args = parse_args(TINY + list(extra))
    args.num_classes = num_classes
    return args


def two_padded_images(seed: int = 0) -> List[torch.Tensor]:
    """Two images of different sizes, so the batch has padding in both directions."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 96, 128, generator=g), torch.randn(3, 112, 80, generator=g)]


def simple_targets(num_classes: int = 5) -> List[dict]:
    """Targets for ``two_padded_images``: boxes cxcywh normalised, labels < num_classes, one empty-free pair."""
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([num_classes - 1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]])},
    ]


def one_epoch_smoke_flags(data_dir, output_dir, num_train: int = 8, num_val: int = 4) -> List[str]:
    """main.py flags for a 2-iteration, 1-epoch run of the tiny model on a small synthetic dataset."""
    return TINY + ["--with_box_refine", "--dataset_file", "synthetic", "--coco_path", str(data_dir),
                   "--synthetic_num_train", str(num_train), "--synthetic_num_val", str(num_val),
                   "--synthetic_image_size", "96", "--min_size", "96", "--max_size", "128",
                   "--no-random_crop", "--num_workers", "0", "--batch_size", "2", "--epochs", "1",
                   "--max_iters_per_epoch", "2", "--print_freq", "1", "--no-tensorboard",
                   "--output_dir", str(output_dir)]


class RecordingStops:
    """A stand-in for StopSignals that records the stop points reached."""

    requested = False

    def __init__(self):
        self.points = []

    def check(self, where, device):
        self.points.append(where)
