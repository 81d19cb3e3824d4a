"""The results table: one item per scoring of an image object version, written with conditional puts.

Partition key ``image_key`` (``s3://bucket/key``), sort key ``object_sequence``. An upload's result has the S3
event sequencer of its object version (padded so it sorts in upload order); a re-scoring of that version by a
backfill appends ``|<model version>`` to the version's sequence, so it sorts right after the upload's result and
before any newer version. Every result of an image stays in the table as its history; a duplicate notification
for the same version (or a repeated backfill with the same model) fails the condition and changes nothing.

The global secondary index ``ResultsByDayShard`` (partition ``day_shard``, sort ``scored_at``) answers "what was
scored since T". A whole day on one partition key would cap the table's writes near a partition's 1,000 writes/s, so
each day is spread over ``by_day_shards`` keys, ``<day>#0`` to ``<day>#<N-1>``, an image's shard chosen by a stable
hash of its key; a reader queries every shard of a day and merges them in time order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError

from core.events import SEQUENCER_WIDTH

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


class Status(StrEnum):
    """What became of one scoring of an image."""

    SCORED = "SCORED"
    REJECTED = "REJECTED"


class Trigger(StrEnum):
    """What asked for the scoring: the upload's notification or a backfill request."""

    UPLOAD = "upload"
    BACKFILL = "backfill"


RESCORE_SEPARATOR = "|"
"""Separates an object version's sequence from the model version in a re-scoring's sort key; it occurs in
neither S3 sequencers nor model versions."""
NEVER_NOTIFIED = "0" * SEQUENCER_WIDTH + "~"
"""Version sequence of an object that no notification ever scored (it predates the stack): it sorts before
every S3 sequencer, so a later upload of the key is its newer version."""
BY_DAY_INDEX = "ResultsByDayShard"
DEFAULT_BY_DAY_SHARDS = 8
"""Partition keys per day of the by-day index (the template's ``ResultsByDayShards``): 8 keys take about 8,000
writes/s, and a reader makes 8 queries per day it reads."""
RESULT_SCHEMA_VERSION = 2
"""Version 2 added INDETERMINATE and the operating points ``normal_below``/``pneumonia_from`` (replacing
``threshold``); ``confidence`` is the probability of the stated label. Items written before it have no
``schema_version``."""
_DESERIALIZER = TypeDeserializer()


class TransientResultsError(RuntimeError):
    """DynamoDB could not take the request now (throttling, 5xx, network): the message is retried."""


class InvalidPageTokenError(ValueError):
    """A page token that this table did not hand out."""


class AlreadyScoredError(Exception):
    """A backfill names an object version the requested model has already scored."""


@dataclass(frozen=True)
class ScoringResult:
    """One item of the results table; attribute names are the documented schema."""

    image_key: str
    object_sequence: str
    status: Status
    object_etag: str
    object_size: int
    object_version_id: str | None
    scored_at: str
    latency_ms: float
    trigger: Trigger = Trigger.UPLOAD
    model_version: str | None = None
    label: str | None = None
    """NORMAL, INDETERMINATE or PNEUMONIA (``core.labels``)."""
    confidence: float | None = None
    """The calibrated probability of ``label`` (of the likelier class for INDETERMINATE); never below 0.5."""
    pneumonia_probability: float | None = None
    normal_below: float | None = None
    """The operating points the label was called with: NORMAL below, PNEUMONIA from ``pneumonia_from``."""
    pneumonia_from: float | None = None
    reason: str | None = None
    reason_detail: str | None = None
    heatmap_key: str | None = None

    @property
    def version_sequence(self) -> str:
        """The sequence of the object version this result is about (the same for its upload and re-scorings)."""
        return version_sequence_of(self.object_sequence)

    @property
    def scored_day(self) -> str:
        """The UTC day of ``scored_at``: the partition of the by-day index."""
        return self.scored_at[:10]

    def to_item(self, by_day_shards: int = DEFAULT_BY_DAY_SHARDS) -> dict[str, Any]:
        """The result as plain JSON values, with the schema version and the derived attributes the indexes read."""
        item = {name: value for name, value in asdict(self).items() if value is not None}
        return {
            **item,
            "schema_version": RESULT_SCHEMA_VERSION,
            "version_sequence": self.version_sequence,
            "scored_day": self.scored_day,
            "day_shard": day_shard(self.image_key, self.scored_day, by_day_shards),
        }


def day_shard(image_key: str, day: str, shards: int) -> str:
    """The by-day index's partition key of a result: its day, then a shard in ``[0, shards)`` chosen by a hash of
    the image's key (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(image_key.encode()).digest()
    return f"{day}#{int.from_bytes(digest[:8], 'big') % shards}"


def version_sequence_of(object_sequence: str) -> str:
    """The object-version part of a sort key."""
    return object_sequence.split(RESCORE_SEPARATOR, 1)[0]


def rescoring_sequence(history: Iterable[dict[str, Any]], etag: str, model_version: str) -> str:
    """The sort key of a backfill's re-scoring of the object version with ``etag``, given the image's history: the
    version's sequence, then the model, so re-scorings keep the history. Raises ``AlreadyScoredError`` when that
    model has scored the version already."""
    same_version = [item for item in history if item.get("object_etag") == etag]
    if any(item.get("model_version") == model_version for item in same_version):
        raise AlreadyScoredError(f"backfill: this version already has a result of model {model_version}")
    versions = [version_sequence_of(str(item["object_sequence"])) for item in same_version]
    version = max(versions) if versions else NEVER_NOTIFIED + etag
    return f"{version}{RESCORE_SEPARATOR}{model_version}"


@dataclass(frozen=True)
class ResultsPage:
    """One page of a by-time query; ``next_token`` continues it, None when there is no more."""

    items: list[dict[str, Any]]
    next_token: str | None


class ResultsTable:
    """Conditional writes, and the reads downstream systems and ops make, on the results table."""

    def __init__(
        self, dynamodb_client: DynamoDBClient, table_name: str, by_day_shards: int = DEFAULT_BY_DAY_SHARDS
    ) -> None:
        """``by_day_shards`` must be the table's (the template's ``ResultsByDayShards``): writers spread each day over
        that many keys of the by-day index and readers query every one of them."""
        if by_day_shards < 1:
            raise ValueError(f"by_day_shards must be at least 1, got {by_day_shards}")
        self._dynamodb = dynamodb_client
        self.table_name = table_name
        self.by_day_shards = by_day_shards
        self._serializer = TypeSerializer()

    def put_once(self, result: ScoringResult) -> bool:
        """Write the result unless this sort key already has one; True when written."""
        item = {
            name: self._serializer.serialize(Decimal(str(value)) if isinstance(value, float) else value)
            for name, value in result.to_item(self.by_day_shards).items()
        }
        try:
            self._dynamodb.put_item(
                TableName=self.table_name,
                Item=item,
                ConditionExpression="attribute_not_exists(image_key)",
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise TransientResultsError(f"cannot write the result of {result.image_key}: {error}") from error
        except BotoCoreError as error:
            raise TransientResultsError(f"cannot write the result of {result.image_key}: {error}") from error
        return True

    def history(self, image_key: str) -> list[dict[str, Any]]:
        """Every result of the image, oldest object version first."""
        return list(self._query_image(image_key, newest_first=False))

    def latest(self, image_key: str) -> dict[str, Any] | None:
        """The newest result of the image's most recent version (its latest re-scoring, if it has any), or None."""
        newest_version: list[dict[str, Any]] = []
        for item in self._query_image(image_key, newest_first=True, page_size=10):
            if newest_version and _version_of(item) != _version_of(newest_version[0]):
                break  # Newest first: the newest version's results are all read.
            newest_version.append(item)
        return latest_of(newest_version)

    def scored_since(
        self,
        since: datetime,
        *,
        until: datetime | None = None,
        status: str | None = None,
        limit: int = 100,
        page_token: str | None = None,
    ) -> ResultsPage:
        """Results scored in ``[since, until]``, oldest first, optionally of one status, a page at a time: each day's
        shards are queried and merged in time order (ties in key order)."""
        until = until or datetime.now(UTC)
        day, after = _decode_token(page_token) if page_token else (since.astimezone(UTC).date(), None)
        items: list[dict[str, Any]] = []
        last_day = until.astimezone(UTC).date()
        while day <= last_day:
            shards = [
                self._day_shard_items(
                    f"{day.isoformat()}#{shard}",
                    since=since,
                    until=until,
                    status=status,
                    after=after,
                    page_size=limit + 1,
                )
                for shard in range(self.by_day_shards)
            ]
            merged = heapq.merge(*shards, key=_position)
            for item in merged:
                items.append(item)
                if len(items) >= limit:
                    more = next(merged, None) is not None or day < last_day
                    return ResultsPage(items, _encode_token(day, _position(item)) if more else None)
            day += timedelta(days=1)
            after = None
        return ResultsPage(items, None)

    def _day_shard_items(
        self,
        key: str,
        *,
        since: datetime,
        until: datetime,
        status: str | None,
        after: tuple[str, str, str] | None,
        page_size: int,
    ) -> Iterator[dict[str, Any]]:
        """One shard's results in ``[since, until]`` that sort after ``after``, oldest first, read page by page as
        they are consumed."""
        arguments: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": BY_DAY_INDEX,
            "KeyConditionExpression": "day_shard = :shard AND scored_at BETWEEN :since AND :until",
            "ExpressionAttributeValues": {
                ":shard": {"S": key},
                ":since": {"S": after[0] if after else _timestamp(since)},
                ":until": {"S": _timestamp(until)},
            },
            "Limit": page_size,
        }
        if status:
            arguments["FilterExpression"] = "#status = :status"
            arguments["ExpressionAttributeNames"] = {"#status": "status"}
            arguments["ExpressionAttributeValues"][":status"] = {"S": status}
        while True:
            response = self._call(lambda: self._dynamodb.query(**arguments), "query by day")
            for raw in response.get("Items", []):
                item = plain_item(raw)
                if after is None or _position(item) > after:
                    yield item
            if "LastEvaluatedKey" not in response:
                return
            arguments["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def _query_image(self, image_key: str, *, newest_first: bool, page_size: int = 100) -> Iterator[dict[str, Any]]:
        arguments: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "image_key = :key",
            "ExpressionAttributeValues": {":key": {"S": image_key}},
            "ScanIndexForward": not newest_first,
            "Limit": page_size,
        }
        while True:
            response = self._call(lambda: self._dynamodb.query(**arguments), f"read the results of {image_key}")
            yield from (plain_item(item) for item in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return
            arguments["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    @staticmethod
    def _call(operation: Any, action: str) -> Any:
        try:
            return operation()
        except (ClientError, BotoCoreError) as error:
            raise TransientResultsError(f"cannot {action}: {error}") from error


def plain_item(item: dict[str, Any]) -> dict[str, Any]:
    """A DynamoDB item as plain Python values (numbers as Decimal, as boto3 gives them)."""
    return {name: _DESERIALIZER.deserialize(value) for name, value in item.items()}


def latest_of(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Among results of one image, the newest scoring of its newest object version, or None."""
    if not results:
        return None
    newest = max(_version_of(item) for item in results)
    return max(
        (item for item in results if _version_of(item) == newest), key=lambda item: str(item.get("scored_at", ""))
    )


def _version_of(item: dict[str, Any]) -> str:
    return str(item.get("version_sequence") or version_sequence_of(str(item["object_sequence"])))


def _timestamp(moment: datetime) -> str:
    """The ``scored_at`` format: UTC, milliseconds, a trailing Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _position(item: dict[str, Any]) -> tuple[str, str, str]:
    """Where a result sorts in a by-time read: its time, then its key and sort key (unique, so ties are ordered)."""
    return str(item.get("scored_at", "")), str(item.get("image_key", "")), str(item.get("object_sequence", ""))


def _encode_token(day: date, after: tuple[str, str, str]) -> str:
    """A page token: the day being read and the position of the last result handed out."""
    document = {"day": day.isoformat(), "after": list(after)}
    return base64.urlsafe_b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def _decode_token(token: str) -> tuple[date, tuple[str, str, str] | None]:
    try:
        document = json.loads(base64.urlsafe_b64decode(token.encode()))
        scored_at, image_key, object_sequence = document["after"]
        if not all(isinstance(part, str) for part in (scored_at, image_key, object_sequence)):
            raise TypeError("a position is three strings")
        return date.fromisoformat(document["day"]), (scored_at, image_key, object_sequence)
    except (binascii.Error, ValueError, KeyError, TypeError) as error:
        raise InvalidPageTokenError(f"not a page token of this command: {token!r}") from error
