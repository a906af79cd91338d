"""Small builders shared by the tests: tiny configurations and images."""
from typing import List

import torch

from util.config import parse_args

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
