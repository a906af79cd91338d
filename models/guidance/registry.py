"""The one table of guidance parts: candidate sources (``--ref_source``) and ranking rules (``--ref_rank``).

Each part is registered here by name with what it reads and offers; the parser's choices and the
combination rules (``models/research_settings.py``) come from these entries, and the generator
(``models/enc_reference.py``) composes the two it is given. Adding a part is one function (in
``sources.py`` or ``rankings.py``) and one line below.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Generic, Tuple, TypeVar

from . import rankings, sources


@dataclass(frozen=True)
class Source:
    """A candidate source: ``make(decoder_state, num_queries_one2one, generator, inputs) -> CandidateSet``.

    predicted: the candidates are the decoder's predictions (class scores, gradient, --ref_queries);
    needs_targets: reads the ground truth (a control that cannot run as a detector).
    """
    name: str
    make: Callable
    predicted: bool = True
    needs_targets: bool = False


@dataclass(frozen=True)
class Ranking:
    """A ranking rule: ``rank(state, slots) -> (chosen (bs, T, S), valid (bs, T, S))``.

    modes: the --enc_ref_mode values it serves; reads_map: ranks by the cross-attention map;
    reads_scores: ranks by class score (needs a predicted source); per_query: candidates are
    queries (one per map column), not predictions; reads_seed: draws from the step's generator.
    """
    name: str
    rank: Callable
    modes: Tuple[str, ...] = ("per_point",)
    reads_map: bool = False
    reads_scores: bool = False
    per_query: bool = True
    reads_seed: bool = False


Part = TypeVar("Part")


class Registry(Generic[Part]):
    """Parts by name, in registration order (the parser lists them in that order)."""

    def __init__(self, flag: str, what: str):
        self.flag, self.what = flag, what
        self._parts: Dict[str, Part] = {}

    def register(self, part: Part) -> Part:
        if part.name in self._parts:
            raise ValueError(f"{self.what} '{part.name}' is registered twice")
        self._parts[part.name] = part
        return part

    def names(self) -> Tuple[str, ...]:
        return tuple(self._parts)

    def get(self, name: str) -> Part:
        """The part called ``name``; ValueError naming the flag and listing the choices otherwise."""
        if name not in self._parts:
            raise ValueError(f"--{self.flag}: unknown {self.what} {name!r}; choose from {', '.join(self._parts)}")
        return self._parts[name]


SOURCES: Registry[Source] = Registry("ref_source", "candidate source")
SOURCES.register(Source("decoder", sources.from_decoder))
SOURCES.register(Source("gt", sources.from_ground_truth, predicted=False, needs_targets=True))

RANKINGS: Registry[Ranking] = Registry("ref_rank", "ranking rule")
RANKINGS.register(Ranking("cls", rankings.by_class_score, modes=("per_level",), reads_scores=True, per_query=False))
RANKINGS.register(Ranking("attn", rankings.by_map_weight, reads_map=True))
RANKINGS.register(Ranking("attn_cls", rankings.by_map_weight_and_score, reads_map=True, reads_scores=True))
RANKINGS.register(Ranking("random", rankings.at_random, reads_seed=True))
RANKINGS.register(Ranking("distance", rankings.by_distance))
