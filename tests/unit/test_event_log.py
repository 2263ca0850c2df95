"""The one log line each run transition writes: the shape operators grep for."""

import logging

import pytest

from outbound_heartbeat.calls import log_events
from outbound_heartbeat.records import Event


def test_an_event_without_a_worker_logs_a_dash_not_none(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outbound_heartbeat")
    log_events(
        [
            Event("call_timed_out", 2, 7, None, {"job_id": 38}),
            Event("stale_stopped", 1, 7, "dialer-1", {"jobs_failed": 3}),
        ]
    )
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        '[CALL] run 2 (business 7) call_timed_out worker=- {"job_id": 38}',
        '[STALE_DETECTION] run 1 (business 7) stale_stopped worker=dialer-1 {"jobs_failed": 3}',
    ]
    assert caplog.records[1].levelno == logging.WARNING
