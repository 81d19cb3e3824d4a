"""The training pipeline's gate: a SageMaker model.tar.gz is published, and promoted only if it passes."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest

from core.config import ConfigurationError
from core.model_card import read_card, write_card
from core.model_registry import ModelRegistry, NoCurrentModelError, PromotionRefusedError
from core.promotion_gate import GateFloor
from infra.local_stack import LocalContext
from promotion import handler
from promotion.handler import floor_from_environment, publish_and_promote
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL, copy_artifact

BUCKET = MODEL_BUCKET
FLOOR = GateFloor(minimum_test_auc=0.9, minimum_test_count=500)


def _upload_tarball(
    s3: Any,
    tmp_path: Path,
    version: str,
    test_auc: float,
    *,
    test_count: int | None = None,
    manifest: str | None = None,
) -> str:
    """Package an artifact the way SageMaker packages /opt/ml/model, and upload it; ``test_count`` and
    ``manifest`` change what its card says it was evaluated on."""
    artifact = copy_artifact(RELEASE_MODEL, tmp_path / version, version, test_auc)
    card = read_card(artifact)
    if test_count is not None:
        card["metrics"]["test"]["count"] = test_count
    if manifest is not None:
        card["data_manifest_sha256"] = manifest
    write_card(artifact, card)
    archive = tmp_path / f"{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in artifact.iterdir():
            tar.add(path, arcname=path.name)
    key = f"training-runs/{version}/output/model.tar.gz"
    s3.upload_file(str(archive), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def test_gate_promotes_only_models_that_pass(s3: Any, tmp_path: Path) -> None:
    """First good model is promoted; a worse one and one below the minimum are published but not promoted."""
    first = publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "first", 0.97), FLOOR, tmp_path / "a")
    assert (first.promoted, first.version) == (True, "first")
    worse = publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "worse", 0.96), FLOOR, tmp_path / "b")
    assert not worse.promoted
    assert "below current first" in worse.reason
    weak = publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "weak", 0.85), FLOOR, tmp_path / "c")
    assert not weak.promoted
    assert "below the minimum" in weak.reason
    registry = ModelRegistry(s3, BUCKET)
    assert registry.current().version == "first"
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {"models/worse/model.tflite", "models/weak/model_card.json"} <= keys


def test_execution_input_cannot_lower_the_floor(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A minimum_test_auc in the execution input is ignored: the template's floor (the environment) decides."""
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("MINIMUM_TEST_AUC", "0.9")
    monkeypatch.setenv("MINIMUM_TEST_IMAGES", "500")
    handler.s3.set(s3)
    try:
        event = {"model_artifacts": _upload_tarball(s3, tmp_path, "weak", 0.85), "minimum_test_auc": 0.5}
        decision = handler.lambda_handler(event, LocalContext(function_name="pneumoscan-promotion-local"))
    finally:
        handler.s3.set(None)
    assert not decision["promoted"]
    assert "below the minimum 0.9" in decision["reason"]
    with pytest.raises(NoCurrentModelError):
        ModelRegistry(s3, BUCKET).current()


def test_gate_refuses_a_candidate_evaluated_on_other_data(s3: Any, tmp_path: Path) -> None:
    """A better AUC measured on other data (another data manifest) is not comparable: refused unless forced."""
    publish_and_promote(s3, BUCKET, _upload_tarball(s3, tmp_path, "first", 0.97), FLOOR, tmp_path / "a")
    tarball = _upload_tarball(s3, tmp_path, "other-data", 0.99, manifest="f" * 64)
    other = publish_and_promote(s3, BUCKET, tarball, FLOOR, tmp_path / "b")
    assert not other.promoted
    assert "other data than current first" in other.reason
    registry = ModelRegistry(s3, BUCKET)
    assert registry.current().version == "first"
    with pytest.raises(PromotionRefusedError, match="not comparable"):
        registry.promote("other-data")
    assert registry.promote("other-data", force=True).version == "other-data"


def test_gate_requires_a_minimum_evaluation_size(s3: Any, tmp_path: Path) -> None:
    """A model evaluated on 16 test images is never promoted by the pipeline, however high its AUC."""
    tarball = _upload_tarball(s3, tmp_path, "tiny", 0.99, test_count=16)
    tiny = publish_and_promote(s3, BUCKET, tarball, FLOOR, tmp_path / "a")
    assert not tiny.promoted
    assert "evaluated on 16 test images, fewer than the minimum 500" in tiny.reason
    with pytest.raises(NoCurrentModelError):
        ModelRegistry(s3, BUCKET).current()


def test_gate_floor_comes_only_from_the_environment() -> None:
    """Without the template's floors in the environment the function refuses to run rather than use a default."""
    assert floor_from_environment({"MINIMUM_TEST_AUC": "0.965", "MINIMUM_TEST_IMAGES": "500"}) == GateFloor(0.965, 500)
    with pytest.raises(ConfigurationError, match="MINIMUM_TEST_IMAGES"):
        floor_from_environment({"MINIMUM_TEST_AUC": "0.965"})
    with pytest.raises(ConfigurationError, match="MINIMUM_TEST_AUC"):
        floor_from_environment({"MINIMUM_TEST_IMAGES": "500"})
