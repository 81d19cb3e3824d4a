"""``pneumoscan status``: the one screen an operator reads in the morning.

What is served (the promoted model and its card's headline figures), what waits (queue depth, age of the oldest
message, the dead-letter queue and the command that redrives it), what was done (results in the last hour and day by
status and reason, from every shard of the ``ResultsByDayShard`` index), whether the population drifted (the last
day's share of films flagged (PNEUMONIA or INDETERMINATE) against the share the model card's test set expects),
which CloudWatch alarms are in ALARM, and whether they reach anyone (a confirmed subscription on the alarm topic)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from core.model_card import CARD_FILE
from core.model_registry import ModelRegistry, NoCurrentModelError
from core.results import DEFAULT_BY_DAY_SHARDS, ResultsTable
from pneumoscan.redrive import waiting_count

PAGE_SIZE = 500
"""Results per by-day page while counting."""
DRIFT_SIGMAS = 3.0
"""A day's PNEUMONIA share further than this many binomial standard errors from the card's expectation is flagged."""
DRIFT_MINIMUM_FILMS = 20
"""Fewer scored films than this in a day say nothing about drift."""
WINDOWS = (("last hour", timedelta(hours=1)), ("last day", timedelta(days=1)))
NOBODY = "ALARMS REACH NOBODY"
"""How the status starts its note when no one would hear an alarm."""


@dataclass(frozen=True)
class ModelSummary:
    """The promoted model and its card's headline test figures."""

    version: str
    promoted_at: str
    test_auc: float | None
    test_sensitivity: float | None
    test_specificity: float | None
    threshold: float | None
    """The screening point: flagged (INDETERMINATE or PNEUMONIA) at or above it."""
    expected_pneumonia_rate: float | None
    """The share of the card's test films the model called PNEUMONIA: what an unchanged population should show."""


@dataclass(frozen=True)
class QueueSummary:
    """The scoring queue and its dead-letter queue."""

    waiting: int
    in_flight: int
    oldest_age_seconds: float | None
    """CloudWatch's ApproximateAgeOfOldestMessage over the last five minutes; None where it has no datapoint."""
    dead_letters: int


@dataclass(frozen=True)
class WindowCounts:
    """Results scored in one time window, by status and by rejection reason."""

    window: str
    since: str
    total: int
    by_status: dict[str, int]
    by_reason: dict[str, int]
    scored: int
    pneumonia: int


@dataclass(frozen=True)
class DriftCheck:
    """The last day's share of scored films called PNEUMONIA against the model card's expectation."""

    observed_rate: float | None
    expected_rate: float | None
    films: int
    drifted: bool
    note: str


@dataclass(frozen=True)
class Alarm:
    """A CloudWatch alarm in ALARM."""

    name: str
    reason: str
    since: str


@dataclass(frozen=True)
class AlarmDelivery:
    """Whom the stack's alarms reach: the subscriptions of its alarm topic, confirmed or awaiting confirmation."""

    topic_arn: str | None
    confirmed: int
    pending_confirmation: int
    reaches_someone: bool | None
    """None where the stack names no alarm topic (a local stack), so nothing was checked."""
    note: str


@dataclass(frozen=True)
class StackStatus:
    """Everything ``pneumoscan status`` shows."""

    checked_at: str
    model: ModelSummary | None
    model_problem: str | None
    queue: QueueSummary
    redrive_command: str | None
    windows: tuple[WindowCounts, ...]
    drift: DriftCheck
    alarms: tuple[Alarm, ...]
    alarm_delivery: AlarmDelivery

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def expected_pneumonia_rate(card: dict[str, Any]) -> float | None:
    """The share of films called PNEUMONIA where the served calibration was measured, from its confusion matrix: a
    site calibration's held-out part (the site's own films), else the card's test (else validation) split."""
    site = card.get("site_calibration", {}).get("held_out", {}).get("site_calibrated", {})
    metrics = card.get("metrics", {})
    for figures in (site, metrics.get("test", {}), metrics.get("validation", {})):
        matrix = figures.get("confusion_matrix")
        if matrix:
            total = sum(int(count) for count in matrix.values())
            called = int(matrix.get("true_positive", 0)) + int(matrix.get("false_positive", 0))
            return called / total if total else None
    return None


def model_summary(pointer_version: str, promoted_at: str, card: dict[str, Any]) -> ModelSummary:
    """The headline figures of a promoted model's card."""
    test = card.get("metrics", {}).get("test", {})

    def figure(name: str) -> float | None:
        value = test.get(name, {}).get("value")
        return None if value is None else float(value)

    calibration = card.get("calibration", {})
    threshold = calibration.get("operating_points", {}).get("normal_below", calibration.get("threshold"))
    return ModelSummary(
        version=pointer_version,
        promoted_at=promoted_at,
        test_auc=figure("auc"),
        test_sensitivity=figure("sensitivity"),
        test_specificity=figure("specificity"),
        threshold=None if threshold is None else float(threshold),
        expected_pneumonia_rate=expected_pneumonia_rate(card),
    )


def drift_check(day: WindowCounts, expected: float | None) -> DriftCheck:
    """Flag the day when its PNEUMONIA share lies more than DRIFT_SIGMAS binomial standard errors from ``expected``."""
    observed = day.pneumonia / day.scored if day.scored else None
    if expected is None:
        return DriftCheck(observed, None, day.scored, False, "the model card states no expected rate")
    if observed is None or day.scored < DRIFT_MINIMUM_FILMS:
        return DriftCheck(observed, expected, day.scored, False, f"fewer than {DRIFT_MINIMUM_FILMS} films scored")
    error = math.sqrt(expected * (1 - expected) / day.scored)
    sigmas = abs(observed - expected) / error if error else math.inf
    if sigmas > DRIFT_SIGMAS:
        note = f"{sigmas:.1f} standard errors from the card: re-check calibration on this population (README)"
        return DriftCheck(observed, expected, day.scored, True, note)
    return DriftCheck(observed, expected, day.scored, False, f"within {DRIFT_SIGMAS:.0f} standard errors")


def results_since(table: ResultsTable, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Every result scored in ``[since, until]``, page by page from the by-day index's shards."""
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = table.scored_since(since, until=until, limit=PAGE_SIZE, page_token=token)
        items += page.items
        token = page.next_token
        if token is None:
            return items


def count_window(items: list[dict[str, Any]], window: str, since: datetime) -> WindowCounts:
    """Count the results of ``items`` scored at or after ``since``, by status and rejection reason."""
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    scored = pneumonia = 0
    for item in items:
        if datetime.fromisoformat(str(item["scored_at"])) < since:
            continue
        statuses[str(item.get("status"))] += 1
        if item.get("status") == "SCORED":
            scored += 1
            # Flagged, as the card's confusion matrix counts: PNEUMONIA and INDETERMINATE (refer to a reader).
            pneumonia += item.get("label") in {"PNEUMONIA", "INDETERMINATE"}
        elif item.get("reason"):
            reasons[str(item["reason"])] += 1
    return WindowCounts(
        window=window,
        since=since.isoformat(timespec="seconds"),
        total=sum(statuses.values()),
        by_status=dict(sorted(statuses.items())),
        by_reason=dict(reasons.most_common()),
        scored=scored,
        pneumonia=pneumonia,
    )


def queue_summary(sqs: Any, cloudwatch: Any, queue_url: str, dlq_url: str, now: datetime) -> QueueSummary:
    """Depths from SQS; the oldest message's age from CloudWatch (SQS itself does not say)."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    queue = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    statistics = cloudwatch.get_metric_statistics(
        Namespace="AWS/SQS",
        MetricName="ApproximateAgeOfOldestMessage",
        Dimensions=[{"Name": "QueueName", "Value": queue_url.rstrip("/").rsplit("/", 1)[-1]}],
        StartTime=now - timedelta(minutes=5),
        EndTime=now,
        Period=60,
        Statistics=["Maximum"],
    )
    points = sorted(statistics.get("Datapoints", []), key=lambda point: point["Timestamp"])
    return QueueSummary(
        waiting=int(queue.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(queue.get("ApproximateNumberOfMessagesNotVisible", 0)),
        oldest_age_seconds=float(points[-1]["Maximum"]) if points else None,
        dead_letters=waiting_count(sqs, dlq_url),
    )


def alarms_in_alarm(cloudwatch: Any, names: list[str] | None) -> tuple[Alarm, ...]:
    """Metric alarms in ALARM: only ``names`` (a deployed stack's alarms) when given, else every one on the
    endpoint (a local stack's server holds only its own)."""
    alarms: list[Alarm] = []
    arguments: dict[str, Any] = {"StateValue": "ALARM"}
    if names is not None:
        if not names:
            return ()
        arguments["AlarmNames"] = names
    for page in cloudwatch.get_paginator("describe_alarms").paginate(**arguments):
        alarms += [
            Alarm(
                name=alarm["AlarmName"],
                reason=alarm.get("StateReason", ""),
                since=_iso(alarm.get("StateUpdatedTimestamp")),
            )
            for alarm in page.get("MetricAlarms", [])
        ]
    return tuple(alarms)


def alarm_delivery(sns: Any, topic_arn: str | None) -> AlarmDelivery:
    """Count the alarm topic's confirmed subscriptions; one awaiting confirmation (SNS's ``PendingConfirmation``)
    reaches nobody yet, and neither does a topic without subscriptions or one that does not exist."""
    if not topic_arn:
        return AlarmDelivery(None, 0, 0, None, "not checked: the stack names no alarm topic")
    confirmed = pending = 0
    try:
        for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
            for subscription in page.get("Subscriptions", []):
                arn = str(subscription.get("SubscriptionArn", ""))
                confirmed += arn.startswith("arn:")
                pending += arn == "PendingConfirmation"
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "NotFound":
            raise
        return AlarmDelivery(topic_arn, 0, 0, False, f"{NOBODY}: the alarm topic does not exist")
    if confirmed:
        return AlarmDelivery(topic_arn, confirmed, pending, True, f"{confirmed} confirmed subscription(s)")
    if pending:
        note = (
            f"{NOBODY}: {pending} subscription(s) await confirmation; follow the link in the e-mail SNS sent "
            "(or subscribe again)"
        )
    else:
        note = f"{NOBODY}: the alarm topic has no subscription; deploy with AlarmEmail or subscribe to the topic"
    return AlarmDelivery(topic_arn, 0, pending, False, note)


def stack_alarm_names(cloudformation: Any, stack_name: str) -> list[str]:
    """The physical names of a deployed stack's CloudWatch alarms."""
    names: list[str] = []
    for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack_name):
        names += [
            resource["PhysicalResourceId"]
            for resource in page.get("StackResourceSummaries", [])
            if resource.get("ResourceType") == "AWS::CloudWatch::Alarm"
        ]
    return names[:100]  # describe_alarms takes at most 100 names; the template has about twenty.


def collect(
    clients: dict[str, Any],
    *,
    model_bucket: str,
    results_table: str,
    by_day_shards: int = DEFAULT_BY_DAY_SHARDS,
    queue_url: str,
    dlq_url: str,
    alarm_names: list[str] | None,
    redrive_command: str,
    alarm_topic_arn: str | None = None,
    now: datetime | None = None,
) -> StackStatus:
    """Read the stack's state through ``clients`` (s3, sqs, dynamodb, cloudwatch, and sns for the alarm topic)."""
    now = now or datetime.now(UTC)
    model: ModelSummary | None = None
    problem: str | None = None
    try:
        pointer = ModelRegistry(clients["s3"], model_bucket).current()
    except NoCurrentModelError:
        problem = "no model is promoted: run pneumoscan publish, then pneumoscan promote --version VERSION"
    else:
        body = clients["s3"].get_object(Bucket=model_bucket, Key=pointer.prefix + CARD_FILE)["Body"].read()
        model = model_summary(pointer.version, pointer.promoted_at, json.loads(body))
    queue = queue_summary(clients["sqs"], clients["cloudwatch"], queue_url, dlq_url, now)
    # The longest window is read once; the shorter ones are counted from the same results.
    longest = max(length for _, length in WINDOWS)
    items = results_since(ResultsTable(clients["dynamodb"], results_table, by_day_shards), now - longest, now)
    windows = tuple(count_window(items, name, now - length) for name, length in WINDOWS)
    return StackStatus(
        checked_at=now.isoformat(timespec="seconds"),
        model=model,
        model_problem=problem,
        queue=queue,
        redrive_command=redrive_command if queue.dead_letters else None,
        windows=windows,
        drift=drift_check(windows[-1], model.expected_pneumonia_rate if model else None),
        alarms=alarms_in_alarm(clients["cloudwatch"], alarm_names),
        alarm_delivery=alarm_delivery(clients.get("sns"), alarm_topic_arn),
    )


def _iso(moment: Any) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds") if isinstance(moment, datetime) else str(moment or "")
