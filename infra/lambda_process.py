"""One invocation of a handler in a forked child process under Lambda's memory size and timeout.

Lambda runs a function in a process it kills when the function's memory goes past its memory size or an
invocation runs past its timeout: the invocation returns nothing, and SQS makes all of its batch's messages
visible again after the visibility timeout. The local stack emulates that for the scoring function: each
invocation forks a child that runs the real handler, talking to the moto server over HTTP like the function would.
The parent watches the child (and any process the child starts, such as the pipeline's isolated decodes) and kills
it once the anonymous memory it has allocated since the fork (``RssAnon``, cheap to read, unlike a walk of its
pages) passes the memory size less the function's resting footprint, or once the timeout passes; the emulator
then treats the invocation as crashed. An address-space limit in the child keeps a runaway allocation from ever
hurting the machine.

What the handler changes in its own process stays in the child. The state the harness reads afterwards (the fault
plan's random generator and its counts of injected faults) travels back with the response, beside the state the
child started from, so invocations running at once (the emulator's concurrency) each add what they changed.
"""

from __future__ import annotations

import gc
import os
import pickle
import resource
import select
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scoring.isolated_decode import anonymous_bytes, process_status_bytes

Handler = Callable[[dict[str, Any], Any], Any]

RESTING_FOOTPRINT_MB = 125
"""Resident memory of the scoring function at rest after its first result (``make bench``: cold start peak RSS):
Lambda's memory size counts it, the forked child shares it with the harness."""

POLL_SECONDS = 0.02
"""How often the parent reads the child's memory: a bomb allocating 1 GB in less time than this can overshoot
the kill, never the safety limit."""


class InvocationKilledError(RuntimeError):
    """The invocation's process was killed, as Lambda kills it, past its memory size or timeout."""


@dataclass(frozen=True)
class LambdaLimits:
    """The function's memory size and timeout, as the template declares them."""

    memory_mb: int
    timeout_seconds: float

    @classmethod
    def from_template(cls, template: dict[str, Any], function: str = "ScoringFunction") -> LambdaLimits:
        """The function's ``MemorySize`` and ``Timeout`` (or the template's globals; Lambda's defaults else)."""
        defaults = template.get("Globals", {}).get("Function", {})
        properties = {**defaults, **template["Resources"][function]["Properties"]}
        return cls(
            memory_mb=int(properties.get("MemorySize", 128)), timeout_seconds=float(properties.get("Timeout", 3))
        )

    @property
    def added_bytes(self) -> int:
        """Memory an invocation may add to what the child inherited before it is killed."""
        return (self.memory_mb - RESTING_FOOTPRINT_MB) * 2**20


@dataclass
class SharedState:
    """State of the harness that the handler changes and the harness reads: exported by the parent as the child
    starts and by the child after the invocation; ``restore`` gets both (started, ended) in the parent."""

    export: Callable[[], Any]
    restore: Callable[[Any, Any], None]


@dataclass
class KillCounts:
    """Invocations killed so far, by cause."""

    memory: int = 0
    timeout: int = 0
    died: int = 0
    """Processes that ended without a report (an allocation past the safety limit while reporting)."""
    peak_added_mb: float = 0.0
    causes: list[str] = field(default_factory=list)


class LambdaProcess:
    """A handler whose every invocation runs in a forked child under ``limits``."""

    def __init__(
        self,
        handler: Handler,
        limits: LambdaLimits,
        state: SharedState | None = None,
        warm: Callable[[], None] | None = None,
    ) -> None:
        """``warm`` runs in the parent before each fork: what it loads (the model) every invocation inherits, as
        the invocations of one warm Lambda environment share it."""
        self._handler = handler
        self._limits = limits
        self._state = state
        self._warm = warm
        self._forking = threading.Lock()
        """Invocations may run at once (the emulator's concurrency); warming and forking take turns."""
        self._counting = threading.Lock()
        self.killed = KillCounts()

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        with self._forking:
            if self._warm is not None:
                self._warm()
            started = self._state.export() if self._state is not None else None
            read_end, write_end = os.pipe()
            inherited = anonymous_bytes(os.getpid())
            gc.freeze()  # The child's collections then leave the parent's objects (and their pages) untouched.
            with warnings.catch_warnings():
                # Forking with threads running (the moto server, the stream emulator) is what this harness means to
                # do: the child only runs the handler, which talks to the server over new connections.
                warnings.filterwarnings("ignore", message=".*fork", category=DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover  # The child; coverage of it is not collected.
                os.close(read_end)
                self._run_child(event, context, write_end)
            gc.unfreeze()
            os.close(write_end)
        try:
            payload, cause = self._watch(pid, read_end, inherited)
        finally:
            os.close(read_end)
            os.waitpid(pid, 0)
        if cause is not None:
            raise InvocationKilledError(f"the invocation's process was killed: {cause}")
        outcome, response, state = pickle.loads(payload)  # The child of this process wrote it, just now.
        if self._state is not None and state is not None:
            with self._counting:
                self._state.restore(started, state)
        if outcome != "returned":
            raise RuntimeError(f"the handler raised in its process:\n{response}")
        return response

    def _run_child(self, event: dict[str, Any], context: Any, write_end: int) -> None:
        """Run the handler under the safety limit; write (outcome, response or traceback, state); exit."""
        code = 0
        try:
            safety = process_status_bytes("VmSize") + 2 * self._limits.memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (safety, safety))
            try:
                result: tuple[str, Any] = ("returned", self._handler(event, context))
            except Exception:  # noqa: BLE001  # Any crash of the handler is reported to the emulator as one.
                result = ("raised", traceback.format_exc())
            state = self._state.export() if self._state is not None else None
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps((*result, state), protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException:  # noqa: BLE001  # Out of memory while reporting: the parent sees a dead process.
            code = 1
        os._exit(code)

    def _watch(self, pid: int, read_end: int, inherited: int) -> tuple[bytes, str | None]:
        """Read the child's report, killing it past the memory or time limit; the report and the kill's cause.
        ``inherited`` is the anonymous memory the child started with."""
        deadline = time.monotonic() + self._limits.timeout_seconds
        chunks: list[bytes] = []
        while True:
            added = _added_bytes(pid, inherited)
            cause = None
            with self._counting:
                self.killed.peak_added_mb = max(self.killed.peak_added_mb, added / 2**20)
                if added > self._limits.added_bytes:
                    self.killed.memory += 1
                    cause = f"memory past {self._limits.memory_mb} MB"
                elif time.monotonic() > deadline:
                    self.killed.timeout += 1
                    cause = f"timeout after {self._limits.timeout_seconds:g} s"
                if cause is not None:
                    self.killed.causes.append(cause)
            if cause is not None:
                _kill_tree(pid)
                return b"", cause
            ready, _, _ = select.select([read_end], [], [], POLL_SECONDS)
            if ready:
                chunk = os.read(read_end, 1 << 20)
                if not chunk:
                    payload = b"".join(chunks)
                    if not payload:
                        with self._counting:
                            self.killed.died += 1
                            self.killed.causes.append("the process died")
                        return payload, "the process died"
                    return payload, None
                chunks.append(chunk)


def _process_tree(pid: int) -> list[tuple[int, int]]:
    """``pid`` and every process it started and still running, each with the process that started it."""
    tree = [(pid, 0)]
    for member, _ in tree:
        children = Path(f"/proc/{member}/task/{member}/children")
        try:
            tree.extend((int(child), member) for child in children.read_text().split())
        except OSError:
            continue  # It has exited meanwhile.
    return tree


def _added_bytes(pid: int, inherited: int) -> int:
    """Anonymous memory the child has added since the fork, and each process it started beyond what that process
    inherited from its own parent (pages copied on write are counted where they were allocated)."""
    tree = _process_tree(pid)
    anonymous = {member: anonymous_bytes(member) for member, _ in tree}
    added = anonymous[pid] - inherited
    for member, parent in tree[1:]:
        added += max(0, anonymous[member] - anonymous.get(parent, 0))
    return max(0, added)


def _kill_tree(pid: int) -> None:
    """Kill the child and what it started, as Lambda ends the whole environment."""
    for member, _ in reversed(_process_tree(pid)):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            continue
