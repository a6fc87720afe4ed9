"""BOHB-style search (Falkner et al., 2018): TPE's proposals fitted on the values trials
reached at a rung of the early-stopping schedule (Hyperband's or ASHA's), not on final
values: the many trials stopped early teach the model as much as the few trained in full."""

from __future__ import annotations

from collections.abc import Sequence

from sweep_operator.early_stopping import arrival, rungs_of
from sweep_operator.objective import scorer
from sweep_operator.search.tpe import TpeSearch
from sweep_operator.space import searched
from sweep_operator.trials import ObservedTrial


class BohbSearch(TpeSearch):
    def budget(self, trials: Sequence[ObservedTrial]) -> int | None:
        """The highest rung that at least (searched dimensions + 1) trials reached, as in
        BOHB; None (final values) while no rung has enough trials."""
        spec = self.spec
        assert spec.early_stopping is not None  # the API requires it for bohb
        score = scorer(spec, trials)
        curves = [score.curve(t) for t in trials]
        last = max((c[-1].step for c in curves if c), default=0)
        needed = len(searched(spec.parameters)) + 1
        for rung in reversed(rungs_of(spec.early_stopping, last)):
            if sum(arrival(c, rung) is not None for c in curves) >= needed:
                return rung
        return None
