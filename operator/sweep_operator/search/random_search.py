"""Random search: trial i's parameters drawn from seeds of its own (`space.random_point`),
drawn again while over a memory limit (`constraints.drawn_parameters`)."""

from __future__ import annotations

from typing import Any

from sweep_operator.constraints import drawn_parameters
from sweep_operator.search.base import Suggester


class RandomSearch(Suggester):
    def fixed(self, index: int) -> dict[str, Any]:
        return drawn_parameters(self.spec, index)
