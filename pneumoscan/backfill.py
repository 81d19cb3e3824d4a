"""Backfill: enqueue every existing object under a prefix as a backfill request on the scoring queue, so the
same function scores it with the promoted model (a re-scoring keeps the earlier results as history).

The listing is paginated and resumable: after each batch of ten messages the last enqueued key is written to a
state file, and a new run with the same state file starts after it. Messages are sent at a bounded rate so a
backfill of millions of objects never starves fresh uploads of the function's reserved concurrency. A batch
that was sent but not recorded is sent again on resume; the function's conditional writes make that harmless.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from core.events import BackfillRequest

SQS_BATCH_LIMIT = 10
SEND_ATTEMPTS = 5


class BackfillError(RuntimeError):
    """The backfill cannot go on; the state file says where a new run resumes."""


class Progress(Protocol):
    """What the backfill reports progress to (a tqdm bar fits)."""

    def update(self, n: int) -> object: ...


@dataclass(frozen=True)
class BackfillPlan:
    """What to enqueue, where, and how fast."""

    bucket: str
    prefix: str
    queue_url: str
    model_version: str
    explain: bool = False
    messages_per_second: float = 50.0


@dataclass
class BackfillState:
    """Where a backfill stands; saved after every batch so a new run resumes after ``last_key``."""

    bucket: str
    prefix: str
    model_version: str
    last_key: str | None = None
    enqueued: int = 0
    finished: bool = False

    @classmethod
    def load_or_start(cls, path: Path, plan: BackfillPlan) -> BackfillState:
        """The saved state of this plan, or a fresh one; a state file of another plan is an error."""
        if not path.exists():
            return cls(plan.bucket, plan.prefix, plan.model_version)
        try:
            state = cls(**json.loads(path.read_text()))
        except (OSError, TypeError, ValueError) as error:
            raise BackfillError(f"cannot read the backfill state {path}: {error}") from error
        if (state.bucket, state.prefix, state.model_version) != (plan.bucket, plan.prefix, plan.model_version):
            raise BackfillError(
                f"{path} belongs to the backfill of s3://{state.bucket}/{state.prefix} with {state.model_version}; "
                "choose another --state file"
            )
        return state

    def save(self, path: Path) -> None:
        """Write atomically, so an interrupted run never leaves half a state file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(path)


@dataclass(frozen=True)
class ListedObject:
    key: str
    etag: str
    size: int


class RateLimiter:
    """Spaces calls so that no more than ``per_second`` items go out per second on average."""

    def __init__(
        self,
        per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("the rate must be positive")
        self._interval = 1.0 / per_second
        self._clock = clock
        self._sleep = sleep
        self._next = clock()

    def wait(self, items: int) -> None:
        """Block until ``items`` more may go out."""
        delay = self._next - self._clock()
        if delay > 0:
            self._sleep(delay)
        self._next = max(self._next, self._clock()) + items * self._interval


class Backfill:
    """Lists the prefix and sends one backfill request per object to the scoring queue."""

    def __init__(
        self,
        s3_client: Any,
        sqs_client: Any,
        plan: BackfillPlan,
        state_path: Path,
        *,
        limiter: RateLimiter | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._s3 = s3_client
        self._sqs = sqs_client
        self._plan = plan
        self._state_path = state_path
        self._limiter = limiter or RateLimiter(plan.messages_per_second)
        self._sleep = sleep

    def run(self, progress: Progress | None = None) -> BackfillState:
        """Enqueue every object after the saved position; returns the final state."""
        state = BackfillState.load_or_start(self._state_path, self._plan)
        if state.finished:
            return state
        batch: list[ListedObject] = []
        for listed in self._objects(state.last_key):
            batch.append(listed)
            if len(batch) == SQS_BATCH_LIMIT:
                self._send_and_record(batch, state, progress)
                batch = []
        if batch:
            self._send_and_record(batch, state, progress)
        state.finished = True
        state.save(self._state_path)
        return state

    def _objects(self, start_after: str | None) -> Iterator[ListedObject]:
        arguments: dict[str, Any] = {"Bucket": self._plan.bucket, "Prefix": self._plan.prefix}
        if start_after:
            arguments["StartAfter"] = start_after
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(**arguments):
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/") and item["Size"] == 0:
                        continue  # A console "folder" marker, not an upload.
                    yield ListedObject(item["Key"], str(item["ETag"]).strip('"'), int(item["Size"]))
        except (ClientError, BotoCoreError) as error:
            raise BackfillError(f"cannot list s3://{self._plan.bucket}/{self._plan.prefix}: {error}") from error

    def _send_and_record(self, batch: list[ListedObject], state: BackfillState, progress: Progress | None) -> None:
        self._limiter.wait(len(batch))
        self._send(batch)
        state.last_key = batch[-1].key
        state.enqueued += len(batch)
        state.save(self._state_path)
        if progress is not None:
            progress.update(len(batch))

    def _send(self, batch: list[ListedObject]) -> None:
        """Send one batch, re-sending the entries SQS did not take, with exponential back-off."""
        pending = {
            str(index): BackfillRequest(
                bucket=self._plan.bucket,
                key=listed.key,
                etag=listed.etag,
                size=listed.size,
                model_version=self._plan.model_version,
                explain=self._plan.explain,
            ).to_json()
            for index, listed in enumerate(batch)
        }
        why = ""
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                self._sleep(min(2.0**attempt * 0.1, 5.0))
            try:
                response = self._sqs.send_message_batch(
                    QueueUrl=self._plan.queue_url,
                    Entries=[{"Id": entry_id, "MessageBody": body} for entry_id, body in pending.items()],
                )
            except (ClientError, BotoCoreError) as error:
                why = str(error)
                continue
            failed = response.get("Failed", [])
            pending = {item["Id"]: pending[item["Id"]] for item in failed}
            if not pending:
                return
            why = "; ".join(f"{item.get('Code')}: {item.get('Message', '')}" for item in failed)
        raise BackfillError(f"the scoring queue refused messages after {SEND_ATTEMPTS} attempts: {why}")


def default_state_path(plan: BackfillPlan) -> Path:
    """A state file per bucket, prefix and model in the working directory."""
    safe_prefix = plan.prefix.strip("/").replace("/", "_") or "all"
    return Path(os.curdir) / ".pneumoscan-backfill" / f"{plan.bucket}--{safe_prefix}--{plan.model_version}.json"
