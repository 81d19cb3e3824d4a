"""`pneumoscan status`: the operator's morning screen, on the local stack and from its parts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from rich.console import Console

from core.model_card import read_card
from core.results import ResultsTable
from infra.local_stack import LocalStack
from pneumoscan.cli import main
from pneumoscan.output import print_status
from pneumoscan.redrive import waiting_count
from pneumoscan.stack import StackOutputs
from pneumoscan.status import (
    DRIFT_MINIMUM_FILMS,
    NOBODY,
    QueueSummary,
    StackStatus,
    WindowCounts,
    alarm_delivery,
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
        # The local stack has no alarm topic: delivery is not checked, and no warning is raised about it.
        assert report["alarm_delivery"]["reaches_someone"] is None

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


TOPIC = "pneumoscan-alarms"


def test_alarms_reach_nobody_without_a_subscription_and_someone_with_one() -> None:
    """An alarm topic with no subscription reaches nobody; a confirmed subscription (moto confirms at once) reaches
    someone; a topic that does not exist reaches nobody."""
    with mock_aws():
        sns = boto3.client("sns", region_name="us-east-1")
        topic = sns.create_topic(Name=TOPIC)["TopicArn"]
        empty = alarm_delivery(sns, topic)
        assert empty.reaches_someone is False and empty.confirmed == 0
        assert empty.note.startswith(NOBODY)
        sns.subscribe(TopicArn=topic, Protocol="email", Endpoint="oncall@example.org")
        subscribed = alarm_delivery(sns, topic)
        assert subscribed.reaches_someone is True and subscribed.confirmed == 1
        missing = alarm_delivery(sns, topic.replace(TOPIC, "deleted-topic"))
        assert missing.reaches_someone is False and "does not exist" in missing.note
        assert alarm_delivery(sns, None).reaches_someone is None


def test_a_subscription_awaiting_confirmation_reaches_nobody() -> None:
    """An e-mail subscription whose link was never followed (SubscriptionArn PendingConfirmation) reaches nobody.
    Moto confirms every subscription at once, so SNS's answer for an unconfirmed one is given by botocore's
    Stubber, in the shape the API documents."""
    sns = boto3.client("sns", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    topic = f"arn:aws:sns:us-east-1:123456789012:{TOPIC}"
    pending = {"SubscriptionArn": "PendingConfirmation", "Protocol": "email", "TopicArn": topic, "Owner": "1"}
    with Stubber(sns) as stub:
        stub.add_response("list_subscriptions_by_topic", {"Subscriptions": [pending]}, {"TopicArn": topic})
        delivery = alarm_delivery(sns, topic)
    assert (delivery.reaches_someone, delivery.confirmed, delivery.pending_confirmation) == (False, 0, 1)
    assert delivery.note.startswith(NOBODY) and "confirmation" in delivery.note


def test_the_screen_warns_when_alarms_reach_nobody() -> None:
    """The status screen shows the alarm topic and a WARNING line when no one is subscribed, none when someone is."""
    with mock_aws():
        sns = boto3.client("sns", region_name="us-east-1")
        topic = sns.create_topic(Name=TOPIC)["TopicArn"]
        screens = []
        for subscribe in (False, True):
            if subscribe:
                sns.subscribe(TopicArn=topic, Protocol="email", Endpoint="oncall@example.org")
            status = StackStatus(
                checked_at="2026-12-05T00:00:00+00:00",
                model=None,
                model_problem="none promoted",
                queue=QueueSummary(0, 0, None, 0),
                redrive_command=None,
                windows=(),
                drift=drift_check(_day(0, 0), None),
                alarms=(),
                alarm_delivery=alarm_delivery(sns, topic),
            )
            console = Console(record=True, width=80)
            print_status(status, "table", console)
            screens.append(console.export_text())
    unsubscribed, subscribed = screens
    assert "WARNING" in unsubscribed and NOBODY in unsubscribed and TOPIC in unsubscribed
    assert "WARNING" not in subscribed and "1 confirmed subscription" in subscribed


def test_a_deployed_stacks_alarm_topic_comes_from_its_outputs() -> None:
    """The AlarmTopicArn output reaches the stack's outputs, which status checks; an outputs file without it (a
    local stack's) still loads."""
    outputs = {
        "InputBucketName": "input",
        "InputPrefix": "incoming/",
        "ModelBucketName": "models",
        "ResultsTableName": "results",
        "ScoringQueueUrl": "https://sqs/queue",
        "DeadLetterQueueUrl": "https://sqs/dlq",
        "HeatmapBucketName": "heatmaps",
        "ResultsEventBusName": "bus",
    }
    topic = f"arn:aws:sns:us-east-1:123456789012:{TOPIC}"
    stack = StackOutputs.from_template_outputs({**outputs, "AlarmTopicArn": topic}, endpoint_url=None, region="r")
    assert stack.alarm_topic_arn == topic
    local = StackOutputs.from_template_outputs(outputs, endpoint_url=None, region="r")
    assert local.alarm_topic_arn == ""
