"""The results table: one item per image object version, written with conditional puts.

Partition key ``image_key`` (``s3://bucket/key``), sort key ``object_sequence`` (the S3 event sequencer, padded so
it sorts in upload order). The latest result of an image is one ``Query`` with ``ScanIndexForward=False`` and
``Limit=1``; results of earlier versions, scored by earlier models, stay in the table. A duplicate notification
for the same version fails the condition and changes nothing, so an older result can never replace a newer one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

SCORED = "SCORED"
REJECTED = "REJECTED"


class TransientResultsError(RuntimeError):
    """DynamoDB could not take the write now (throttling, 5xx, network): the message is retried."""


@dataclass(frozen=True)
class ScoringResult:
    """One item of the results table; attribute names are the documented schema."""

    image_key: str
    object_sequence: str
    status: str
    object_etag: str
    object_size: int
    object_version_id: str | None
    scored_at: str
    latency_ms: float
    model_version: str | None = None
    label: str | None = None
    confidence: float | None = None
    pneumonia_probability: float | None = None
    threshold: float | None = None
    reason: str | None = None
    reason_detail: str | None = None


class ResultsTable:
    """Conditional writes and latest-result reads on the results table."""

    def __init__(self, dynamodb_client: DynamoDBClient, table_name: str) -> None:
        self._dynamodb = dynamodb_client
        self.table_name = table_name
        self._serializer = TypeSerializer()
        self._deserializer = TypeDeserializer()

    def put_once(self, result: ScoringResult) -> bool:
        """Write the result unless this object version already has one; True when written."""
        item = {
            name: self._serializer.serialize(Decimal(str(value)) if isinstance(value, float) else value)
            for name, value in asdict(result).items()
            if value is not None
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

    def latest(self, image_key: str) -> dict[str, Any] | None:
        """The result of the image's most recent version, or None."""
        response = self._dynamodb.query(
            TableName=self.table_name,
            KeyConditionExpression="image_key = :key",
            ExpressionAttributeValues={":key": {"S": image_key}},
            ScanIndexForward=False,
            Limit=1,
        )
        items = response.get("Items", [])
        return {k: self._deserializer.deserialize(v) for k, v in items[0].items()} if items else None
