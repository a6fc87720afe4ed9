"""Deterministic trial names that always fit a Job name."""

from __future__ import annotations

import re

import pytest

from sweep_operator.naming import (
    MAX_TRIAL_NAME,
    experiment_name,
    label_value,
    service_name,
    trial_name,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A Service name: a DNS label that starts with a letter.
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_short_names_are_readable():
    assert trial_name("rank-lr", 3) == "rank-lr-0003"
    assert trial_name("rank-lr", 12345) == "rank-lr-12345"


def test_long_names_are_shortened_with_a_hash_and_stay_distinct():
    a = "a" * 60 + "-sweep-one"
    b = "a" * 60 + "-sweep-two"
    names = {trial_name(n, i) for n in (a, b) for i in range(3)}
    assert len(names) == 6
    for name in names:
        assert len(name) <= MAX_TRIAL_NAME and DNS_LABEL.match(name), name
    assert trial_name(a, 1) == trial_name(a, 1)  # deterministic
    assert trial_name(a, 1).endswith("-0001")


def test_boundary_length():
    fits = "s" * (MAX_TRIAL_NAME - 5)
    assert trial_name(fits, 0) == fits + "-0000"
    too_long = fits + "x"
    assert len(trial_name(too_long, 0)) <= MAX_TRIAL_NAME
    assert trial_name(too_long, 0) != too_long + "-0000"


def test_dotted_names_become_dns_labels_without_colliding():
    dotted, dashed = trial_name("my.sweep", 0), trial_name("my-sweep", 0)
    assert DNS_LABEL.match(dotted)
    assert dotted != dashed == "my-sweep-0000"


def test_negative_index():
    with pytest.raises(ValueError, match="trial index must be >= 0"):
        trial_name("s", -1)


def test_label_value_and_experiment_name():
    assert label_value("rank-lr") == "rank-lr"
    long = "x" * 100
    assert len(label_value(long)) <= 63
    assert experiment_name("ns", "rank-lr") == "ns/rank-lr"
    assert experiment_name("ns", "rank-lr", "custom") == "custom"


def test_service_name_is_a_dns_1035_label_of_at_most_63_characters():
    assert service_name("rank-lr") == "rank-lr-trials"
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = [service_name(n) for n in ("rank-lr", "1st-sweep", "my.sweep", long_a, long_b)]
    for name in names:
        assert len(name) <= 63 and DNS_1035_LABEL.match(name), name
    assert len(set(names)) == len(names)
    assert service_name(long_a) == service_name(long_a)  # deterministic
    assert service_name("1st-sweep") == "s-1st-sweep-trials"
