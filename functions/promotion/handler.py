"""The training pipeline's gate: publish a finished SageMaker training job's model and promote it if it passes.

Step Functions invokes ``lambda_handler`` with the job's ``model.tar.gz``. The artifact is unpacked, checked against
its card, published to ``models/<version>/``, and promoted only when it passes the gate (``core.promotion_gate``:
the template's floors, the same evaluation data as the current model, a test AUC not below its). The execution
input names only the artifact. The answer says whether it was promoted, and why not.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from core.config import ConfigurationError
from core.model_card import ModelArtifactError, verify_artifact
from core.model_registry import ModelRegistry, PromotionRefusedError, VersionExistsError
from core.promotion_gate import GateFloor
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
    s3_client: Any, model_bucket: str, model_tarball: str, floor: GateFloor, scratch: Path
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
    try:
        registry.promote(spec.version, floor=floor)
    except PromotionRefusedError as refusal:
        return GateDecision(False, spec.version, spec.test_auc, str(refusal))
    return GateDecision(True, spec.version, spec.test_auc, "promoted")


def floor_from_environment(environment: Mapping[str, str] = os.environ) -> GateFloor:
    """The gate's floor, from the template's parameters alone: nothing in the execution input can lower it."""
    try:
        return GateFloor(
            minimum_test_auc=float(environment["MINIMUM_TEST_AUC"]),
            minimum_test_count=int(environment["MINIMUM_TEST_IMAGES"]),
        )
    except KeyError as missing:
        raise ConfigurationError(f"environment variable {missing} is required") from missing
    except ValueError as error:
        raise ConfigurationError(f"malformed gate floor: {error}") from error


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    floor = floor_from_environment()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            decision = publish_and_promote(
                s3.get(), os.environ["MODEL_BUCKET"], event["model_artifacts"], floor, Path(scratch)
            )
        except ModelArtifactError as error:
            decision = GateDecision(False, "unknown", None, f"artifact rejected: {error}")
    logger.info("gate decision", extra=asdict(decision))
    return asdict(decision)
