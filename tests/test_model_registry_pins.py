"""The pointer pins the artifact: every file of a promoted version is pinned by sha256 in models/current.json, and
neither the registry nor the scoring function serves a file that differs from its pin.

The files are rewritten in place on moto, where no bucket policy stops it (as on the local stack): the card (a
threshold of 0.01 and no input gate, which would call a normal film and a blank PNG PNEUMONIA), the model and the
explainer (the previous release's, real LiteRT models), the input gate (one that accepts far more) and a file of a
kind this code does not know.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from moto import mock_aws
from PIL import Image

from core.model_card import CARD_FILE, EXPLAINER_FILE, GATE_FILE, MODEL_FILE, SCREENING_FILE, read_card, sha256_of
from core.model_registry import (
    POINTER_KEY,
    ModelRegistry,
    PointerMismatchError,
    PromotionRefusedError,
    RegistryError,
    UnpinnedPointerError,
    UnpromotableVersionError,
)
from core.preprocessing import preprocess
from core.results import ResultsTable
from infra.local_stack import LocalContext, drain
from infra.resources import create_data_plane
from pneumoscan.cli import main
from pneumoscan.stack import StackOutputs
from scoring import handler
from scoring.classifier import Classifier
from scoring.model_provider import REFUSED_KEEPING, REFUSED_SERVING_NOTHING
from scoring.settings import Settings
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL, SAMPLES, copy_artifact

REGION = "us-east-1"
PREVIOUS_RELEASE = RELEASE_MODEL.parent / "previous-release"
VERSION = read_card(RELEASE_MODEL)["version"]
NORMAL_FILM = SAMPLES / "NORMAL" / "IM-0001-0001.jpeg"
"""A normal film; a card rewritten to a threshold of 0.01 would call it PNEUMONIA."""


def _release_label(path: Path) -> str:
    """The label the release model, as committed, gives a film."""
    classifier = Classifier.from_directory(RELEASE_MODEL)
    return classifier.predict(preprocess(path.read_bytes(), classifier.input_size).pixels[None])[0].label.value


RELEASE_LABEL = _release_label(NORMAL_FILM)
PNEUMONIA_FILM = SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg"
EXTRA_FILE = "future_check.npz"
"""A kind of file this code does not know, beside the model: pinned like every other."""


def blank_png() -> bytes:
    """A white PNG: the input gate refuses it; without the gate, at threshold 0.01, it would be called PNEUMONIA."""
    stream = io.BytesIO()
    Image.new("L", (512, 512), 255).save(stream, format="PNG")
    return stream.getvalue()


def lowered_card() -> bytes:
    """The release card with a threshold of 0.01 and no input gate; its model, explainer and their sha256s kept."""
    card = read_card(RELEASE_MODEL)
    card["calibration"]["threshold"] = 0.01
    del card["input_gate"]
    return (json.dumps(card, indent=2) + "\n").encode()


def permissive_gate() -> bytes:
    """The release input gate with a distance threshold a thousand times wider."""
    with np.load(RELEASE_MODEL / GATE_FILE, allow_pickle=False) as arrays:
        values = {name: arrays[name] for name in arrays.files}
    values["distance_threshold"] = values["distance_threshold"] * 1000.0
    stream = io.BytesIO()
    np.savez(stream, **values)
    return stream.getvalue()


TAMPERED: dict[str, Callable[[], bytes]] = {
    CARD_FILE: lowered_card,
    MODEL_FILE: (PREVIOUS_RELEASE / MODEL_FILE).read_bytes,
    GATE_FILE: permissive_gate,
    EXPLAINER_FILE: (PREVIOUS_RELEASE / EXPLAINER_FILE).read_bytes,
}
"""What each file of the release is rewritten with, in place."""


def with_extra_file(destination: Path) -> Path:
    """A copy of the release artifact (report included) with a file of a new kind beside the model."""
    shutil.copytree(RELEASE_MODEL, destination)
    (destination / EXTRA_FILE).write_bytes(b"statistics of a check to come")
    return destination


def rewrite(s3: Any, key: str, body: bytes, bucket: str = MODEL_BUCKET) -> None:
    """Replace an object of the model bucket in place, as a writer unchecked by a bucket policy can."""
    s3.put_object(Bucket=bucket, Key=key, Body=body)


# The registry.


def test_promotion_pins_every_file_of_the_version(s3: Any, tmp_path: Path) -> None:
    """models/current.json pins the sha256 of every top-level file published, a kind of file this code does not know
    included, and none of the report."""
    artifact = with_extra_file(tmp_path / "artifact")
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(artifact)
    pointer = registry.promote(VERSION)
    expected = {
        name: sha256_of(artifact / name) for name in (MODEL_FILE, CARD_FILE, GATE_FILE, EXPLAINER_FILE, SCREENING_FILE)
    }
    assert pointer.files == {**expected, EXTRA_FILE: sha256_of(artifact / EXTRA_FILE)}
    document = json.loads(s3.get_object(Bucket=MODEL_BUCKET, Key=POINTER_KEY)["Body"].read())
    assert document["files"] == pointer.files
    assert document["model_sha256"] == expected[MODEL_FILE]
    folder = registry.fetch(registry.current(), tmp_path / "cache")
    assert {path.name: sha256_of(path) for path in folder.iterdir()} == pointer.files


@pytest.mark.parametrize("name", [*TAMPERED, EXTRA_FILE])
def test_fetch_refuses_a_file_rewritten_after_promotion(s3: Any, tmp_path: Path, name: str) -> None:
    """Any one file rewritten in place after promotion, the card included, makes the version unservable, and no
    file of it is left in the cache folder."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(with_extra_file(tmp_path / "artifact"))
    pointer = registry.promote(VERSION)
    rewrite(s3, pointer.prefix + name, TAMPERED.get(name, lambda: b"other statistics")())
    cache = tmp_path / "cache"
    with pytest.raises(PointerMismatchError, match=rf"{name} has sha256 .* but {POINTER_KEY} pins"):
        registry.fetch(pointer, cache)
    assert list(cache.iterdir()) == []


def test_fetch_refuses_a_pinned_file_that_is_gone(s3: Any, tmp_path: Path) -> None:
    """A pinned file deleted after promotion is a mismatch, not a passing fault."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    pointer = registry.promote(VERSION)
    s3.delete_object(Bucket=MODEL_BUCKET, Key=pointer.prefix + GATE_FILE)
    with pytest.raises(PointerMismatchError, match=r"pinned .* but gone"):
        registry.fetch(pointer, tmp_path / "cache")


def test_fetch_uses_a_cached_copy_only_while_it_matches_the_pins(s3: Any, tmp_path: Path) -> None:
    """A cached copy that holds exactly the pinned files is served without S3; a cached file changed on disk is
    downloaded again, and a stray file is removed."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    pointer = registry.promote(VERSION)
    assert pointer.files is not None
    cache = tmp_path / "cache"
    folder = registry.fetch(pointer, cache)
    (folder / CARD_FILE).write_bytes(lowered_card())
    (folder / EXTRA_FILE).write_bytes(b"left behind")
    assert registry.fetch(pointer, cache) == folder
    assert {path.name: sha256_of(path) for path in folder.iterdir()} == pointer.files
    offline = ModelRegistry(s3, "no-such-bucket")
    assert offline.fetch(pointer, cache) == folder


def test_a_pointer_without_pins_is_read_but_not_served_until_promoted_again(s3: Any, tmp_path: Path) -> None:
    """A pointer written before pins existed still names its version (status, backfill), but its model is not served
    until the version is promoted again, which pins it."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    document = asdict(registry.promote(VERSION))
    del document["files"]
    s3.put_object(Bucket=MODEL_BUCKET, Key=POINTER_KEY, Body=json.dumps(document).encode())
    legacy = registry.current()
    assert (legacy.version, legacy.files) == (VERSION, None)
    with pytest.raises(UnpinnedPointerError, match=rf"promote it again .*--version {VERSION}"):
        registry.fetch(legacy, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert registry.promote(VERSION).files is not None
    assert registry.download_current(tmp_path / "cache")[0].version == VERSION


@pytest.mark.parametrize(
    "files",
    [
        {"../model.tflite": "0" * 64, CARD_FILE: "0" * 64},
        {MODEL_FILE: "not a sha256", CARD_FILE: "0" * 64},
        {MODEL_FILE: "0" * 64},
        ["model.tflite"],
    ],
    ids=["a path", "not a sha256", "no card", "not a map"],
)
def test_malformed_pins_are_refused(s3: Any, files: Any) -> None:
    """Pins that name a path, hold something other than a sha256, leave out the card or are not a map make the
    pointer malformed."""
    document = {
        "version": VERSION,
        "prefix": f"models/{VERSION}/",
        "model_sha256": "0" * 64,
        "test_auc": None,
        "promoted_at": "2026-01-01T00:00:00+00:00",
        "files": files,
    }
    s3.put_object(Bucket=MODEL_BUCKET, Key=POINTER_KEY, Body=json.dumps(document).encode())
    with pytest.raises(RegistryError, match="malformed"):
        ModelRegistry(s3, MODEL_BUCKET).current()


def test_promotion_refuses_a_version_whose_files_disagree_with_its_card(s3: Any) -> None:
    """A file rewritten between publish and promote is never pinned: promotion checks every file against the card
    and leaves the pointer alone."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    rewrite(s3, f"models/{VERSION}/{GATE_FILE}", permissive_gate())
    with pytest.raises(UnpromotableVersionError, match=f"do not match its card.*{GATE_FILE} has sha256"):
        registry.promote(VERSION)
    assert s3.list_objects_v2(Bucket=MODEL_BUCKET, Prefix=POINTER_KEY)["KeyCount"] == 0


def test_the_gate_compares_only_with_the_pinned_card_of_the_current_model(s3: Any, tmp_path: Path) -> None:
    """When the current model's card was rewritten after promotion (here to a higher test AUC), a candidate is not
    judged against it: promotion is refused unless forced."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    registry.promote(VERSION)
    card = read_card(RELEASE_MODEL)
    card["metrics"]["test"]["auc"]["value"] = 0.9999
    rewrite(s3, f"models/{VERSION}/{CARD_FILE}", json.dumps(card).encode())
    registry.publish(copy_artifact(RELEASE_MODEL, tmp_path / "candidate", "candidate"))
    with pytest.raises(PromotionRefusedError, match="changed after promotion"):
        registry.promote("candidate")
    assert registry.promote("candidate", force=True).version == "candidate"


def test_cli_refuses_to_score_with_a_rewritten_promoted_version(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pneumoscan score --model s3://bucket` refuses a promoted version whose card was rewritten, in one line with
    the fix, exit code 5, and scores nothing."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # An empty /tmp: no verified copy cached from before.
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    registry.promote(VERSION)
    rewrite(s3, f"models/{VERSION}/{CARD_FILE}", lowered_card())
    capsys.readouterr()
    assert main(["score", "--model", f"s3://{MODEL_BUCKET}", str(NORMAL_FILM)]) == 5
    output = capsys.readouterr()
    assert output.out == ""
    assert "changed after promotion: restore it, or promote another" in output.err


# The scoring function.


@dataclass
class Stack:
    """The template's resources on moto with the release model promoted, and the scoring handler wired to them."""

    outputs: StackOutputs
    s3: Any
    sqs: Any
    dynamodb: Any
    scratch: Path
    starts: int = 0

    def start_cold(self) -> None:
        """A new execution environment: a new pipeline, nothing in memory, an empty /tmp. The pointer is re-read at
        every invocation (a refresh interval of 0 s), so a warm function refreshes before each batch."""
        self.starts += 1
        settings = Settings.from_environment(
            {
                "RESULTS_TABLE": self.outputs.results_table,
                "INPUT_BUCKET": self.outputs.input_bucket,
                "INPUT_PREFIX": self.outputs.input_prefix,
                "MODEL_BUCKET": self.outputs.model_bucket,
                "MODEL_CACHE_DIR": str(self.scratch / f"tmp-{self.starts}"),
                "MODEL_REFRESH_SECONDS": "0",
                "HEATMAP_BUCKET": self.outputs.heatmap_bucket,
            }
        )
        handler.pipeline.set(handler.build_pipeline(settings, self.s3, self.dynamodb))

    def rewrite(self, key: str, body: bytes) -> None:
        rewrite(self.s3, key, body, self.outputs.model_bucket)

    def model_object(self, key: str) -> bytes:
        body: bytes = self.s3.get_object(Bucket=self.outputs.model_bucket, Key=key)["Body"].read()
        return body

    def upload(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.outputs.input_bucket, Key=key, Body=body)

    def records(self) -> list[dict[str, Any]]:
        """Every message waiting in the scoring queue, as Lambda's SQS event records."""
        template: dict[str, Any] = json.loads((Path(__file__).parent / "events" / "sqs_event.json").read_text())
        records = []
        for message in drain(self.sqs, self.outputs.queue_url):
            record = copy.deepcopy(template["Records"][0])
            record["messageId"], record["body"] = message["MessageId"], message["Body"]
            records.append(record)
        return records

    def latest(self, key: str) -> dict[str, Any] | None:
        return ResultsTable(self.dynamodb, self.outputs.results_table).latest(f"s3://{self.outputs.input_bucket}/{key}")


def invoke(records: list[dict[str, Any]]) -> list[str]:
    """The message ids of the records the invocation reports failed (SQS retries them)."""
    response = handler.lambda_handler({"Records": records}, LocalContext(aws_request_id="pins"))
    return [failure["itemIdentifier"] for failure in response["batchItemFailures"]]


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Stack]:
    """The template's resources on moto, the release model published and promoted, a cold function wired to them."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    with mock_aws():
        s3, sqs = boto3.client("s3", region_name=REGION), boto3.client("sqs", region_name=REGION)
        dynamodb, events = boto3.client("dynamodb", region_name=REGION), boto3.client("events", region_name=REGION)
        outputs = create_data_plane(s3, sqs, dynamodb, events, region=REGION)
        registry = ModelRegistry(s3, outputs.model_bucket)
        registry.publish(RELEASE_MODEL)
        registry.promote(VERSION)
        stack = Stack(outputs, s3, sqs, dynamodb, tmp_path)
        stack.start_cold()
        drain(sqs, outputs.queue_url)  # S3's s3:TestEvent for the notification configuration.
        yield stack
        handler.pipeline.set(None)


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    """The function's model-refused log lines: their fixed message and their fields."""
    lines = [
        json.loads(handler.logger.registered_formatter.format(record))
        for record in caplog.records
        if record.name == "pneumoscan-scoring" and record.levelno == logging.ERROR
    ]
    # The records the refusal fails log errors of their own (``record failed``), with a fault class instead.
    return [(line["message"], line) for line in lines if "fault_class" not in line]


def refused_metrics(output: str) -> list[float]:
    """The ModelRefused values of the EMF documents the function printed."""
    documents = [json.loads(line) for line in output.splitlines() if line.startswith('{"_aws"')]
    return [value for document in documents for value in document.get("ModelRefused", [])]


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_file_rewritten_in_place_is_never_served(
    stack: Stack, name: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a promoted file is rewritten in place, a warm function keeps serving the pinned model exactly (the
    normal film NORMAL with its probability, the blank PNG refused by the gate, the heatmap made by the pinned
    explainer); a cold one refuses to serve, reports it, and fails the records so they are retried; once the file
    is restored, the retried records are scored with the pinned model."""
    stack.upload("incoming/before/normal.jpeg", NORMAL_FILM.read_bytes())
    assert invoke(stack.records()) == []  # Warm now; this batch needed no heatmap, so no explainer is loaded yet.
    before = stack.latest("incoming/before/normal.jpeg")
    assert before is not None and before["label"] == RELEASE_LABEL
    key = f"models/{VERSION}/{name}"
    pinned = stack.model_object(key)
    stack.rewrite(key, TAMPERED[name]())

    films = {
        "normal.jpeg": NORMAL_FILM.read_bytes(),
        "blank.png": blank_png(),
        "pneumonia.jpeg": PNEUMONIA_FILM.read_bytes(),
    }
    for film, body in films.items():
        stack.upload(f"incoming/warm/{film}", body)
    assert invoke(stack.records()) == []
    normal, blank, pneumonia = (stack.latest(f"incoming/warm/{film}") for film in films)
    assert normal is not None and blank is not None and pneumonia is not None
    assert (normal["label"], normal["pneumonia_probability"]) == (RELEASE_LABEL, before["pneumonia_probability"])
    assert (blank["status"], blank["reason"]) == ("REJECTED", "NOT_A_CHEST_XRAY")
    assert pneumonia["label"] == "PNEUMONIA" and "heatmap_key" in pneumonia

    stack.start_cold()
    for film, body in films.items():
        stack.upload(f"incoming/cold/{film}", body)
    records = stack.records()
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="pneumoscan-scoring"):
        assert invoke(records) == [record["messageId"] for record in records]
    assert all(stack.latest(f"incoming/cold/{film}") is None for film in films)
    [(message, fields)] = refusals(caplog)
    assert message == REFUSED_SERVING_NOTHING
    assert (fields["refused_version"], fields.get("serving_version")) == (VERSION, None)
    assert f"{key} has sha256" in fields["detail"]
    assert refused_metrics(capsys.readouterr().out) == [1.0]

    stack.rewrite(key, pinned)
    assert invoke(records) == []
    restored = stack.latest("incoming/cold/normal.jpeg")
    assert restored is not None
    assert (restored["label"], restored["pneumonia_probability"]) == (RELEASE_LABEL, before["pneumonia_probability"])
    blank_again = stack.latest("incoming/cold/blank.png")
    assert blank_again is not None and blank_again["reason"] == "NOT_A_CHEST_XRAY"


def test_a_refresh_to_a_rewritten_version_keeps_the_model_in_memory(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """When a newly promoted version's card is rewritten before the function refreshes, the warm function keeps
    serving the model in memory and reports the refusal with a fixed message and a ModelRefused metric; once the
    card is restored, the next refresh serves the new version."""
    stack.upload("incoming/first.jpeg", NORMAL_FILM.read_bytes())
    assert invoke(stack.records()) == []
    registry = ModelRegistry(stack.s3, stack.outputs.model_bucket)
    candidate = copy_artifact(RELEASE_MODEL, tmp_path / "candidate", "candidate")
    registry.publish(candidate)
    registry.promote("candidate")
    stack.rewrite(f"models/candidate/{CARD_FILE}", lowered_card())

    stack.upload("incoming/second.jpeg", NORMAL_FILM.read_bytes())
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="pneumoscan-scoring"):
        assert invoke(stack.records()) == []
    second = stack.latest("incoming/second.jpeg")
    assert second is not None
    assert (second["model_version"], second["label"]) == (VERSION, RELEASE_LABEL)
    [(message, fields)] = refusals(caplog)
    assert message == REFUSED_KEEPING
    assert (fields["refused_version"], fields["serving_version"]) == ("candidate", VERSION)
    assert refused_metrics(capsys.readouterr().out) == [1.0]

    stack.rewrite(f"models/candidate/{CARD_FILE}", (candidate / CARD_FILE).read_bytes())
    stack.upload("incoming/third.jpeg", NORMAL_FILM.read_bytes())
    assert invoke(stack.records()) == []
    third = stack.latest("incoming/third.jpeg")
    assert third is not None
    assert (third["model_version"], third["label"]) == ("candidate", RELEASE_LABEL)


def test_a_pointer_without_pins_is_served_only_after_promoting_again(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A pointer written before pins existed leaves a warm function serving the model it verified and a cold one
    refusing, with the fix in the detail; `pneumoscan promote` of the same version pins it and the retried records
    are scored."""
    stack.upload("incoming/warm.jpeg", NORMAL_FILM.read_bytes())
    assert invoke(stack.records()) == []
    document = json.loads(stack.model_object(POINTER_KEY))
    del document["files"]
    stack.rewrite(POINTER_KEY, json.dumps(document).encode())

    stack.upload("incoming/still-warm.jpeg", NORMAL_FILM.read_bytes())
    assert invoke(stack.records()) == []
    still_warm = stack.latest("incoming/still-warm.jpeg")
    assert still_warm is not None and still_warm["model_version"] == VERSION

    stack.start_cold()
    stack.upload("incoming/cold.jpeg", NORMAL_FILM.read_bytes())
    records = stack.records()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pneumoscan-scoring"):
        assert invoke(records) == [records[0]["messageId"]]
    [(message, fields)] = refusals(caplog)
    assert message == REFUSED_SERVING_NOTHING
    assert f"pneumoscan promote --version {VERSION}" in fields["detail"]

    assert main(["promote", "--bucket", stack.outputs.model_bucket, "--version", VERSION]) == 0
    assert invoke(records) == []
    cold = stack.latest("incoming/cold.jpeg")
    assert cold is not None and cold["label"] == RELEASE_LABEL
