"""Running means under metric keys: the per-image partial sums of the diagnostics add up here."""
from typing import Dict, Iterable, Union

import torch

Number = Union[torch.Tensor, float]


def scoped_keys(name: str, *scopes: str) -> list:
    """'D4/off_image', 'enc0', 'lvl1' -> ['D4/off_image', 'D4/off_image/enc0', 'D4/off_image/enc0/lvl1']: a value
    counts towards its own scope and every wider one (the short key is the overall mean)."""
    return [name + "".join(f"/{scope}" for scope in scopes[:depth]) for depth in range(len(scopes) + 1)]


class Tally:
    """Sums and counts per key; ``means()`` reports total / count for keys whose count is positive.

    Values stay tensors (on the model's device) until ``means()``, so adding never synchronises.
    """

    def __init__(self):
        self._totals: Dict[str, Number] = {}
        self._counts: Dict[str, Number] = {}

    def add(self, keys: Iterable[str], total: Number, count: Number) -> None:
        """Add ``total`` over ``count`` items (scalars or 0-d tensors) to every key."""
        for key in keys:
            self._totals[key] = self._totals.get(key, 0.0) + total
            self._counts[key] = self._counts.get(key, 0.0) + count

    def add_values(self, keys: Iterable[str], values: torch.Tensor, defined: torch.Tensor = None) -> None:
        """Add the items of ``values`` (N,) where ``defined`` (N,) bool (all if None) to every key."""
        if defined is None:
            self.add(keys, values.float().sum(), values.numel())
        else:
            self.add(keys, torch.where(defined, values.float(), 0.0).sum(), defined.sum())

    def means(self) -> Dict[str, float]:
        """Plain python floats, sorted by key; keys without items (count 0) are left out."""
        out = {}
        for key in sorted(self._totals):
            count = float(self._counts[key])
            if count > 0:
                out[key] = float(self._totals[key]) / count
        return out
