"""Search algorithms, one module each behind `Suggester` (base.py), chosen by
spec.algorithm.name. The planner asks them which trials a sweep runs and with what
parameters, and never branches on the algorithm itself."""

from __future__ import annotations

from sweep_operator.api import SweepSpec
from sweep_operator.search.base import Suggester
from sweep_operator.search.bohb import BohbSearch
from sweep_operator.search.grid import GridSearch
from sweep_operator.search.random_search import RandomSearch
from sweep_operator.search.tpe import TpeSearch

ALGORITHMS: dict[str, type[Suggester]] = {
    "grid": GridSearch,
    "random": RandomSearch,
    "tpe": TpeSearch,
    "bohb": BohbSearch,
}


def suggester(spec: SweepSpec, warm_trials: int = 0) -> Suggester:
    """The search algorithm of spec.algorithm.name; `warm_trials`: how many trials of earlier
    sweeps a warm start hands it."""
    return ALGORITHMS[spec.algorithm.name](spec, warm_trials)


__all__ = ["ALGORITHMS", "Suggester", "suggester"]
