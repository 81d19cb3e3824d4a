"""Reading uploaded images from the input bucket; boto3 errors become domain exceptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from core.events import ObjectRef
from core.population import age_in_years
from core.s3 import GONE_CODES, error_code

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CHANGED = {"PreconditionFailed", "412"}
_BUCKET_GONE = {"NoSuchBucket"}
_ARCHIVED = {"InvalidObjectState"}
"""GET's answer for an object in an archive storage class or tier that has not been restored."""
ARCHIVE_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
"""Storage classes whose objects cannot be read before a restore (Glacier Instant Retrieval can)."""
EXPLAIN_METADATA = "pneumoscan-explain"
"""User metadata (``x-amz-meta-pneumoscan-explain``) that requests a heatmap for any verdict."""
PATIENT_AGE_METADATA = "patient-age"
"""User metadata (``x-amz-meta-patient-age``) in which an upload pipeline states the patient's age: a DICOM Age
String (``4Y``, ``030M``) or a plain number of years; outside the validated population the upload is rejected."""


class TransientStorageError(RuntimeError):
    """S3 could not answer now (throttling, network, 5xx, permissions): the message is retried."""


class ObjectGoneError(RuntimeError):
    """The object version no longer exists: there is nothing left to score."""


class BucketGoneError(ObjectGoneError):
    """The bucket the notification names no longer exists."""


class ObjectArchivedError(RuntimeError):
    """The object is in an archive storage class or Intelligent-Tiering archive tier and not restored: reading it
    fails until someone restores it, however often the message is retried."""


class ObjectReplacedError(RuntimeError):
    """The key now holds newer content than the notification named; that content has its own notification."""


@dataclass(frozen=True)
class ObjectHead:
    """What a HEAD request says about the object, before any byte is downloaded."""

    size: int
    etag: str
    version_id: str | None
    explain_requested: bool = False
    """The uploader asked for a heatmap whatever the verdict (object metadata ``pneumoscan-explain: true``)."""
    stated_age_years: float | None = None
    """The patient age the object metadata ``patient-age`` states, in years; None when it states none or cannot be
    read as an age."""


class ImageStore:
    """HEAD and GET for the notified object version, never writing to the bucket."""

    def __init__(self, s3_client: S3Client) -> None:
        self._s3 = s3_client

    def head(self, ref: ObjectRef) -> ObjectHead:
        """Size and identity of the notified version."""
        try:
            response = self._s3.head_object(**self._address(ref))
        except (ClientError, BotoCoreError) as error:
            raise self._domain_error(ref, error) from error
        archived = response.get("StorageClass") in ARCHIVE_STORAGE_CLASSES or bool(response.get("ArchiveStatus"))
        if archived and 'ongoing-request="false"' not in str(response.get("Restore", "")):
            raise ObjectArchivedError(f"{ref.image_key} is archived and not restored")
        metadata = response.get("Metadata", {})
        return ObjectHead(
            size=int(response["ContentLength"]),
            etag=str(response.get("ETag", "")).strip('"'),
            version_id=response.get("VersionId"),
            explain_requested=metadata.get(EXPLAIN_METADATA, "").lower() in {"1", "true", "yes"},
            stated_age_years=age_in_years(metadata.get(PATIENT_AGE_METADATA)),
        )

    def read(self, ref: ObjectRef) -> bytes:
        """The bytes of the notified version."""
        try:
            body: bytes = self._s3.get_object(**self._address(ref))["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise self._domain_error(ref, error) from error
        return body

    @staticmethod
    def _address(ref: ObjectRef) -> dict[str, Any]:
        address: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            address["VersionId"] = ref.version_id
        elif ref.etag:
            # An entity tag in If-Match is quoted (RFC 9110); notifications carry it bare.
            address["IfMatch"] = f'"{ref.etag}"'
        return address

    @staticmethod
    def _domain_error(ref: ObjectRef, error: Exception) -> Exception:
        code = error_code(error) if isinstance(error, ClientError) else ""
        if code in _BUCKET_GONE:
            return BucketGoneError(f"the bucket of {ref.image_key} no longer exists")
        if code in GONE_CODES:
            return ObjectGoneError(f"{ref.image_key} no longer exists")
        if code in _ARCHIVED:
            return ObjectArchivedError(f"{ref.image_key} is archived and not restored")
        if code in _CHANGED:
            return ObjectReplacedError(f"{ref.image_key} was replaced after this notification")
        return TransientStorageError(f"cannot read {ref.image_key}: {error}")
