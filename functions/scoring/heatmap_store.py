"""Writing heatmap overlays to the heatmap bucket, which has no notifications, so they never trigger scoring."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from scoring.image_store import TransientStorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

HEATMAP_PREFIX = "heatmaps/"
MAX_KEY_BYTES = 1024
"""S3's limit on the UTF-8 length of a key."""


class HeatmapStore:
    """Stores one PNG per result under ``heatmaps/<input bucket>/<key>.<result id>.png``."""

    def __init__(self, s3_client: S3Client, bucket: str) -> None:
        self._s3 = s3_client
        self.bucket = bucket

    @staticmethod
    def key_for(image_key: str, object_sequence: str) -> str:
        """Where the heatmap of one result goes: beside the image's other heatmaps, unique per result."""
        result_id = hashlib.sha256(object_sequence.encode()).hexdigest()[:16]
        key = f"{HEATMAP_PREFIX}{image_key.removeprefix('s3://')}.{result_id}.png"
        if len(key.encode()) <= MAX_KEY_BYTES:
            return key
        # An input key near S3's limit leaves no room for the prefix: such heatmaps are named by a digest instead.
        bucket = image_key.removeprefix("s3://").split("/", 1)[0]
        return f"{HEATMAP_PREFIX}{bucket}/_long-keys/{hashlib.sha256(image_key.encode()).hexdigest()}.{result_id}.png"

    def put(self, image_key: str, object_sequence: str, png: bytes) -> str:
        """Write the overlay (idempotent: a retry writes the same key) and return its ``s3://`` address."""
        key = self.key_for(image_key, object_sequence)
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=png, ContentType="image/png")
        except (ClientError, BotoCoreError) as error:
            raise TransientStorageError(f"cannot store the heatmap of {image_key}: {error}") from error
        return f"s3://{self.bucket}/{key}"
