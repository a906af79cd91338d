"""The data of a run: datasets, samplers and loaders, the class names, the one-line data summaries."""
from typing import Dict, Tuple

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from util.dist import say
from util.logger import JsonlLogger
from util.seeding import EpochRandomSampler, WorkerSeeder


def build_data(config, rank: int, distributed: bool, device: torch.device):
    """Datasets, samplers and loaders of this process (``rank``; ``distributed``: each process reads
    its share). Returns (train_loader, val_loader, train_sampler, seeder, base_ds); no training
    loader under --eval."""
    import datasets

    dataset_train = datasets.build_dataset("train", config) if not config.eval else None
    dataset_val = datasets.build_dataset("val", config)
    seeder = WorkerSeeder(config.seed, rank)
    pin_memory = device.type == "cuda"
    train_loader = train_sampler = None
    if dataset_train is not None:
        if distributed:
            train_sampler = DistributedSampler(dataset_train, shuffle=True, seed=config.seed)
        else:
            train_sampler = EpochRandomSampler(dataset_train, seed=config.seed)
        batches = BatchSampler(train_sampler, config.batch_size, drop_last=True)
        if len(batches) == 0:
            raise ValueError(f"the training set ({len(dataset_train)} images per process) is smaller than "
                             f"--batch_size {config.batch_size}")
        train_loader = DataLoader(dataset_train, batch_sampler=batches, collate_fn=datasets.collate_fn,
                                  num_workers=config.num_workers, worker_init_fn=seeder, pin_memory=pin_memory)
    val_sampler = DistributedSampler(dataset_val, shuffle=False) if distributed else SequentialSampler(dataset_val)
    val_loader = DataLoader(dataset_val, batch_size=config.batch_size, sampler=val_sampler, drop_last=False,
                            collate_fn=datasets.collate_fn, num_workers=config.num_workers, worker_init_fn=seeder,
                            pin_memory=pin_memory)
    return train_loader, val_loader, train_sampler, seeder, datasets.get_coco_api(dataset_val)


def class_names_of(loader: DataLoader) -> Dict[int, str]:
    """{category id: name} of the loader's annotation file (stored with every checkpoint)."""
    import datasets

    return datasets.class_names(loader.dataset)


def data_summaries(loaders, logger: JsonlLogger) -> None:
    """One line per split (images, annotations in the file, boxes training targets clip and drop), printed
    and logged. ``loaders``: [(split, loader or None)]."""
    import datasets

    for split, loader in loaders:
        if loader is None:
            continue
        summary = datasets.data_summary(loader.dataset, split)
        say(f"data {split}: {summary['images']} images, {summary['annotations']} annotations; as training "
            f"targets {summary['clipped_boxes']} boxes are clipped to their image and {summary['dropped_boxes']} "
            f"dropped as degenerate; evaluation scores the file as given ({summary['ann_file']})", flush=True)
        logger.write({"type": "data", **summary})


def count_parameters(model: torch.nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
