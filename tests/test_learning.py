"""The detector learns: a handful of synthetic images are overfitted to AP50 >= 0.9.

The budget is a number of epochs (about 2 minutes on an idle 2-core CPU), not a wall-clock limit:
timings belong to benchmarks (docs/design.md §8), and a loaded machine must not fail the test.
"""
import time

import pytest
import torch
from torch.utils.data import DataLoader

import datasets
import models
from engine import evaluate, train_one_epoch
from tests.helpers import TINY
from cli.config import parse_args
from util.optim import build_optimizer

MAX_EPOCHS = 80  # 2 iterations each
EVAL_EVERY = 10


@pytest.mark.slow
def test_overfits_a_handful_of_images(tmp_path):
    args = parse_args([*TINY, "--with_box_refine", "--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"),
                       "--synthetic_num_val", "8", "--synthetic_image_size", "128", "--min_size", "128",
                       "--max_size", "128", "--eval_size", "128", "--hidden_dim", "64", "--num_queries", "20",
                       "--lr", "1e-3", "--lr_backbone", "1e-3", "--clip_max_norm", "0.1", "--print_freq", "1000",
                       "--num_workers", "0", "--batch_size", "4"])
    args.num_classes = datasets.num_classes(args)
    torch.manual_seed(0)
    model, criterion, postprocessors = models.build_model(args)
    # the un-augmented split, used for training and evaluation alike: this is memorisation
    dataset = datasets.build_dataset("val", args)
    train_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=datasets.collate_fn,
                              generator=torch.Generator().manual_seed(0))
    eval_loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=datasets.collate_fn)
    base_ds = datasets.get_coco_api(dataset)
    optimizer = build_optimizer(model, args)
    device = torch.device("cpu")

    start, history = time.time(), []
    for epoch in range(1, MAX_EPOCHS + 1):
        train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, amp=args.amp,
                        clip_max_norm=args.clip_max_norm, print_freq=args.print_freq)
        if epoch % EVAL_EVERY == 0:
            stats = evaluate(model, postprocessors, eval_loader, base_ds, device, amp=args.amp,
                             print_freq=args.print_freq)
            history.append((epoch, round(time.time() - start), round(stats["AP50"], 3)))
            if stats["AP50"] >= 0.9:
                break
    assert history and history[-1][2] >= 0.9, f"AP50 (epoch, seconds, AP50): {history}"
