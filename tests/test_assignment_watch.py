"""The bound on a group consumer's wait for partitions (pure timing logic)."""
from __future__ import annotations

import pytest

from recsys.kafka_io import AssignmentWatch, NoAssignment


def test_recreates_after_the_timeout_then_gives_up():
    watch = AssignmentWatch(timeout_s=30, attempts=2, now=0.0)
    assert not watch.observe(False, 29.9)
    assert watch.unassigned_for(29.9) == pytest.approx(29.9)
    assert watch.observe(False, 30.0)  # first recreation
    assert not watch.observe(False, 59.9)  # the new consumer gets its own 30 s
    assert watch.observe(False, 60.0)  # second recreation
    with pytest.raises(NoAssignment, match="no partitions assigned for 30 s, also after recreating the consumer 2"):
        watch.observe(False, 90.0)


def test_holding_partitions_resets_the_clock_and_the_attempts():
    watch = AssignmentWatch(timeout_s=10, attempts=1, now=0.0)
    assert watch.observe(False, 10.0)
    assert not watch.observe(True, 12.0)
    assert watch.unassigned_for(13.0) == 0.0
    assert not watch.observe(False, 20.0)  # lost its partitions at 20 s: a new wait starts
    assert not watch.observe(False, 29.0)
    assert watch.observe(False, 30.0)  # attempts were reset by the assignment
    with pytest.raises(NoAssignment):
        watch.observe(False, 40.0)


def test_zero_timeout_turns_the_bound_off():
    watch = AssignmentWatch(timeout_s=0, attempts=0, now=0.0)
    assert not watch.observe(False, 1e9)
