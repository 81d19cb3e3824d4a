"""S3 addresses and the error codes S3 answers for an object that is not there."""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import ClientError

GONE_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
"""Error codes of GET and HEAD for an object (or object version) that does not exist."""


def error_code(error: ClientError) -> str:
    """The service's error code of a boto3 client error, or an empty string."""
    return str(error.response.get("Error", {}).get("Code", ""))


def is_gone(error: Exception) -> bool:
    """Whether S3 answered that the object or version does not exist."""
    return isinstance(error, ClientError) and error_code(error) in GONE_CODES


@dataclass(frozen=True)
class S3Location:
    """A bucket and key prefix parsed from ``s3://bucket/prefix``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        return cls(bucket=bucket, prefix=prefix)
