"""The soak's fault injection around the local stack's functions: a seeded fault plan, boto3 clients whose calls
fail at the plan's rates, decoders that exhaust memory on a marked file, and a handler that crashes half-way
through one invocation.

Only the soak (``infra.soak``) and the tests import this module: the local stack (``infra.local_stack``, behind
``pneumoscan local up``) carries none of it, and takes a ``FaultInjection`` through its ``interposer`` seam.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest.mock import patch

import numpy as np
from botocore.exceptions import ClientError

from core import preprocessing
from core.preprocessing import DecodedImage
from infra.corpus import MEMORY_HOG_MARKER, MEMORY_HOG_NAME
from infra.lambda_process import SharedState
from scoring import isolated_decode
from scoring import pipeline as pipeline_module

Handler = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True)
class FaultPlan:
    """Faults injected around the real handler: the soak test's schedule. All rates are per call or message."""

    get_object_failure_rate: float = 0.0
    put_item_throttle_rate: float = 0.0
    put_events_failure_rate: float = 0.0
    """Share of the result publisher's PutEvents calls that fail, so its batches are retried from the stream."""
    duplicate_rate: float = 0.0
    """Share of S3 notifications delivered twice, as separate SQS messages."""
    crash_on_invocation: int | None = None
    """This invocation handles half of its batch, then the handler crashes."""
    decoder_memory_hog: bool = False
    """Decoding a file that carries ``infra.corpus.MEMORY_HOG_MARKER`` allocates memory until its process is killed
    or refused more: a file whose decoding exceeds Lambda's memory in a way the decode budget does not foresee.
    Reads of the hog itself are never failed, so its first delivery always reaches the decoder."""
    seed: int = 0


class FaultInjectingClient:
    """A boto3 client whose named operations fail at the plan's rates (GetObject, PutItem, PutEvents)."""

    def __init__(
        self,
        client: Any,
        failures: dict[str, tuple[float, str]],
        rng: random.Random,
        spare: Callable[[dict[str, Any]], bool] = lambda arguments: False,
    ) -> None:
        """A call whose arguments ``spare`` accepts is never failed."""
        self._client = client
        self._failures = failures
        self._rng = rng
        self._spare = spare
        self.lock = threading.Lock()
        """Held while ``injected`` changes."""
        self.injected: dict[str, int] = dict.fromkeys(failures, 0)

    def __getattr__(self, name: str) -> Any:
        operation = getattr(self._client, name)
        if name not in self._failures:
            return operation
        rate, code = self._failures[name]

        def maybe_fail(**arguments: Any) -> Any:
            if self._spare(arguments):
                return operation(**arguments)
            with self.lock:
                fail = self._rng.random() < rate
                if fail:
                    self.injected[name] += 1
            if fail:
                raise ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, name)
            return operation(**arguments)

        return maybe_fail


class MemoryHoggingDecoders:
    """Replaces the scoring pipeline's decoders (in-process and isolated) with ones that exhaust memory on a file
    carrying ``MEMORY_HOG_MARKER``, and puts the real ones back."""

    def __init__(self) -> None:
        self._patches = [
            patch.object(module, "decode", _hogging(preprocessing.decode))
            for module in (pipeline_module, isolated_decode)
        ]

    def enter(self) -> None:
        for replacement in self._patches:
            replacement.start()

    def exit(self) -> None:
        for replacement in self._patches:
            replacement.stop()


def _hogging(decode: Callable[[bytes, int], DecodedImage]) -> Callable[[bytes, int], DecodedImage]:
    def run(data: bytes, size: int) -> DecodedImage:
        if MEMORY_HOG_MARKER in data:
            hog: list[np.ndarray] = []
            while True:  # Every page is written, so it is resident: until the process is killed or refused.
                hog.append(np.ones(32 * 2**20, dtype=np.uint8))
        return decode(data, size)

    return run


class CrashingHandler:
    """Runs the handler normally, except on one invocation: half the batch is handled, then it crashes."""

    def __init__(self, handler: Handler, crash_on_invocation: int) -> None:
        self._handler = handler
        self._crash_on = crash_on_invocation
        self.invocations = 0

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.invocations += 1
        if self.invocations != self._crash_on:
            return self._handler(event, context)
        half = {"Records": event["Records"][: len(event["Records"]) // 2]}
        self._handler(half, context)
        raise RuntimeError(f"injected crash in invocation {self.invocations}, after half of its batch")


def _restore_faults(rng: random.Random, clients: tuple[FaultInjectingClient, ...], started: Any, ended: Any) -> None:
    """Continue the fault plan where an invocation's process left it: its generator, and the faults it injected
    added to the counts (invocations running at once each add their own)."""
    (_, counts_at_start), (rng_state, counts_at_end) = started, ended
    rng.setstate(rng_state)
    for client, before, after in zip(clients, counts_at_start, counts_at_end, strict=True):
        with client.lock:
            for name, count in after.items():
                client.injected[name] += count - before.get(name, 0)


class FaultInjection:
    """A fault plan applied to the local stack's functions (``LocalStack(interposer=...)``): the S3, DynamoDB and
    EventBridge clients fail at the plan's rates, one invocation crashes, the decoders hog memory on the marked
    file; ``clients`` keeps the faulty clients, whose ``injected`` counts the soak reports."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.duplicate_rate = plan.duplicate_rate
        self.clients: list[FaultInjectingClient] = []
        self._scoring_clients: list[FaultInjectingClient] = []
        self._hog = MemoryHoggingDecoders() if plan.decoder_memory_hog else None

    def enter(self) -> None:
        """Put the plan's decoders in place (the stack starts)."""
        if self._hog is not None:
            self._hog.enter()

    def exit(self) -> None:
        """Put the real decoders back (the stack stops)."""
        if self._hog is not None:
            self._hog.exit()

    def client(self, operation_owner: str, service: str, client: Any) -> Any:
        """The client a function (``scoring`` or ``publisher``) gets for ``service``, failing at the plan's rate."""
        if (operation_owner, service) == ("scoring", "s3"):
            faulty = FaultInjectingClient(
                client,
                {"get_object": (self.plan.get_object_failure_rate, "SlowDown")},
                self.rng,
                # The memory hog's first delivery must reach the decoder, so the soak always has an invocation killed.
                spare=lambda arguments: arguments.get("Key", "").endswith(f"/{MEMORY_HOG_NAME}"),
            )
            self._scoring_clients.append(faulty)
        elif (operation_owner, service) == ("scoring", "dynamodb"):
            faulty = FaultInjectingClient(
                client,
                {"put_item": (self.plan.put_item_throttle_rate, "ProvisionedThroughputExceededException")},
                self.rng,
            )
            self._scoring_clients.append(faulty)
        elif (operation_owner, service) == ("publisher", "events"):
            faulty = FaultInjectingClient(
                client, {"put_events": (self.plan.put_events_failure_rate, "InternalException")}, self.rng
            )
        else:
            return client
        self.clients.append(faulty)
        return faulty

    def shared_state(self) -> SharedState:
        """The plan's state that an invocation's process changes (its generator and the scoring function's counts of
        injected faults), to bring back from the process."""
        clients = tuple(self._scoring_clients)
        return SharedState(
            export=lambda: (self.rng.getstate(), [dict(client.injected) for client in clients]),
            restore=lambda started, ended: _restore_faults(self.rng, clients, started, ended),
        )

    def scoring_handler(self, invoke: Handler) -> Handler:
        """The scoring handler as the stack invokes it: crashing on the plan's invocation, if any."""
        if self.plan.crash_on_invocation is None:
            return invoke
        return CrashingHandler(invoke, self.plan.crash_on_invocation)
