"""What every search algorithm answers for the planner, whatever it searches with."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from sweep_operator.api import SweepSpec
from sweep_operator.constraints import (
    ConstraintError,
    TrialIndices,
    check_estimable,
    drawn_parameters,
)
from sweep_operator.trials import ObservedTrial


class Suggester(ABC):
    """The search algorithm of one sweep: which trial indices it runs and their parameters.

    Trials are identified by index, and the planner re-plans from what is in the cluster on
    every reconcile: an algorithm must give the same answers for the same spec and history,
    before and after an operator restart. `warm_trials` is how many trials of earlier sweeps a
    warm start hands the model (spec.algorithm.warmStart).
    """

    def __init__(self, spec: SweepSpec, warm_trials: int = 0) -> None:
        self.spec = spec
        self.warm_trials = warm_trials

    def indices(self) -> TrialIndices:
        """The indices of the sweep's trials in order: 0 to maxTrials - 1 unless the algorithm
        passes some over."""
        assert self.spec.max_trials is not None  # the API requires it but for grid
        return TrialIndices(indices=range(self.spec.max_trials), skipped=0)

    @abstractmethod
    def fixed(self, index: int) -> dict[str, Any] | None:
        """The parameters of trial `index` (derived ones included) when they follow from the
        spec and the index alone; None when the model proposes them from earlier results."""

    def propose(
        self,
        index: int,
        history: Sequence[ObservedTrial],
        prior: Sequence[ObservedTrial] = (),
    ) -> dict[str, Any]:
        """The parameters of new trial `index`, given the sweep's trials so far (the active
        ones included) and a warm start's trials of earlier sweeps (`prior`)."""
        parameters = self.fixed(index)
        assert parameters is not None, f"{type(self).__name__} proposes from the index alone"
        return parameters

    def mismatch(self, trial: ObservedTrial) -> str | None:
        """Why an existing trial's parameters cannot be this algorithm's trial at its index
        (the spec changed after the sweep started), or None when they can."""
        try:
            expected = self.fixed(trial.index)
        except ConstraintError as error:
            return f"which are not in the current search space ({error})"
        if expected != trial.parameters:
            return f"but the current search space gives {expected} for index {trial.index}"
        return None

    def first(self) -> tuple[int, dict[str, Any]]:
        """Index and parameters of the sweep's first trial, for a dry run before any Job
        exists (a random draw stands in for a model's proposal); raises ConstraintError where
        the constraints leave no configuration or the estimate cannot read a setting."""
        check_estimable(self.spec)
        index = self.indices().indices[0]
        return index, self.fixed(index) or drawn_parameters(self.spec, index)
