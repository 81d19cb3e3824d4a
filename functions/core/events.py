"""SQS message bodies parsed into object references: S3 ObjectCreated notifications, and the backfill requests
that ``pneumoscan backfill`` enqueues for objects that already exist."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote_plus

SEQUENCER_WIDTH = 32
"""S3 sequencers are hex strings of varying length; left-padded to one width they sort in event order."""

BACKFILL_SOURCE = "pneumoscan.backfill"
"""The ``source`` of a backfill request's body."""


class MalformedMessageError(ValueError):
    """An SQS message body that is neither an S3 notification, S3's test event, nor a backfill request."""


@dataclass(frozen=True)
class ObjectRef:
    """One uploaded object version named by an S3 notification."""

    bucket: str
    key: str
    """URL-decoded object key."""
    size: int
    etag: str
    version_id: str | None
    sequencer: str
    """Orders the events of one key and is the same in duplicate notifications: S3's sequencer, left-padded and
    upper-cased. Emulators that send none (moto) get ``~<eventTime>#<eTag>`` instead, which has both properties
    as well, to the millisecond. A backfill request has none: the pipeline finds the version's sequence in the
    image's history."""
    backfill_model: str | None = None
    """Set on backfill requests: the model version that must score the object (re-scoring is pinned to it)."""
    explain: bool = False
    """A heatmap is wanted whatever the verdict."""

    @property
    def image_key(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_backfill(self) -> bool:
        return self.backfill_model is not None


@dataclass(frozen=True)
class BackfillRequest:
    """The body of a backfill message: an existing object to score with a given model."""

    bucket: str
    key: str
    etag: str
    size: int
    model_version: str
    explain: bool = False
    source: str = BACKFILL_SOURCE

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


@dataclass(frozen=True)
class ParsedMessage:
    """What one SQS message names: the objects it names, and why each record that names none could not be read."""

    refs: tuple[ObjectRef, ...]
    malformed: tuple[str, ...] = ()


def parse_message_body(body: str) -> list[ObjectRef]:
    """Objects named by one SQS message; S3's ``s3:TestEvent`` gives none. Malformed records among readable ones
    are left out (``parse_message`` says why)."""
    return list(parse_message(body).refs)


def parse_message(body: str) -> ParsedMessage:
    """Parse one SQS message. A malformed record among readable ones costs only itself (it is listed in
    ``malformed``); a message with nothing readable in it raises ``MalformedMessageError``."""
    try:
        document: dict[str, Any] = json.loads(body)
    except json.JSONDecodeError as error:
        raise MalformedMessageError(f"message body is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise MalformedMessageError("message body is not a JSON object")
    if document.get("Event") == "s3:TestEvent":
        return ParsedMessage(refs=())
    if document.get("source") == BACKFILL_SOURCE:
        return ParsedMessage(refs=(_backfill_ref(document),))
    records = document.get("Records")
    if not isinstance(records, list):
        raise MalformedMessageError("message body has no Records list")
    refs: list[ObjectRef] = []
    malformed: list[str] = []
    for record in records:
        if not isinstance(record, dict):
            malformed.append("an S3 record is not a JSON object")
        elif str(record.get("eventName", "")).startswith("ObjectCreated:"):
            try:
                refs.append(_object_ref(record))
            except MalformedMessageError as error:
                malformed.append(str(error))
    if malformed and not refs:
        raise MalformedMessageError("; ".join(malformed))
    return ParsedMessage(refs=tuple(refs), malformed=tuple(malformed))


def _object_ref(record: dict[str, Any]) -> ObjectRef:
    try:
        s3 = record["s3"]
        item = s3["object"]
        etag = str(item.get("eTag", "")).strip('"')
        if "sequencer" in item:
            sequencer = str(item["sequencer"]).upper().rjust(SEQUENCER_WIDTH, "0")
        else:
            sequencer = f"~{record['eventTime']}#{etag}"
        return ObjectRef(
            bucket=s3["bucket"]["name"],
            key=unquote_plus(item["key"]),
            size=int(item.get("size", 0)),
            etag=etag,
            version_id=item.get("versionId") or None,
            sequencer=sequencer,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedMessageError(f"S3 record is missing {error}") from error


def _backfill_ref(document: dict[str, Any]) -> ObjectRef:
    try:
        request = BackfillRequest(**document)
        if not (request.bucket and request.key and request.model_version):
            raise ValueError("bucket, key and model_version must not be empty")
        return ObjectRef(
            bucket=request.bucket,
            key=request.key,
            size=int(request.size),
            etag=request.etag.strip('"'),
            version_id=None,
            sequencer="",
            backfill_model=request.model_version,
            explain=bool(request.explain),
        )
    except (TypeError, ValueError, AttributeError) as error:
        raise MalformedMessageError(f"malformed backfill request: {error}") from error
