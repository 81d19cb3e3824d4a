"""The model registry in S3: ``models/<version>/`` artifacts and the ``models/current.json`` pointer.

Training publishes and promotes through it; the scoring function only reads the pointer and downloads the
artifact it names. Boto3 errors become ``RegistryError`` so callers deal in domain terms.

A published version is immutable: every file is written with ``If-None-Match: *``, so a second publish under the
same version cannot replace it (the template's bucket policy denies writes under ``models/<version>/`` without
that header, and deletes). A model is served only when its sha256 is the one in the pointer, so a version changed
behind the registry's back is refused, never served.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from core.model_card import (
    CARD_FILE,
    EXPLAINER_FILE,
    GATE_FILE,
    MODEL_FILE,
    SCREENING_FILE,
    ModelArtifactError,
    ServingSpec,
    read_card,
    verify_artifact,
)
from core.promotion_gate import GateFloor, gate_refusal
from core.s3 import error_code

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MODELS_PREFIX = "models/"
POINTER_KEY = "models/current.json"
ARTIFACT_FILES = (MODEL_FILE,)
"""Published first; the card is written last, so a version whose publish was interrupted has no card and cannot
be promoted."""
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
OPTIONAL_ARTIFACT_FILES = (EXPLAINER_FILE, GATE_FILE, SCREENING_FILE)
"""Published when the artifact has them; downloaded when the card names them."""


class RegistryError(RuntimeError):
    """The registry could not be read or written (a transient or permissions fault)."""


class NoCurrentModelError(RegistryError):
    """No model has been promoted yet: ``models/current.json`` does not exist."""


class VersionExistsError(RuntimeError):
    """The version is already published with other content; published versions are never rewritten."""


class PointerMismatchError(ModelArtifactError):
    """The artifact's model is not the one the pointer names (its sha256 differs): it is never served."""


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

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ModelPointer:
        """Read a pointer, ignoring fields this code does not know (a newer writer may add some)."""
        known = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in document.items() if name in known})


class ModelRegistry:
    """Publish, promote and fetch model artifacts in one S3 bucket."""

    def __init__(self, s3_client: S3Client, bucket: str) -> None:
        self._s3 = s3_client
        self.bucket = bucket

    def publish(self, artifact_dir: Path) -> str:
        """Upload a verified artifact (its explainer and ``report/`` too) to ``models/<version>/``; returns the
        prefix. Raises ``VersionExistsError`` when the version is already published with other content; publishing
        the same files again (a retried publish) changes nothing and succeeds."""
        spec = verify_artifact(artifact_dir)
        prefix = f"{MODELS_PREFIX}{spec.version}/"
        files = [artifact_dir / name for name in ARTIFACT_FILES]
        files += [artifact_dir / name for name in OPTIONAL_ARTIFACT_FILES if (artifact_dir / name).is_file()]
        files += sorted(p for p in (artifact_dir / "report").rglob("*") if p.is_file())
        files.append(artifact_dir / CARD_FILE)
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
        """Point ``models/current.json`` at a published version if it passes the gate against the current model:
        the ``floor``, then the same evaluation data and a test AUC not below the current one's."""
        prefix = f"{MODELS_PREFIX}{version}/"
        spec = ServingSpec.from_card(self._read_json(prefix + CARD_FILE))
        try:
            current_spec: ServingSpec | None = ServingSpec.from_card(self._read_json(self.current().prefix + CARD_FILE))
        except NoCurrentModelError:
            current_spec = None
        refusal = gate_refusal(spec, current_spec, floor or GateFloor())
        if refusal is not None and not force:
            raise PromotionRefusedError(refusal)
        pointer = ModelPointer(
            version=version,
            prefix=prefix,
            model_sha256=spec.model_sha256,
            test_auc=spec.test_auc,
            promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        body = json.dumps(asdict(pointer), indent=2).encode()
        self._call("write pointer", lambda: self._s3.put_object(Bucket=self.bucket, Key=POINTER_KEY, Body=body))
        return pointer

    def download(self, prefix: str, destination: Path) -> ServingSpec:
        """Fetch an artifact's card, then the files it names (the model, and the explainer, input gate and screening
        head when it has them), into ``destination`` and verify their sha256."""
        destination.mkdir(parents=True, exist_ok=True)
        self._download(prefix + CARD_FILE, destination / CARD_FILE)
        spec = ServingSpec.from_card(read_card(destination))
        names = [MODEL_FILE] + ([EXPLAINER_FILE] if spec.explainer_sha256 is not None else [])
        names += [GATE_FILE] if spec.gate_sha256 is not None else []
        names += [SCREENING_FILE] if spec.screening_sha256 is not None else []
        for name in names:
            self._download(prefix + name, destination / name)
        return verify_artifact(destination)

    def download_current(self, cache_root: Path | None = None) -> tuple[ModelPointer, Path]:
        """Download the promoted model into a per-version folder under ``cache_root``."""
        pointer = self.current()
        return pointer, self.fetch(pointer, cache_root)

    def fetch(self, pointer: ModelPointer, cache_root: Path | None = None) -> Path:
        """The pointed-to artifact in ``cache_root/<version>``, downloaded unless a verified copy of the same card
        is there (a card can gain files, such as an explainer, without its model changing). Raises
        ``PointerMismatchError`` when the artifact's model is not the one the pointer names."""
        root = cache_root or Path(tempfile.gettempdir()) / "pneumoscan-models"
        destination = root / pointer.version
        if (
            (destination / MODEL_FILE).is_file()
            and read_card(destination).get("model_sha256") == pointer.model_sha256
            and read_card(destination) == self._read_json(pointer.prefix + CARD_FILE)
        ):
            verify_artifact(destination)
            return destination
        spec = self.download(pointer.prefix, destination)
        if spec.model_sha256 != pointer.model_sha256:
            raise PointerMismatchError(
                f"{pointer.prefix}{MODEL_FILE} has sha256 {spec.model_sha256}, but {POINTER_KEY} promoted "
                f"{pointer.model_sha256}: the version was changed after promotion and is not served"
            )
        return destination

    def _download(self, key: str, path: Path) -> None:
        self._call("download", lambda: self._s3.download_file(self.bucket, key, str(path)))

    def _read_json(self, key: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self._read_bytes(key))
        return document

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
