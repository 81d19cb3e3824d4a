"""The training pipeline's gate: publish a finished SageMaker training job's model and promote it if it passes.

Step Functions invokes ``lambda_handler`` with the job's ``model.tar.gz``. The artifact is unpacked, checked against
its card, published to ``models/<version>/``, and promoted only when its test AUC is at least the minimum and not
below the current model's. The answer says whether it was promoted, and why not.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from core.model_card import ModelArtifactError, verify_artifact
from core.model_registry import ModelRegistry, PromotionRefusedError, VersionExistsError
from core.provider import Provider
from core.s3 import S3Location

logger = Logger(service="pneumoscan-promotion")
s3 = Provider(lambda: boto3.client("s3"))
"""The S3 client of this execution environment."""


@dataclass(frozen=True)
class GateDecision:
    """What the gate did with one trained model."""

    promoted: bool
    version: str
    test_auc: float | None
    reason: str


def publish_and_promote(
    s3_client: Any, model_bucket: str, model_tarball: str, minimum_test_auc: float, scratch: Path
) -> GateDecision:
    """Unpack the training job's artifact, publish it, and promote it when it passes the gate."""
    location = S3Location.parse(model_tarball)
    scratch.mkdir(parents=True, exist_ok=True)
    archive = scratch / "model.tar.gz"
    s3_client.download_file(location.bucket, location.prefix, str(archive))
    artifact = scratch / "artifact"
    with tarfile.open(archive) as tar:
        tar.extractall(artifact, filter="data")
    spec = verify_artifact(artifact)
    registry = ModelRegistry(s3_client, model_bucket)
    try:
        registry.publish(artifact)
    except VersionExistsError as refusal:
        return GateDecision(False, spec.version, spec.test_auc, str(refusal))
    if spec.test_auc is None or spec.test_auc < minimum_test_auc:
        reason = f"test AUC {spec.test_auc} is below the minimum {minimum_test_auc}"
        return GateDecision(False, spec.version, spec.test_auc, reason)
    try:
        registry.promote(spec.version)
    except PromotionRefusedError as refusal:
        return GateDecision(False, spec.version, spec.test_auc, str(refusal))
    return GateDecision(True, spec.version, spec.test_auc, "promoted")


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        try:
            decision = publish_and_promote(
                s3.get(),
                os.environ["MODEL_BUCKET"],
                event["model_artifacts"],
                float(event.get("minimum_test_auc", os.environ.get("MINIMUM_TEST_AUC", "0.9"))),
                Path(scratch),
            )
        except ModelArtifactError as error:
            decision = GateDecision(False, "unknown", None, f"artifact rejected: {error}")
    logger.info("gate decision", extra=asdict(decision))
    return asdict(decision)
