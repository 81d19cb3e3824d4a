"""`pneumoscan status`: the operator's morning screen, on the local stack and from its parts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from core.model_card import read_card
from core.results import ResultsTable
from infra.local_stack import LocalStack
from pneumoscan.cli import main
from pneumoscan.redrive import waiting_count
from pneumoscan.status import (
    DRIFT_MINIMUM_FILMS,
    WindowCounts,
    alarms_in_alarm,
    drift_check,
    expected_pneumonia_rate,
    stack_alarm_names,
)
from tests.conftest import RELEASE_MODEL, SAMPLES

MODEL_REFRESH_SECONDS = 5.0
"""How long the local stack's scoring function may keep believing no model is promoted (its refresh interval)."""
ALARM = "pneumoscan-test-queue-age"


def _wait(condition_met: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition_met():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.2)


def _day(scored: int, pneumonia: int) -> WindowCounts:
    return WindowCounts("last day", "", scored, {"SCORED": scored}, {}, scored, pneumonia)


def raise_alarm(cloudwatch: Any, name: str, reason: str) -> None:
    """Create an alarm on the age of the oldest queued message and set it to ALARM."""
    cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace="AWS/SQS",
        MetricName="ApproximateAgeOfOldestMessage",
        Statistic="Maximum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=300,
        ComparisonOperator="GreaterThanThreshold",
    )
    cloudwatch.set_alarm_state(AlarmName=name, StateValue="ALARM", StateReason=reason)


def test_the_expected_rate_is_the_share_of_test_films_called_pneumonia() -> None:
    """The card's expectation is the share of its test films the model called PNEUMONIA (true and false positives)."""
    matrix = read_card(RELEASE_MODEL)["metrics"]["test"]["confusion_matrix"]
    called = matrix["true_positive"] + matrix["false_positive"]
    assert expected_pneumonia_rate(read_card(RELEASE_MODEL)) == pytest.approx(called / sum(matrix.values()))
    assert expected_pneumonia_rate({"metrics": {}}) is None


def test_drift_is_flagged_beyond_three_standard_errors_only_with_enough_films() -> None:
    """A day's PNEUMONIA share far from the card's is flagged; a close one, or one of too few films, is not."""
    assert drift_check(_day(400, 120), 0.68).drifted
    assert not drift_check(_day(400, 270), 0.68).drifted
    few = drift_check(_day(DRIFT_MINIMUM_FILMS - 1, 0), 0.68)
    assert not few.drifted and "fewer than" in few.note
    assert not drift_check(_day(400, 0), None).drifted


def test_status_needs_a_stack(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --stack-name or --outputs there is no stack to report on: a usage error, exit code 2."""
    assert main(["status"]) == 2
    assert "--stack-name or --outputs" in capsys.readouterr().err


@pytest.mark.slow
def test_status_on_the_local_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the local stack, status reports no model (and the commands that fix it) while none is promoted; then the
    promoted model and its card's figures, the dead-lettered upload with the redrive command, the last hour's and
    day's results by status and reason, the pneumonia rate against the card's, and an alarm in ALARM; as JSON and
    as a screen whose lines fit 80 columns."""
    with LocalStack(retry_delay_seconds=0, quiet=True) as stack:
        assert stack.outputs is not None
        outputs = tmp_path / "local-stack.json"
        outputs.write_text(stack.outputs.to_json())
        s3, sqs = stack.client("s3"), stack.client("sqs")
        table = ResultsTable(stack.client("dynamodb"), stack.outputs.results_table)
        bucket = stack.outputs.input_bucket
        film = (SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg").read_bytes()
        s3.put_object(Bucket=bucket, Key="incoming/status/early.jpeg", Body=film)
        _wait(lambda: waiting_count(sqs, stack.outputs.dlq_url) == 1, "the upload was not dead-lettered")

        capsys.readouterr()
        assert main(["status", "--outputs", str(outputs), "--format", "json"]) == 0
        early = json.loads(capsys.readouterr().out)
        assert early["model"] is None and "pneumoscan promote" in early["model_problem"]

        cloudwatch = stack.client("cloudwatch")
        raise_alarm(cloudwatch, ALARM, "uploads wait too long")

        stack.serve(RELEASE_MODEL)
        time.sleep(MODEL_REFRESH_SECONDS + 1)
        uploads = {
            "incoming/status/normal.jpeg": (SAMPLES / "NORMAL" / "IM-0001-0001.jpeg").read_bytes(),
            "incoming/status/pneumonia.jpeg": film,
            "incoming/status/not-a-film.jpeg": b"this is not an image",
        }
        for key, body in uploads.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        for key in uploads:
            _wait(lambda key=key: table.latest(f"s3://{bucket}/{key}") is not None, f"{key} was not scored")

        capsys.readouterr()
        assert main(["status", "--outputs", str(outputs), "--format", "json"]) == 0
        report = json.loads(capsys.readouterr().out)
        card = read_card(RELEASE_MODEL)
        assert report["model"]["version"] == card["version"]
        assert report["model"]["test_auc"] == pytest.approx(card["metrics"]["test"]["auc"]["value"])
        assert report["model"]["expected_pneumonia_rate"] == pytest.approx(expected_pneumonia_rate(card))
        assert report["queue"]["dead_letters"] == 1
        assert report["redrive_command"] == f"pneumoscan redrive --outputs {outputs}"
        hour, day = report["windows"]
        assert hour["window"] == "last hour" and day["window"] == "last day"
        for window in (hour, day):
            assert window["by_status"] == {"REJECTED": 1, "SCORED": 2}
            assert sum(window["by_reason"].values()) == 1
        assert report["drift"]["films"] == 2 and not report["drift"]["drifted"]
        assert report["drift"]["observed_rate"] == pytest.approx(day["pneumonia"] / 2)
        assert [alarm["name"] for alarm in report["alarms"]] == [ALARM]

        assert main(["status", "--outputs", str(outputs)]) == 0
        screen = capsys.readouterr().out
        assert all(len(line) <= 80 for line in screen.splitlines())
        flat = "".join(screen.split())
        for text in (card["version"], f"pneumoscanredrive--outputs{outputs}", "3:1REJECTED,2SCORED", ALARM):
            assert "".join(text.split()) in flat, text


class _StackResources:
    """A CloudFormation client's list_stack_resources paginator (moto's CloudFormation creates no alarms)."""

    def __init__(self, resources: list[dict[str, str]]) -> None:
        self.resources = resources

    def get_paginator(self, operation: str) -> _StackResources:
        assert operation == "list_stack_resources"
        return self

    def paginate(self, StackName: str) -> list[dict[str, Any]]:  # noqa: N803  # boto3's parameter name.
        return [{"StackResourceSummaries": self.resources}]


def test_a_deployed_stacks_alarms_are_those_of_its_cloudformation_stack() -> None:
    """For --stack-name, status asks CloudWatch only about the alarms the CloudFormation stack created: another
    alarm in ALARM on the account is not shown."""
    resources = [
        {"ResourceType": "AWS::CloudWatch::Alarm", "PhysicalResourceId": "pneumoscan-OldestMessageAgeAlarm-1"},
        {"ResourceType": "AWS::SNS::Topic", "PhysicalResourceId": "arn:aws:sns:us-east-1:123456789012:alarms"},
    ]
    names = stack_alarm_names(_StackResources(resources), "pneumoscan")
    assert names == ["pneumoscan-OldestMessageAgeAlarm-1"]
    with mock_aws():
        cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
        for name in [*names, "someone-elses"]:
            raise_alarm(cloudwatch, name, "test")
        assert [found.name for found in alarms_in_alarm(cloudwatch, names)] == names
        assert len(alarms_in_alarm(cloudwatch, None)) == 2
        assert alarms_in_alarm(cloudwatch, []) == ()
