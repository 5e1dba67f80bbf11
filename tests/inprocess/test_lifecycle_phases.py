"""The server's phase moves forward only; what each phase lets through (readiness, admission)
is the one rule every reader uses. The end-to-end shutdown behaviour is in
test_reliability.py and test_server_process.py."""

from __future__ import annotations

import pytest

from visionserve.service.lifecycle import Lifecycle, Phase


def test_each_phase_says_whether_the_server_is_ready_and_admits_calls():
    lifecycle = Lifecycle()
    seen = []
    for phase in Phase:
        lifecycle.advance(phase)
        seen.append((phase, lifecycle.loading, lifecycle.ready, lifecycle.admitting))
    assert seen == [(Phase.LOADING, True, False, True), (Phase.SERVING, False, True, True),
                    (Phase.DRAINING, False, False, True), (Phase.STOPPING, False, False, False),
                    (Phase.STOPPED, False, False, False)]


def test_a_signal_during_the_initial_load_skips_serving_and_nothing_goes_back():
    lifecycle = Lifecycle()
    lifecycle.advance(Phase.DRAINING)
    assert not lifecycle.ready and lifecycle.admitting
    with pytest.raises(ValueError, match="cannot go back from draining to serving"):
        lifecycle.advance(Phase.SERVING)
