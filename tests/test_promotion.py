"""The training pipeline's gate: a SageMaker model.tar.gz is published, and promoted only if it passes."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from core.model_registry import ModelRegistry
from promotion.handler import publish_and_promote
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL, copy_artifact

BUCKET = MODEL_BUCKET


def _upload_tarball(s3: Any, tmp_path: Path, version: str, test_auc: float) -> str:
    """Package an artifact the way SageMaker packages /opt/ml/model, and upload it."""
    artifact = copy_artifact(RELEASE_MODEL, tmp_path / version, version, test_auc)
    archive = tmp_path / f"{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in artifact.iterdir():
            tar.add(path, arcname=path.name)
    key = f"training-runs/{version}/output/model.tar.gz"
    s3.upload_file(str(archive), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def test_gate_promotes_only_models_that_pass(s3: Any, tmp_path: Path) -> None:
    """First good model is promoted; a worse one and one below the minimum are published but not promoted."""
    first = publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "first", 0.97), 0.9, tmp_path / "a")
    assert (first.promoted, first.version) == (True, "first")
    worse = publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "worse", 0.96), 0.9, tmp_path / "b")
    assert not worse.promoted
    assert "below current first" in worse.reason
    weak = publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "weak", 0.85), 0.9, tmp_path / "c")
    assert not weak.promoted
    assert "below the minimum" in weak.reason
    registry = ModelRegistry(s3, BUCKET)
    assert registry.current().version == "first"
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {"models/worse/model.tflite", "models/weak/model_card.json"} <= keys
