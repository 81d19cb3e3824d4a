"""Operations on a running stack, end to end on the local stack: result queries, backfill and re-scoring with a
newly promoted model, heatmaps, and the result event feed that downstream systems consume."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from core.model_card import read_card
from infra.local_stack import LocalStack
from pneumoscan.cli import main
from pneumoscan.errors import ExitCode
from tests.conftest import RELEASE_MODEL, REPOSITORY_ROOT, copy_artifact

RESULT_EVENT_SCHEMA = json.loads((REPOSITORY_ROOT / "schemas" / "result-event.schema.json").read_text())
pytestmark = pytest.mark.slow


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


def cli_json(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, Any]:
    """Run a command; its exit code and the JSON document it printed last (the stack's own log lines, JSON too,
    carry a "level" or "_aws" key and are passed over)."""
    capsys.readouterr()
    code = main(list(arguments))
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    printed = [document for document in documents if not {"level", "_aws"} & document.keys()]
    return code, printed[-1] if printed else None


@pytest.fixture
def running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[LocalStack, Path]]:
    """The local stack with the release model published and promoted, and its outputs file."""
    with LocalStack(retry_delay_seconds=1, quiet=True, parameters={"Heatmaps": "Flagged"}) as stack:
        assert stack.outputs is not None
        outputs = tmp_path / "stack.json"
        outputs.write_text(stack.outputs.to_json())
        assert main(["publish", "--outputs", str(outputs)]) == 0
        assert main(["promote", "--outputs", str(outputs), "--version", read_card(RELEASE_MODEL)["version"]]) == 0
        capsys.readouterr()
        yield stack, outputs


def test_results_backfill_rescoring_heatmaps_and_events(
    running: tuple[LocalStack, Path], sample_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Uploads are scored, queried and published; a backfill re-scores them with a new model, keeping history."""
    stack, outputs = running
    assert stack.outputs is not None and stack.stream_emulator is not None
    downstream = stack.subscribe("downstream")
    s3 = stack.client("s3")
    started = datetime.now(UTC) - timedelta(seconds=1)
    films = {
        f"incoming/ops/{path.parent.name.lower()}-{path.name}": path for path in sample_paths[:2] + sample_paths[-2:]
    }
    for key, path in films.items():
        s3.put_object(Bucket=stack.outputs.input_bucket, Key=key, Body=path.read_bytes())
    s3.put_object(Bucket=stack.outputs.input_bucket, Key="incoming/ops/notes.txt", Body=b"not an image")

    def latest(key: str) -> dict[str, Any] | None:
        code, document = cli_json(capsys, "results", "--outputs", str(outputs), key)
        return document["latest"] if code == 0 else None

    wait_for(lambda: all(latest(key) for key in [*films, "incoming/ops/notes.txt"]), "results of the uploads")
    first = {key: latest(key) for key in films}
    assert {item["status"] for item in first.values()} == {"SCORED"}
    assert latest("incoming/ops/notes.txt")["status"] == "REJECTED"  # type: ignore[index]

    # Heatmaps: every flagged verdict points to a PNG in the heatmap bucket, which triggers nothing.
    heatmap_bucket = stack.outputs.heatmap_bucket
    for item in first.values():
        assert ("heatmap_key" in item) == (item["label"] in {"PNEUMONIA", "INDETERMINATE"})
        if "heatmap_key" in item:
            bucket, key = item["heatmap_key"].removeprefix("s3://").split("/", 1)
            assert bucket == heatmap_bucket
            assert s3.get_object(Bucket=bucket, Key=key)["Body"].read().startswith(b"\x89PNG")
    assert any(item["label"] == "PNEUMONIA" for item in first.values())
    assert "QueueConfigurations" not in s3.get_bucket_notification_configuration(Bucket=heatmap_bucket)

    # The event feed: one schema-valid event per result, matching the table.
    events = stack.receive_events(downstream, expected=5, timeout_seconds=60)
    assert len({event["detail"]["result_id"] for event in events}) == 5
    for event in events:
        assert event["source"] == "pneumoscan" and event["detail-type"] == "pneumoscan.result"
        jsonschema.validate(event["detail"], RESULT_EVENT_SCHEMA)
    by_key = {event["detail"]["image_key"]: event["detail"] for event in events}
    for item in first.values():
        assert by_key[item["image_key"]] == {**item, "result_id": f"{item['image_key']}#{item['object_sequence']}"}

    # A new model is promoted; a backfill of the prefix re-scores every film with it.
    new_version = "compact-rescoring-test"
    assert (
        main(
            [
                "publish",
                "--outputs",
                str(outputs),
                "--model",
                str(copy_artifact(RELEASE_MODEL, tmp_path / new_version, new_version)),
            ]
        )
        == 0
    )
    assert main(["promote", "--outputs", str(outputs), "--version", new_version, "--force"]) == 0
    state = tmp_path / "backfill.json"
    code, summary = cli_json(
        capsys, "backfill", "--outputs", str(outputs), "--prefix", "incoming/ops/", "--state", str(state)
    )
    assert code == 0
    assert summary == {"enqueued": 5, "model_version": new_version, "state": str(state)}

    def rescored() -> bool:
        return all((latest(key) or {}).get("model_version") == new_version for key in films)

    wait_for(rescored, "re-scoring by the new model")
    for key in films:
        code, document = cli_json(capsys, "results", "--outputs", str(outputs), key)
        history = document["history"]
        assert [item["trigger"] for item in history] == ["upload", "backfill"]
        assert history[0] == first[key]
        assert document["latest"] == history[1]
        assert history[1]["object_sequence"] == f"{history[0]['object_sequence']}|{new_version}"

    # The same for people: a table with the latest result marked.
    capsys.readouterr()
    key = next(iter(films))
    assert main(["results", "--outputs", str(outputs), key, "--format", "table"]) == 0
    table = " ".join(capsys.readouterr().out.split())  # Rich wraps the title to the terminal's width.
    assert "2 result(s), latest marked *" in table and "backfill" in table and "upload" in table

    # Running it again resumes from its finished state; a fresh state re-sends, and nothing is scored twice.
    code, summary = cli_json(
        capsys, "backfill", "--outputs", str(outputs), "--prefix", "incoming/ops/", "--state", str(state)
    )
    assert summary["enqueued"] == 5
    code, summary = cli_json(
        capsys,
        "backfill",
        "--outputs",
        str(outputs),
        "--prefix",
        "incoming/ops/",
        "--state",
        str(tmp_path / "again.json"),
    )
    assert summary["enqueued"] == 5
    wait_for(lambda: stack.emulator is not None and stack.emulator.stats.messages_deleted >= 16, "second backfill")

    # By time: ten results since the start (five uploads, five re-scorings), paged three at a time.
    items: list[dict[str, Any]] = []
    token: str | None = None
    pages = 0
    while True:
        arguments = ["results", "--outputs", str(outputs), "--since", started.isoformat(), "--limit", "3"]
        code, page = cli_json(capsys, *arguments, *(["--page-token", token] if token else []))
        items += page["items"]
        pages += 1
        token = page["next_page_token"]
        if token is None:
            break
    assert len(items) == 10 and pages == 4
    assert [item["scored_at"] for item in items] == sorted(item["scored_at"] for item in items)
    code, page = cli_json(
        capsys, "results", "--outputs", str(outputs), "--since", started.isoformat(), "--status", "REJECTED"
    )
    assert [item["image_key"].rsplit("/", 1)[-1] for item in page["items"]] == ["notes.txt", "notes.txt"]

    events += stack.receive_events(downstream, expected=5, timeout_seconds=60)
    assert len({event["detail"]["result_id"] for event in events}) == 10


def test_backfill_refuses_a_model_that_is_not_promoted(
    running: tuple[LocalStack, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The function scores with the promoted model, so a backfill asking for another one stops before sending."""
    _, outputs = running
    capsys.readouterr()
    assert main(["backfill", "--outputs", str(outputs), "--model-version", "some-other-model"]) == ExitCode.USAGE
    assert "not the promoted model" in capsys.readouterr().err
    assert main(["backfill", "--outputs", str(outputs), "--prefix", "elsewhere/"]) == ExitCode.USAGE
    assert "outside" in capsys.readouterr().err
