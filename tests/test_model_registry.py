"""Publishing and promoting model artifacts in S3 (moto), and scoring from the registry."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from core.model_card import read_card, sha256_of, write_card
from core.model_registry import (
    POINTER_KEY,
    ModelRegistry,
    NoCurrentModelError,
    PointerMismatchError,
    PromotionRefusedError,
    RegistryError,
    VersionExistsError,
)
from pneumoscan.cli import main
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL, copy_artifact

BUCKET = MODEL_BUCKET


def test_publish_uploads_model_card_and_report(s3: Any, smoke_artifact: Path) -> None:
    """Publishing puts the model, card and report plots under models/<version>/."""
    version = read_card(smoke_artifact)["version"]
    prefix = ModelRegistry(s3, BUCKET).publish(smoke_artifact)
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert prefix == f"models/{version}/"
    assert {f"{prefix}model.tflite", f"{prefix}model_card.json", f"{prefix}report/roc_test.png"} <= keys


def test_promote_moves_pointer_only_to_an_equal_or_better_model(s3: Any, smoke_artifact: Path, tmp_path: Path) -> None:
    """A lower test AUC is refused unless forced; an equal or higher one moves the pointer."""
    registry = ModelRegistry(s3, BUCKET)
    for version, auc in (("good", 0.97), ("worse", 0.95), ("better", 0.98)):
        registry.publish(copy_artifact(smoke_artifact, tmp_path / version, version, auc))
    with pytest.raises(NoCurrentModelError):
        registry.current()
    assert registry.promote("good").version == "good"
    with pytest.raises(PromotionRefusedError, match="below current good"):
        registry.promote("worse")
    assert registry.current().version == "good"
    assert registry.promote("better").version == "better"
    assert registry.promote("worse", force=True).version == "worse"
    pointer = json.loads(s3.get_object(Bucket=BUCKET, Key=POINTER_KEY)["Body"].read())
    assert pointer["prefix"] == "models/worse/"
    assert pointer["model_sha256"] == sha256_of(smoke_artifact / "model.tflite")


def test_download_current_verifies_and_caches(s3: Any, smoke_artifact: Path, tmp_path: Path) -> None:
    """The promoted model downloads to a per-version folder and matches its card."""
    registry = ModelRegistry(s3, BUCKET)
    version = read_card(smoke_artifact)["version"]
    registry.publish(smoke_artifact)
    registry.promote(version)
    pointer, folder = registry.download_current(tmp_path)
    assert folder == tmp_path / version
    assert sha256_of(folder / "model.tflite") == pointer.model_sha256


def test_promoting_an_unpublished_version_is_an_error(s3: Any) -> None:
    """Promoting a version that was never published fails and leaves no pointer."""
    with pytest.raises(RegistryError, match="missing"):
        ModelRegistry(s3, BUCKET).promote("missing")
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_cli_publish_promote_and_score_from_s3(
    s3: Any, smoke_artifact: Path, sample_paths: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`pneumoscan publish`, `promote` and `score --model s3://bucket` work together."""
    version = read_card(smoke_artifact)["version"]
    assert main(["publish", "--bucket", BUCKET, "--model", str(smoke_artifact)]) == 0
    assert main(["promote", "--bucket", BUCKET, "--version", version]) == 0
    capsys.readouterr()
    assert main(["score", "--model", f"s3://{BUCKET}", *map(str, sample_paths[:2])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["model_version"] for line in lines] == [version, version]


def retrained(artifact: Path, destination: Path) -> Path:
    """A copy of ``artifact`` under the same version whose model file (and the card's sha256 of it) differ: what a
    second training run published under a taken version would upload."""
    copy = copy_artifact(artifact, destination, read_card(artifact)["version"])
    with (copy / "model.tflite").open("ab") as model:
        model.write(b"\0" * 16)
    card = read_card(copy)
    card["model_sha256"] = sha256_of(copy / "model.tflite")
    write_card(copy, card)
    return copy


def test_publish_refuses_an_existing_version(s3: Any, tmp_path: Path) -> None:
    """A second publish under a published version with other content is refused and changes no object; the same
    files again (a retried publish) are accepted."""
    registry = ModelRegistry(s3, BUCKET)
    prefix = registry.publish(RELEASE_MODEL)
    before = {item["Key"]: item["ETag"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    with pytest.raises(VersionExistsError):
        registry.publish(retrained(RELEASE_MODEL, tmp_path / "rewrite"))
    assert {item["Key"]: item["ETag"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]} == before
    assert registry.publish(RELEASE_MODEL) == prefix
    assert main(["publish", "--bucket", BUCKET, "--model", str(tmp_path / "rewrite")]) == 3


def test_a_model_other_than_the_pointers_is_refused(s3: Any, tmp_path: Path) -> None:
    """When a promoted version's files are replaced behind the registry (model and card agree with each other), the
    download is refused because the model's sha256 is not the one in models/current.json."""
    registry = ModelRegistry(s3, BUCKET)
    version = read_card(RELEASE_MODEL)["version"]
    registry.publish(RELEASE_MODEL)
    pointer = registry.promote(version)
    rewrite = retrained(RELEASE_MODEL, tmp_path / "rewrite")
    for name in ("model.tflite", "model_card.json"):
        s3.put_object(Bucket=BUCKET, Key=f"{pointer.prefix}{name}", Body=(rewrite / name).read_bytes())
    with pytest.raises(PointerMismatchError):
        registry.fetch(pointer, tmp_path / "cache")
    with pytest.raises(PointerMismatchError):
        registry.download_current(tmp_path / "cache")


def test_pointer_with_an_unknown_field_is_read(s3: Any) -> None:
    """A pointer written by a newer release, with a field this code does not know, still names the model."""
    registry = ModelRegistry(s3, BUCKET)
    version = read_card(RELEASE_MODEL)["version"]
    registry.publish(RELEASE_MODEL)
    document = asdict(registry.promote(version))
    s3.put_object(Bucket=BUCKET, Key=POINTER_KEY, Body=json.dumps({**document, "promoted_by": "pipeline"}).encode())
    assert registry.current().version == version
