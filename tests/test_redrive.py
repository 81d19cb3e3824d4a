"""`pneumoscan redrive` on the local stack: dead-lettered uploads go back to the scoring queue and are scored."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.results import ResultsTable
from infra.local_stack import LocalStack
from pneumoscan.cli import main
from pneumoscan.redrive import redrive, waiting_count
from tests.conftest import RELEASE_MODEL, SAMPLES

MODEL_REFRESH_SECONDS = 5.0
"""How long the local stack's scoring function may keep believing no model is promoted (its refresh interval)."""


def _wait(condition_met: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition_met():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_dead_lettered_upload_comes_back_and_is_scored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An upload dead-lettered while no model was promoted is counted by --dry-run (and left in place), moved back by
    redrive once a model is served, and scored; the dead-letter queue is then empty."""
    with LocalStack(retry_delay_seconds=0, quiet=True) as stack:
        assert stack.outputs is not None
        outputs = tmp_path / "local-stack.json"
        outputs.write_text(stack.outputs.to_json())
        sqs, table = stack.client("sqs"), ResultsTable(stack.client("dynamodb"), stack.outputs.results_table)
        key = "incoming/redrive/film.jpeg"
        body = (SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg").read_bytes()
        stack.client("s3").put_object(Bucket=stack.outputs.input_bucket, Key=key, Body=body)
        _wait(lambda: waiting_count(sqs, stack.outputs.dlq_url) == 1, "the upload was not dead-lettered")

        stack.serve(RELEASE_MODEL)
        time.sleep(MODEL_REFRESH_SECONDS + 1)
        capsys.readouterr()
        assert main(["redrive", "--outputs", str(outputs), "--dry-run"]) == 0
        assert json.loads(capsys.readouterr().out) == {"dead_letters": 1, "moved": 0, "dry_run": True}
        assert waiting_count(sqs, stack.outputs.dlq_url) == 1

        assert main(["redrive", "--outputs", str(outputs)]) == 0
        assert json.loads(capsys.readouterr().out) == {"dead_letters": 1, "moved": 1, "dry_run": False}
        image = f"s3://{stack.outputs.input_bucket}/{key}"
        _wait(lambda: table.latest(image) is not None, "the redriven upload was not scored")
        latest = table.latest(image)
        assert latest is not None
        assert latest["status"] == "SCORED"
        assert waiting_count(sqs, stack.outputs.dlq_url) == 0


def test_redrive_needs_a_stack(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --stack-name or --outputs there is no dead-letter queue to name: a usage error, exit code 2."""
    assert main(["redrive"]) == 2
    assert "--stack-name or --outputs" in capsys.readouterr().err


class _MoveTaskSqs:
    """An SQS client whose endpoint has the message move task, recording what it is asked."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:  # noqa: N803  # boto3's names.
        attributes = {"QueueArn": f"arn:aws:sqs:us-east-1:123456789012:{QueueUrl.rsplit('/', 1)[-1]}"}
        return {"Attributes": {**attributes, "ApproximateNumberOfMessages": "3"}}

    def start_message_move_task(self, SourceArn: str, DestinationArn: str) -> dict[str, str]:  # noqa: N803  # boto3's names.
        self.started.append((SourceArn, DestinationArn))
        return {"TaskHandle": "task-1"}

    def receive_message(self, **_: object) -> dict[str, Any]:
        raise AssertionError("messages are moved one by one although the endpoint has a move task")


def test_redrive_uses_sqs_message_move_task_where_the_endpoint_has_one() -> None:
    """On an endpoint with StartMessageMoveTask, the task moves the messages from the DLQ to the scoring queue."""
    sqs = _MoveTaskSqs()
    report = redrive(sqs, "https://sqs/123/dlq", "https://sqs/123/scoring")
    assert sqs.started == [("arn:aws:sqs:us-east-1:123456789012:dlq", "arn:aws:sqs:us-east-1:123456789012:scoring")]
    assert (report.move_task, report.waiting, report.moved) == ("task-1", 3, 3)
