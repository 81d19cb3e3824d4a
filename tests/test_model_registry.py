"""Publishing and promoting model artifacts in S3 (moto), and scoring from the registry."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

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
from infra.template import load_template
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
    """`pneumoscan publish`, `promote` and `score --model s3://bucket` work together: the promoted model answers
    exactly as the folder it was published from."""
    version = read_card(smoke_artifact)["version"]
    assert main(["publish", "--bucket", BUCKET, "--model", str(smoke_artifact)]) == 0
    assert main(["promote", "--bucket", BUCKET, "--version", version]) == 0
    films = [str(path) for path in sample_paths[:4]]
    capsys.readouterr()
    from_registry = main(["score", "--model", f"s3://{BUCKET}", *films])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from_folder = main(["score", "--model", str(smoke_artifact), *films])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    # A smoke model is trained on a handful of films, so its input gate may refuse a sample (which one depends on
    # the machine's arithmetic): each line is a result of this version or a refusal with its reason, and the exit
    # code says whether any film was refused.
    refused = [line for line in lines if "reason" in line]
    assert [line["path"] for line in lines] == films
    assert all(line["model_version"] == version for line in lines if line not in refused)
    assert from_registry == from_folder == (1 if refused else 0)


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


CREATION_OPERATIONS = {
    # S3 operation -> whether it is an object-creation operation (s3:ObjectCreationOperation): every one of them is
    # authorised as s3:PutObject, and only PutObject and CompleteMultipartUpload accept If-None-Match.
    "PutObject": True,
    "CompleteMultipartUpload": True,
    "CreateMultipartUpload": False,
    "UploadPart": False,
    "UploadPartCopy": False,
}


@dataclass(frozen=True)
class WriteRequest:
    """An S3 request that writes an object, as the bucket policy sees it."""

    operation: str
    key: str
    if_none_match: bool


def _record_writes(client: Any) -> list[WriteRequest]:
    """Every object-writing request ``client`` sends from now on."""
    sent: list[WriteRequest] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in CREATION_OPERATIONS:
            sent.append(WriteRequest(model.name, params["Key"], "IfNoneMatch" in params))

    client.meta.events.register("before-parameter-build.s3", record)
    return sent


def _denied_by_model_bucket_policy(request: WriteRequest) -> bool:
    """Whether a Deny statement of the template's model-bucket policy refuses the request (its ``s3:PutObject``
    statements on a key pattern, with ``Null`` and ``Bool`` conditions: moto enforces no bucket policy)."""
    policy = load_template()["Resources"]["ModelBucketPolicy"]["Properties"]["PolicyDocument"]
    context = {
        "s3:if-none-match": request.if_none_match,
        "s3:ObjectCreationOperation": CREATION_OPERATIONS[request.operation],
    }
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resource = statement["Resource"]
        if statement["Effect"] != "Deny" or not ({"s3:PutObject", "s3:*"} & set(actions)):
            continue
        if not isinstance(resource, dict) or not fnmatch.fnmatchcase(
            request.key, resource["Fn::Sub"].removeprefix("${ModelBucket.Arn}/")
        ):
            continue
        conditions = statement.get("Condition", {})
        if "Bool" in conditions and set(conditions["Bool"]) == {"aws:SecureTransport"}:
            continue  # Every client here uses HTTPS.
        holds = all(
            (not context[key]) == (expected == "true") if operator == "Null" else context[key] == (expected == "true")
            for operator, tests in conditions.items()
            for key, expected in tests.items()
        )
        if holds:
            return True
    return False


def test_publish_writes_a_large_model_in_single_conditional_puts(s3: Any) -> None:
    """``pneumoscan publish`` writes even a model larger than the multipart threshold of ``aws s3 cp`` (8 MB) in one
    conditional PUT per file, which the model bucket's policy admits; the multipart upload that ``aws s3 cp`` (and
    boto3's ``upload_file``) makes of the same file is refused by it, part by part (README, "The model registry")."""
    model = RELEASE_MODEL / "model.tflite"
    assert model.stat().st_size > TransferConfig().multipart_threshold == 8 * 2**20
    published = _record_writes(s3)
    prefix = ModelRegistry(s3, BUCKET).publish(RELEASE_MODEL)
    assert {request.operation for request in published} == {"PutObject"}
    assert f"{prefix}model.tflite" in {request.key for request in published}
    assert not any(_denied_by_model_bucket_policy(request) for request in published)
    copied = _record_writes(s3)
    s3.upload_file(str(model), BUCKET, "models/by-hand/model.tflite")
    assert {request.operation for request in copied} == {
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
    }
    assert all(_denied_by_model_bucket_policy(request) for request in copied)
