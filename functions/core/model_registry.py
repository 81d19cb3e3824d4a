"""The model registry in S3: ``models/<version>/`` artifacts and the ``models/current.json`` pointer.

Training publishes and promotes through it; the scoring function only reads the pointer and downloads the
artifact it names. Boto3 errors become ``RegistryError`` so callers deal in domain terms.

A published version is immutable: every file is written with ``If-None-Match: *``, so a second publish under the
same version cannot replace it (the template's bucket policy denies writes under ``models/<version>/`` without
that header, and deletes). The pointer pins the artifact: promotion records the sha256 of every file of the version
(every top-level object under ``models/<version>/``: the card, the model and whatever else training put beside
them), and the scorer serves a version only when each file it downloads has its pinned sha256. A version changed
behind the registry's back (any file rewritten in place, the card included) is refused, never served; so is a
pointer written before pins existed, until the version is promoted again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from core.model_card import (
    CARD_FILE,
    MODEL_FILE,
    ModelArtifactError,
    ServingSpec,
    sha256_of,
    verify_artifact,
)
from core.promotion_gate import GateFloor, gate_refusal
from core.s3 import error_code, is_gone

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MODELS_PREFIX = "models/"
POINTER_KEY = "models/current.json"
REPORT_FOLDER = "report"
"""Published with the artifact for people; the scorer never reads it, so it is not pinned."""
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""What an artifact file may be called: a plain name, never a path, so a pin can only name a file of its folder."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryError(RuntimeError):
    """The registry could not be read or written (a transient or permissions fault)."""


class NoCurrentModelError(RegistryError):
    """No model has been promoted yet: ``models/current.json`` does not exist."""


class VersionExistsError(RuntimeError):
    """The version is already published with other content; published versions are never rewritten."""


class PointerMismatchError(ModelArtifactError):
    """A file of the promoted version is not the one the pointer pins (its sha256 differs, or it is gone): the
    version is never served."""


class UnpromotableVersionError(ModelArtifactError):
    """The published files of a version disagree with its card (one was changed after publishing): it is never
    pinned."""


class UnpinnedPointerError(ModelArtifactError):
    """The pointer pins no files (it was written before pins existed): its version is not served until it is
    promoted again."""


class PromotionRefusedError(RuntimeError):
    """The candidate does not pass the promotion gate (``core.promotion_gate``) and ``force`` was not given."""


@dataclass(frozen=True)
class ModelPointer:
    """The content of ``models/current.json``."""

    version: str
    prefix: str
    model_sha256: str
    test_auc: float | None
    promoted_at: str
    files: dict[str, str] | None = None
    """The sha256 of every file of the version as it was promoted, by file name (the card and the model among
    them); None in a pointer written before pins existed, whose version is never served (``pins``)."""

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ModelPointer:
        """Read a pointer, ignoring fields this code does not know (a newer writer may add some). Raises
        ``ValueError`` for pins that are not a map of plain file names to sha256s naming the card and the model."""
        known = {field.name for field in fields(cls)}
        pointer = cls(**{name: value for name, value in document.items() if name in known})
        if pointer.files is not None and not _well_formed_pins(pointer.files, pointer.model_sha256):
            raise ValueError("files must map plain file names to sha256s, the card's and the model's among them")
        return pointer

    def pins(self) -> dict[str, str]:
        """The pinned sha256 of every file of the version; raises ``UnpinnedPointerError`` for a pointer written
        before pins existed, so nothing unpinned is ever served."""
        if self.files is None:
            raise UnpinnedPointerError(
                f"{POINTER_KEY} pins no files of {self.version} (it was written before pins existed), so the version "
                f"is not served: promote it again with this release (pneumoscan promote --version {self.version})"
            )
        return dict(self.files)


def _well_formed_pins(files: Any, model_sha256: str) -> bool:
    return (
        isinstance(files, dict)
        and all(
            isinstance(name, str)
            and _FILE_NAME.fullmatch(name) is not None
            and isinstance(digest, str)
            and _SHA256.fullmatch(digest) is not None
            for name, digest in files.items()
        )
        and CARD_FILE in files
        and files.get(MODEL_FILE) == model_sha256
    )


def artifact_files(directory: Path) -> list[str]:
    """The names of an artifact folder's own files, the card last: every top-level file but hidden ones, whatever
    training put there, so a new kind of file is published and pinned without a list of names to update. Folders
    (``report/``, ``alternatives/``) are not artifact files."""
    names = sorted(path.name for path in directory.iterdir() if path.is_file() and not path.name.startswith("."))
    odd = [name for name in names if _FILE_NAME.fullmatch(name) is None]
    if odd:
        raise ModelArtifactError(f"{directory} holds files whose names are not plain artifact file names: {odd}")
    return [name for name in names if name != CARD_FILE] + [CARD_FILE]


class ModelRegistry:
    """Publish, promote and fetch model artifacts in one S3 bucket."""

    def __init__(self, s3_client: S3Client, bucket: str) -> None:
        self._s3 = s3_client
        self.bucket = bucket

    def publish(self, artifact_dir: Path) -> str:
        """Upload a verified artifact (every top-level file, ``artifact_files``, and ``report/``) to
        ``models/<version>/``, the card last, so a version whose publish was interrupted has no card and cannot be
        promoted; returns the prefix. Raises ``VersionExistsError`` when the version is already published with other
        content; publishing the same files again (a retried publish) changes nothing and succeeds."""
        spec = verify_artifact(artifact_dir)
        prefix = f"{MODELS_PREFIX}{spec.version}/"
        *served, card = artifact_files(artifact_dir)
        files = [artifact_dir / name for name in served]
        files += sorted(p for p in (artifact_dir / REPORT_FOLDER).rglob("*") if p.is_file())
        files.append(artifact_dir / card)
        for path in files:
            self._put_new(prefix + path.relative_to(artifact_dir).as_posix(), path.read_bytes())
        return prefix

    def _put_new(self, key: str, body: bytes) -> None:
        """Write ``key`` only if it does not exist; an existing key must already hold exactly ``body``."""
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as error:
            if error_code(error) not in _EXISTS_CODES:
                raise RegistryError(f"cannot upload s3://{self.bucket}/{key}: {error}") from error
            if self._read_bytes(key) != body:
                raise VersionExistsError(
                    f"s3://{self.bucket}/{key} is already published with other content; a published version is "
                    "never rewritten: publish under a new version"
                ) from error
        except BotoCoreError as error:
            raise RegistryError(f"cannot upload s3://{self.bucket}/{key}: {error}") from error

    def current(self) -> ModelPointer:
        """Read ``models/current.json``."""
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=POINTER_KEY)["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise NoCurrentModelError(f"s3://{self.bucket}/{POINTER_KEY} does not exist") from error
            raise RegistryError(f"cannot read s3://{self.bucket}/{POINTER_KEY}: {error}") from error
        except BotoCoreError as error:
            raise RegistryError(f"cannot read s3://{self.bucket}/{POINTER_KEY}: {error}") from error
        try:
            return ModelPointer.from_json(json.loads(body))
        except (TypeError, ValueError, AttributeError) as error:
            raise RegistryError(f"s3://{self.bucket}/{POINTER_KEY} is malformed: {error}") from error

    def promote(self, version: str, force: bool = False, floor: GateFloor | None = None) -> ModelPointer:
        """Point ``models/current.json`` at a published version, pinning the sha256 of each of its files, if it
        passes the gate against the current model: the ``floor``, then the same evaluation data and a test AUC not
        below the current one's. The version's files are downloaded and checked against its card first, so a pin
        never names an artifact that disagrees with itself."""
        prefix = f"{MODELS_PREFIX}{version}/"
        with tempfile.TemporaryDirectory(prefix="pneumoscan-promote-") as scratch:
            spec, pins = self._pin(prefix, Path(scratch))
        current_spec, current_refusal = self._current_for_gate()
        refusal = current_refusal or gate_refusal(spec, current_spec, floor or GateFloor())
        if refusal is not None and not force:
            raise PromotionRefusedError(refusal)
        pointer = ModelPointer(
            version=version,
            prefix=prefix,
            model_sha256=spec.model_sha256,
            test_auc=spec.test_auc,
            promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
            files=pins,
        )
        body = json.dumps(asdict(pointer), indent=2).encode()
        self._call("write pointer", lambda: self._s3.put_object(Bucket=self.bucket, Key=POINTER_KEY, Body=body))
        return pointer

    def _pin(self, prefix: str, scratch: Path) -> tuple[ServingSpec, dict[str, str]]:
        """Download every file of a published version into the empty folder ``scratch``, check them against their
        card, and return the card's spec and each file's sha256."""
        try:
            spec = self.download(prefix, scratch)
        except ModelArtifactError as error:
            raise UnpromotableVersionError(
                f"the published files of {prefix} do not match its card, so it is not promoted: {error}"
            ) from error
        return spec, {path.name: sha256_of(path) for path in sorted(scratch.iterdir())}

    def _published_files(self, prefix: str) -> list[str]:
        """The names of the top-level objects under ``prefix`` (``report/`` and other folders are not listed)."""
        names: list[str] = []
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        try:
            for page in pages:
                names += [item["Key"][len(prefix) :] for item in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as error:
            raise RegistryError(f"cannot list s3://{self.bucket}/{prefix}: {error}") from error
        names = sorted(name for name in names if name)  # A folder marker ("models/<version>/") is no file.
        odd = [name for name in names if _FILE_NAME.fullmatch(name) is None]
        if odd:
            raise ModelArtifactError(f"s3://{self.bucket}/{prefix} holds objects that are not artifact files: {odd}")
        return names

    def _current_for_gate(self) -> tuple[ServingSpec | None, str | None]:
        """The current model's spec for the gate's comparison (None when nothing is promoted), and why there can be
        no comparison when its card is not the one its pointer pins."""
        try:
            current = self.current()
        except NoCurrentModelError:
            return None, None
        body = self._read_bytes(current.prefix + CARD_FILE)
        if current.files is not None and hashlib.sha256(body).hexdigest() != current.files[CARD_FILE]:
            return None, (
                f"the card of current {current.version} is not the one {POINTER_KEY} pins (it was changed after "
                "promotion), so the candidate cannot be compared with it"
            )
        try:
            return ServingSpec.from_card(json.loads(body)), None
        except ValueError as error:
            raise RegistryError(f"s3://{self.bucket}/{current.prefix}{CARD_FILE} is not JSON: {error}") from error

    def download(self, prefix: str, destination: Path) -> ServingSpec:
        """Fetch every file of a published version (its top-level objects; ``report/`` is left out) into
        ``destination`` and verify them against their card. Nothing pins an unpromoted version: this is for an
        operator who names one (``pneumoscan score --model s3://bucket/models/VERSION/``) and for promotion."""
        names = self._published_files(prefix)
        if CARD_FILE not in names:
            raise RegistryError(
                f"s3://{self.bucket}/{prefix}{CARD_FILE} does not exist: the version is not published, or its "
                "publish did not finish"
            )
        destination.mkdir(parents=True, exist_ok=True)
        for name in names:
            self._download(prefix + name, destination / name)
        return verify_artifact(destination)

    def download_current(self, cache_root: Path | None = None) -> tuple[ModelPointer, Path]:
        """Download the promoted model into a per-version folder under ``cache_root``."""
        pointer = self.current()
        return pointer, self.fetch(pointer, cache_root)

    def fetch(self, pointer: ModelPointer, cache_root: Path | None = None) -> Path:
        """The pointed-to artifact in ``cache_root/<version>``, holding exactly the pinned files, each with its
        pinned sha256; downloaded unless such a copy is there. Files are downloaded into a staging folder and moved
        into place only once every one matches its pin, so the folder never holds an unverified file. Raises
        ``UnpinnedPointerError`` for a pointer without pins and ``PointerMismatchError`` when a file is not the one
        the pointer pins."""
        pins = pointer.pins()
        root = cache_root or Path(tempfile.gettempdir()) / "pneumoscan-models"
        destination = root / pointer.version
        if not _holds_exactly(destination, pins):
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{pointer.version}-", dir=root))
            try:
                for name, pinned in pins.items():
                    self._download_pinned(pointer.prefix + name, staging / name, pinned)
                shutil.rmtree(destination, ignore_errors=True)
                staging.rename(destination)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        spec = verify_artifact(destination)
        if spec.model_sha256 != pointer.model_sha256:
            raise PointerMismatchError(
                f"{pointer.prefix}{CARD_FILE} names model sha256 {spec.model_sha256}, but {POINTER_KEY} promoted "
                f"{pointer.model_sha256}: the version is not served"
            )
        return destination

    def _download_pinned(self, key: str, path: Path, pinned: str) -> None:
        try:
            self._s3.download_file(self.bucket, key, str(path))
        except (ClientError, BotoCoreError) as error:
            if is_gone(error):
                raise PointerMismatchError(
                    f"{key} is pinned by {POINTER_KEY} but gone: the version was changed after promotion and is not "
                    "served"
                ) from error
            raise RegistryError(f"cannot download s3://{self.bucket}/{key}: {error}") from error
        actual = sha256_of(path)
        if actual != pinned:
            raise PointerMismatchError(
                f"{key} has sha256 {actual}, but {POINTER_KEY} pins {pinned}: the version was changed after promotion "
                "and is not served"
            )

    def _download(self, key: str, path: Path) -> None:
        self._call("download", lambda: self._s3.download_file(self.bucket, key, str(path)))

    def _read_bytes(self, key: str) -> bytes:
        try:
            body: bytes = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise RegistryError(f"cannot read s3://{self.bucket}/{key}: {error}") from error
        return body

    def _call(self, action: str, operation: Any) -> Any:
        try:
            return operation()
        except (ClientError, BotoCoreError) as error:
            raise RegistryError(f"cannot {action} in s3://{self.bucket}: {error}") from error


def _holds_exactly(folder: Path, pins: dict[str, str]) -> bool:
    """Whether ``folder`` holds the pinned files, each with its pinned sha256, and nothing else."""
    if not folder.is_dir() or {path.name for path in folder.iterdir()} != set(pins):
        return False
    return all(sha256_of(folder / name) == pinned for name, pinned in pins.items())
