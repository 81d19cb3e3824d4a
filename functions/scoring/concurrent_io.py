"""Running one batch's S3 and DynamoDB calls a few at a time on threads (boto3 clients are thread-safe).

A pool lives for one batch only: a process forked later (the isolated decodes, the local stack's invocations)
never inherits its threads, and nothing outlives the invocation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

_T = TypeVar("_T")


def outcome(call: Callable[[], _T]) -> _T | Exception:
    """The call's value, or the fault it raised."""
    try:
        return call()
    except Exception as fault:  # noqa: BLE001  # Handed back to the caller, which raises it for its record only.
        return fault


@contextmanager
def io_pool(max_workers: int, calls: int) -> Iterator[Callable[[Callable[[], _T]], Callable[[], _T | Exception]]]:
    """A ``submit`` for up to ``calls`` calls, at most ``max_workers`` at once: it starts a call and gives back a
    function that waits for its value or fault. With one worker each call runs when submitted, on the calling
    thread. Leaving the block waits for every call."""
    workers = min(max_workers, calls)
    if workers <= 1:

        def now(call: Callable[[], _T]) -> Callable[[], _T | Exception]:
            result = outcome(call)
            return lambda: result

        yield now
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pneumoscan-io") as pool:

        def later(call: Callable[[], _T]) -> Callable[[], _T | Exception]:
            return pool.submit(outcome, call).result

        yield later


def run_all(calls: Sequence[Callable[[], _T]], max_workers: int) -> list[_T | Exception]:
    """Each call's value, or the fault it raised, in the calls' order; at most ``max_workers`` run at once (1: each
    in turn, on the calling thread)."""
    with io_pool(max_workers, len(calls)) as submit:
        pending = [submit(call) for call in calls]
        return [wait() for wait in pending]
