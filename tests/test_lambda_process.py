"""The local stack's Lambda process: an invocation runs in a forked child and is killed, as Lambda kills it, past
the function's memory size or timeout; what the harness reads comes back from the child."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import pytest

from infra.lambda_process import (
    RESTING_FOOTPRINT_MB,
    InvocationKilledError,
    LambdaLimits,
    LambdaProcess,
    SharedState,
)
from infra.template import load_template

SMALL = LambdaLimits(memory_mb=RESTING_FOOTPRINT_MB + 96, timeout_seconds=2.0)
"""An invocation may add 96 MB and run for 2 s."""


def test_limits_come_from_the_template() -> None:
    """The scoring function's memory size and timeout are the template's."""
    properties = load_template()["Resources"]["ScoringFunction"]["Properties"]
    limits = LambdaLimits.from_template(load_template())
    assert (limits.memory_mb, limits.timeout_seconds) == (properties["MemorySize"], properties["Timeout"])


def test_invocation_returns_the_handlers_response() -> None:
    """A handler within its limits answers as it would in-process."""
    process = LambdaProcess(lambda event, context: {"batchItemFailures": event["Records"]}, SMALL)
    assert process({"Records": ["a"]}, None) == {"batchItemFailures": ["a"]}


def test_invocation_past_the_memory_size_is_killed() -> None:
    """A handler that keeps allocating is killed once it has added more than the memory size allows."""

    def hog(event: dict[str, Any], context: Any) -> None:
        held = [np.ones(16 * 2**20, dtype=np.uint8) for _ in range(64)]
        raise AssertionError(f"not killed after {len(held) * 16} MB")

    process = LambdaProcess(hog, SMALL)
    with pytest.raises(InvocationKilledError, match="memory"):
        process({}, None)
    assert process.killed.memory == 1


def test_invocation_past_the_timeout_is_killed() -> None:
    """A handler that runs past the timeout is killed then, not waited for."""
    process = LambdaProcess(lambda event, context: time.sleep(30), SMALL)
    started = time.monotonic()
    with pytest.raises(InvocationKilledError, match="timeout"):
        process({}, None)
    assert time.monotonic() - started < SMALL.timeout_seconds + 2
    assert process.killed.timeout == 1


def test_handler_exception_is_a_crash() -> None:
    """A handler that raises crashes the invocation, as an unhandled exception fails a Lambda invocation."""

    def broken(event: dict[str, Any], context: Any) -> None:
        raise ValueError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        LambdaProcess(broken, SMALL)({}, None)


def test_shared_state_comes_back_from_the_child() -> None:
    """The state the harness reads (a fault plan's generator) continues where the invocation left it."""
    rng = random.Random(3)
    expected = random.Random(3)
    expected.random()
    state = SharedState(export=rng.getstate, restore=lambda started, ended: rng.setstate(ended))
    LambdaProcess(lambda event, context: rng.random(), SMALL, state)({}, None)
    assert rng.random() == expected.random()
