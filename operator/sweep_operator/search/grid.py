"""Grid search: every point of the grid in the documented order (`space.grid_point`); with a
memory limit, the points that fit, each under its own grid index."""

from __future__ import annotations

import itertools
from typing import Any

from sweep_operator.api import SweepSpec
from sweep_operator.constraints import (
    NoFeasibleConfiguration,
    TrialIndices,
    check_estimable,
    fitting_grid_indices,
    memory_limit,
    smallest_grid_estimate,
    too_big,
)
from sweep_operator.search.base import Suggester
from sweep_operator.space import grid_size, grid_trial
from sweep_operator.trials import ObservedTrial


class GridSearch(Suggester):
    def __init__(self, spec: SweepSpec, warm_trials: int = 0) -> None:
        super().__init__(spec, warm_trials)
        self.size = grid_size(spec.parameters)  # each trial's index is checked against it

    def indices(self) -> TrialIndices:
        """Every point (the first maxTrials); with a memory limit, the points that fit, and how
        many were passed over."""
        size = self.size
        target = size if self.spec.max_trials is None else min(size, self.spec.max_trials)
        if memory_limit(self.spec) is None:
            return TrialIndices(indices=range(target), skipped=0)
        indices = list(itertools.islice(fitting_grid_indices(self.spec), target))
        if len(indices) < target:  # every point was looked at
            return TrialIndices(indices=indices, skipped=size - len(indices))
        return TrialIndices(indices=indices, skipped=indices[-1] + 1 - len(indices))

    def fixed(self, index: int) -> dict[str, Any]:
        return grid_trial(self.spec, index)

    def mismatch(self, trial: ObservedTrial) -> str | None:
        if not 0 <= trial.index < self.size:
            return f"but the current grid has no index {trial.index}"
        return super().mismatch(trial)

    def first(self) -> tuple[int, dict[str, Any]]:
        check_estimable(self.spec)
        run = self.indices()
        if not run.indices:
            smallest = smallest_grid_estimate(self.spec)
            raise NoFeasibleConfiguration(too_big(self.spec, smallest, "no point of the grid"))
        return run.indices[0], self.fixed(run.indices[0])
