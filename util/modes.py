"""Train/eval flags of a module tree, kept across a block that switches them."""
import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards, each its own (a model that was partly in
    eval mode comes back so): for passes that run the model in eval mode in the middle of training."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
