"""The probe set of the reference diagnostics: the first N validation images by image id.

The batches are built here by indexing the dataset in this process, not through a DataLoader:
creating a DataLoader iterator draws a base seed from torch's global generator, which would
shift the random numbers of everything after it. The evaluation transform still draws from
Python's ``random`` (``RandomResize`` over one size), so callers keep the generators untouched
with ``util.seeding.rng_untouched``.
"""
from typing import Iterator, List, Tuple

from util.nested_tensor import NestedTensor


def probe_indices(dataset, num_images: int) -> Tuple[List[int], str]:
    """(dataset indices of the ``num_images`` lowest image ids, a message or '').

    The message says when ``num_images`` exceeds the split, in which case the whole split is used.
    """
    ids = list(dataset.ids)
    order = sorted(range(len(ids)), key=lambda index: ids[index])
    message = ""
    if num_images > len(order):
        message = (f"--diag_images {num_images} is more than the {len(order)} validation images: "
                   f"the reference diagnostics use all {len(order)}")
    return order[:num_images], message


def probe_batches(dataset, indices: List[int], batch_size: int) -> Iterator[Tuple[NestedTensor, List[dict]]]:
    """Batches of ``batch_size`` images (evaluation transform, collated as the validation loader
    does: NestedTensor (B, 3, H, W) with a padding mask, list of targets), in ``indices`` order."""
    from datasets import collate_fn

    for start in range(0, len(indices), batch_size):
        yield collate_fn([dataset[index] for index in indices[start:start + batch_size]])
