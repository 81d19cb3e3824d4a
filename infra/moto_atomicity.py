"""Moto's DynamoDB writes made atomic, as DynamoDB's are, for writers on several threads.

DynamoDB checks a write's condition and applies it atomically, and gives every stream record its own sequence
number. Moto does neither under concurrency: its backend checks a condition, then writes, and numbers a stream
record by the length of the shard's list before appending to it, so two concurrent writes can both pass
``attribute_not_exists`` or share a sequence number (and the stream emulator would hand the publisher two records
under one number, losing an event). The scoring function writes a batch's results concurrently, so every moto
data plane (the local stack's server, ``mock_aws`` in tests) first serializes moto's item writes with one lock.
The lock holds only moto's own bookkeeping: callers' requests (and any latency a bench models) still overlap.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

WRITES = ("put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item")
_LOCK = threading.RLock()
_MARK = "_pneumoscan_atomic"


def make_dynamodb_writes_atomic() -> None:
    """Serialize moto's DynamoDB item writes in this process (idempotent)."""
    from moto.dynamodb.models import DynamoDBBackend  # noqa: PLC0415  # Moto is only for the local data plane.

    for name in WRITES:
        original = getattr(DynamoDBBackend, name)
        if not getattr(original, _MARK, False):
            setattr(DynamoDBBackend, name, _atomic(original))


def _atomic(write: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(write)
    def locked(*arguments: Any, **keywords: Any) -> Any:
        with _LOCK:
            return write(*arguments, **keywords)

    setattr(locked, _MARK, True)
    return locked
