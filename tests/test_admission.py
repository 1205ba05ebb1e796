"""Issue 35, finding 12: a replica bounds the event posts that wait for Kafka at once
(serving/admission.py); beyond the bound a post is refused at once, never queued."""
from __future__ import annotations

import pytest

from serving.admission import Admission


def test_beyond_the_limit_a_caller_is_refused_until_a_place_is_given_back():
    gate = Admission(2)
    assert gate.enter() and gate.enter()
    assert not gate.enter() and not gate.enter()  # refused, not queued: nothing to give back
    assert gate.held == 2
    gate.leave()
    assert gate.enter() and not gate.enter()
    gate.leave()
    gate.leave()
    assert gate.held == 0 and gate.enter()


def test_a_leave_without_a_place_and_a_limit_below_one_are_errors():
    with pytest.raises(RuntimeError):
        Admission(1).leave()
    with pytest.raises(ValueError):
        Admission(0)

