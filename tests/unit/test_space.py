"""Grid expansion and seeded random sampling, and the search algorithms built on them."""

from __future__ import annotations

import itertools
import math
from typing import get_args

import pytest

from sweep_operator.api import Algorithm, ParameterSpec
from sweep_operator.search import ALGORITHMS, suggester
from sweep_operator.space import grid_point, grid_size, random_point
from tests.unit.sweep_helpers import make_spec


def values(**lists: list) -> dict[str, ParameterSpec]:
    return {name: ParameterSpec(values=v) for name, v in lists.items()}


def test_grid_is_the_product_over_sorted_names_last_varying_fastest():
    space = values(lora_rank=[8, 16, 32], learning_rate=[1e-4, 2e-4], bf16=[True, False])
    assert grid_size(space) == 12
    points = [grid_point(space, i) for i in range(12)]
    expected = [
        {"bf16": b, "learning_rate": lr, "lora_rank": r}
        for b, lr, r in itertools.product([True, False], [1e-4, 2e-4], [8, 16, 32])
    ]
    assert points == expected
    assert points[:3] == [
        {"bf16": True, "learning_rate": 1e-4, "lora_rank": 8},
        {"bf16": True, "learning_rate": 1e-4, "lora_rank": 16},
        {"bf16": True, "learning_rate": 1e-4, "lora_rank": 32},
    ]


def test_grid_order_does_not_depend_on_mapping_order():
    a = values(lora_rank=[8, 16], learning_rate=[1e-4, 2e-4])
    b = values(learning_rate=[1e-4, 2e-4], lora_rank=[8, 16])
    assert [grid_point(a, i) for i in range(4)] == [grid_point(b, i) for i in range(4)]


def test_grid_index_out_of_range():
    with pytest.raises(IndexError, match="grid index 4 out of range, the grid has 4 points"):
        grid_point(values(a=[1, 2], b=[1, 2]), 4)


def test_every_algorithm_the_api_accepts_has_a_suggester():
    names = get_args(Algorithm.model_fields["name"].annotation)
    assert sorted(ALGORITHMS) == sorted(names)


def test_grid_target_is_capped_by_max_trials():
    def target(spec):
        return len(suggester(spec).indices().indices)

    assert target(make_spec(maxTrials=None)) == 6
    assert target(make_spec(maxTrials=4)) == 4
    assert target(make_spec(maxTrials=100)) == 6


RANDOM_SPACE = {
    "lora_dropout": ParameterSpec(type="uniform", min=0.0, max=0.2),
    "weight_decay": ParameterSpec(type="log_uniform", min=1e-3, max=1e-1),
    "lora_rank": ParameterSpec(type="int", min=4, max=64, step=4),
    "lora_target": ParameterSpec(type="categorical", values=["all", "q_proj,v_proj"]),
    "cutoff_len": ParameterSpec(values=[512, 1024]),
}


def test_random_is_reproducible_and_seed_dependent():
    first = [random_point(RANDOM_SPACE, 42, i) for i in range(20)]
    again = [random_point(RANDOM_SPACE, 42, i) for i in range(20)]
    other = [random_point(RANDOM_SPACE, 43, i) for i in range(20)]
    assert first == again
    assert first != other
    assert len({str(p) for p in first}) == 20  # trials differ from each other


def test_random_trial_depends_only_on_seed_and_index():
    # Computing trial 7 alone, or after others, or in another order gives the same answer:
    # a restart or a larger maxTrials never reshuffles earlier trials.
    alone = random_point(RANDOM_SPACE, 5, 7)
    [random_point(RANDOM_SPACE, 5, i) for i in reversed(range(30))]
    assert random_point(RANDOM_SPACE, 5, 7) == alone
    small = make_spec(
        algorithm={"name": "random", "seed": 5},
        maxTrials=3,
        parameters={"lora_dropout": {"type": "uniform", "min": 0, "max": 0.2}},
    )
    large = small.model_copy(update={"max_trials": 50})
    assert [suggester(small).fixed(i) for i in range(3)] == [
        suggester(large).fixed(i) for i in range(3)
    ]


def test_adding_a_parameter_keeps_the_others_draws():
    fewer = {k: v for k, v in RANDOM_SPACE.items() if k != "cutoff_len"}
    for i in range(10):
        with_all = random_point(RANDOM_SPACE, 1, i)
        del with_all["cutoff_len"]
        assert random_point(fewer, 1, i) == with_all


def test_random_values_stay_in_their_ranges():
    points = [random_point(RANDOM_SPACE, 0, i) for i in range(500)]
    for p in points:
        assert 0.0 <= p["lora_dropout"] <= 0.2
        assert 1e-3 <= p["weight_decay"] <= 1e-1
        assert p["lora_rank"] in range(4, 65, 4) and isinstance(p["lora_rank"], int)
        assert p["lora_target"] in ("all", "q_proj,v_proj")
        assert p["cutoff_len"] in (512, 1024)
        for name in ("lora_dropout", "weight_decay"):  # 6 significant digits
            assert p[name] == float(f"{p[name]:.6g}")
    # Every int step and both ends are reachable; log_uniform spreads over the decades.
    assert {p["lora_rank"] for p in points} == set(range(4, 65, 4))
    decades = {math.floor(math.log10(p["weight_decay"])) for p in points}
    assert decades == {-3, -2}


def test_random_target_is_max_trials():
    spec = make_spec(algorithm={"name": "random", "seed": 1}, maxTrials=25)
    assert list(suggester(spec).indices().indices) == list(range(25))
    assert suggester(spec).fixed(24) == random_point(spec.parameters, 1, 24)


def test_tpe_fixes_its_startup_trials_and_leaves_the_rest_to_the_model():
    spec = make_spec(algorithm={"name": "tpe", "seed": 1, "startupTrials": 3}, maxTrials=10)
    tpe = suggester(spec)
    assert tpe.fixed(2) == random_point(spec.parameters, 1, 2)
    assert tpe.fixed(3) is None
    # A warm start's trials stand in for startup trials: here all of them.
    assert suggester(spec, warm_trials=3).fixed(0) is None
