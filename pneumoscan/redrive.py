"""Dead-lettered messages back to the scoring queue, once the operator fixed what made them fail.

Where the endpoint supports it, SQS's own message move task (``StartMessageMoveTask``) moves the messages, in the
background. Elsewhere (the local moto server has no move task) they are moved by receiving them from the
dead-letter queue, sending them (body and message attributes) to the scoring queue and then deleting them: a message
is never lost, and one that fails between sending and deleting is sent again (the scoring function is idempotent
per image and model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

BATCH = 10
"""The most messages SQS receives, sends or deletes in one call."""


class RedriveError(RuntimeError):
    """SQS refused to take some of the messages back; they stay on the dead-letter queue."""


@dataclass(frozen=True)
class RedriveReport:
    """What a redrive found and did."""

    waiting: int
    """Messages on the dead-letter queue before the redrive (SQS's approximate count)."""
    moved: int
    """Messages moved one by one, or, for a move task, the messages it was started on."""
    dry_run: bool
    move_task: str | None = None
    """The handle of SQS's message move task when one moves the messages, None when they were moved one by one."""


def waiting_count(sqs: Any, queue_url: str) -> int:
    """The approximate number of messages waiting on a queue."""
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


def redrive(
    sqs: Any, dead_letter_queue_url: str, queue_url: str, *, dry_run: bool = False, visibility_timeout: int = 300
) -> RedriveReport:
    """Move every message of the dead-letter queue to the scoring queue (or, with ``dry_run``, only count them).
    Each received message stays invisible for ``visibility_timeout`` seconds, so none is moved twice in one run."""
    waiting = waiting_count(sqs, dead_letter_queue_url)
    if dry_run:
        return RedriveReport(waiting=waiting, moved=0, dry_run=True)
    task = start_move_task(sqs, dead_letter_queue_url, queue_url)
    if task is not None:
        return RedriveReport(waiting=waiting, moved=waiting, dry_run=False, move_task=task)
    moved = 0
    while messages := sqs.receive_message(
        QueueUrl=dead_letter_queue_url,
        MaxNumberOfMessages=BATCH,
        MessageAttributeNames=["All"],
        VisibilityTimeout=visibility_timeout,
        WaitTimeSeconds=0,
    ).get("Messages", []):
        entries = [_entry(str(index), message) for index, message in enumerate(messages)]
        sent = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        sent_ids = {item["Id"] for item in sent.get("Successful", [])}
        done = [
            {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
            for index, message in enumerate(messages)
            if str(index) in sent_ids
        ]
        if done:
            sqs.delete_message_batch(QueueUrl=dead_letter_queue_url, Entries=done)
        moved += len(done)
        if sent.get("Failed"):
            reasons = sorted({item.get("Message", item.get("Code", "?")) for item in sent["Failed"]})
            raise RedriveError(
                f"{len(sent['Failed'])} message(s) could not be sent back ({'; '.join(reasons)}); {moved} moved"
            )
    return RedriveReport(waiting=waiting, moved=moved, dry_run=False)


def start_move_task(sqs: Any, dead_letter_queue_url: str, queue_url: str) -> str | None:
    """Start SQS's message move task from the dead-letter queue to the scoring queue; its handle, or None where the
    endpoint refuses it (no such action, as on moto, or no permission for it), so the caller moves the messages."""
    arns = [
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        for url in (dead_letter_queue_url, queue_url)
    ]
    try:
        response = sqs.start_message_move_task(SourceArn=arns[0], DestinationArn=arns[1])
    except ClientError:
        return None
    return str(response["TaskHandle"])


def _entry(identifier: str, message: dict[str, Any]) -> dict[str, Any]:
    """A send_message_batch entry carrying the message's body and message attributes."""
    entry: dict[str, Any] = {"Id": identifier, "MessageBody": message["Body"]}
    if message.get("MessageAttributes"):
        entry["MessageAttributes"] = message["MessageAttributes"]
    return entry
