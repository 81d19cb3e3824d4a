"""A short soak on the local stack: uploads, hostile files and injected faults, nothing lost or double-counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.fault_injection import FaultPlan
from infra.soak import print_report, run_burst, run_soak
from tests.conftest import RELEASE_MODEL, SAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.soak]


def test_short_soak_loses_nothing(data_root: Path) -> None:
    """150 uploads plus the corpus (decode-cost bombs and truncated films among them), each invocation in a process
    under the function's memory size and timeout, one file whose decoding exhausts memory, and faults three times
    as frequent as in the full soak: every upload ends right, no film sharing a batch with a bomb loses its result,
    and every result reaches a subscriber of the results bus."""
    faults = FaultPlan(
        get_object_failure_rate=0.15,
        put_item_throttle_rate=0.15,
        put_events_failure_rate=0.15,
        duplicate_rate=0.2,
        crash_on_invocation=3,
        decoder_memory_hog=True,
        seed=5,
    )
    report = run_soak(
        data_root, RELEASE_MODEL, SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg", uploads=150, faults=faults
    )
    print_report(report)
    assert report.problems == ()
    assert report.lost == 0
    assert report.duplicated_results == 0
    assert report.invocations_killed >= 1  # The memory hog's first invocation, killed past the memory size.
    assert report.handler_crashes == 1 + report.invocations_killed
    assert report.films_sharing_a_batch_with_a_bomb > 0
    assert report.films_lost_to_a_bomb == 0
    assert report.messages_killed_twice == 0
    assert report.injected_get_object_faults > 0
    assert report.injected_put_item_faults > 0
    assert report.duplicates_sent > 0
    assert report.injected_put_events_faults > 0
    assert report.results_without_event == 0
    assert report.heatmaps > 0
    assert report.scored + report.rejected + report.in_dlq >= report.uploads


def test_a_burst_under_a_concurrency_cap_dead_letters_nothing() -> None:
    """200 films uploaded at once to a scoring function capped at 2 concurrent invocations, on an account with 2:
    the poller never invokes beyond the cap (no throttle, no redelivery), the backlog waits in the queue, and every
    film is scored exactly once with nothing in the dead-letter queue (make soak runs 2,000)."""
    report = run_burst(SAMPLES, RELEASE_MODEL, uploads=200, maximum_concurrency=2, account_concurrency=2)
    print_report(report)
    assert report.problems == ()
    assert (report.scored, report.in_dlq, report.lost, report.duplicated_results) == (200, 0, 0, 0)
    assert report.throttled_invocations == 0
    assert report.redelivered_messages == 0
    assert report.peak_concurrency <= 2
