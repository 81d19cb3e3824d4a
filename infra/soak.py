"""The soak test: thousands of real X-ray uploads and a hostile corpus through the local stack while faults are
injected, then proof that nothing was lost or double-counted.

Every invocation runs in its own process under the function's memory size and timeout (``infra.lambda_process``),
killed past either as Lambda kills it. Faults follow a seeded schedule: a share of S3 GetObject calls fail, a share
of DynamoDB writes are throttled, a share of notifications arrive twice, one invocation crashes after handling half
of its batch, decoding one file exhausts memory (its invocation is killed), and a share of the result publisher's
PutEvents calls fail. Afterwards every valid upload must have exactly one SCORED result from
the promoted model (with a heatmap when it is flagged: PNEUMONIA or INDETERMINATE), every hostile file a REJECTED
result with its reason (decode-cost bombs, truncated films), no valid film that shared a batch with a bomb may lose
its result, the dead-letter queue holds only the messages whose every delivery failed, and a downstream subscriber
of the results bus at least one event for every result.

The burst (``run_burst``) uploads thousands of films at once to a scoring function whose SQS event source is capped
by ``ScalingConfig.MaximumConcurrency`` (the template's, or the one it is given) on an account with no more
concurrency than that: the emulator's poller never invokes beyond the cap, so the backlog waits in the queue, and
every film must be scored once with nothing in the dead-letter queue. Without a cap the same burst is throttled
(``maximum_concurrency=None``), and its throttled batches count towards ``maxReceiveCount``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from PIL import Image

from core.rejections import RejectionReason
from core.results import Status
from infra.corpus import CorpusFile, build_corpus, memory_hog
from infra.fault_injection import FaultInjection, FaultPlan
from infra.local_stack import LocalStack, drain, scan_results, with_maximum_concurrency
from infra.template import load_template

SOAK_MAX_IMAGE_BYTES = 4 * 1024 * 1024
"""The soak's input limit, small so the oversized hostile file stays cheap to upload."""


@dataclass(frozen=True)
class SoakReport:
    """What the soak test measured; ``lost`` and every problem must be zero for it to pass."""

    uploads: int
    scored: int
    rejected: int
    retried_deliveries: int
    duplicates_sent: int
    injected_get_object_faults: int
    injected_put_item_faults: int
    injected_put_events_faults: int
    handler_crashes: int
    invocations_killed: int
    """Invocations whose process was killed past the function's memory size or timeout, as Lambda kills them."""
    peak_invocation_memory_mb: float
    """The most anonymous memory one invocation's processes allocated beyond what they inherited (Lambda's kill is
    past the memory size less the function's resting footprint)."""
    films_sharing_a_batch_with_a_bomb: int
    films_lost_to_a_bomb: int
    """Valid films that shared an invocation with a decompression bomb and have no SCORED result, except those the
    fault plan dead-lettered (their deliveries failed, at most one of them killed beside a bomb)."""
    messages_killed_twice: int
    """Messages more than one of whose deliveries were killed: a record's first delivery may share a batch with a
    bomb, every later one is decoded in isolation."""
    in_dlq: int
    predicted_dlq: int
    lost: int
    duplicated_results: int
    wrong_outcomes: int
    heatmaps: int
    result_events: int
    results_without_event: int
    redelivered_events: int
    wall_seconds: float
    images_per_second: float
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Outcome:
    lost: int
    duplicated: int
    wrong: int
    statuses: Counter[str]
    problems: list[str]


def run_soak(
    data_root: Path,
    model_dir: Path,
    sample: Path,
    *,
    uploads: int = 2000,
    faults: FaultPlan | None = None,
    timeout_seconds: float = 900.0,
) -> SoakReport:
    """Upload ``uploads`` X-rays from the test split plus the corpus, with faults injected, and check the outcome."""
    faults = faults or FaultPlan(
        get_object_failure_rate=0.05,
        put_item_throttle_rate=0.05,
        put_events_failure_rate=0.05,
        duplicate_rate=0.10,
        crash_on_invocation=7,
        decoder_memory_hog=True,
        seed=11,
    )
    keys, files = _plan_uploads(data_root, sample, uploads, hog=faults.decoder_memory_hog)
    injection = FaultInjection(faults)
    started = time.perf_counter()
    with LocalStack(
        retry_delay_seconds=1,
        # Every flagged film gets a heatmap (Heatmaps=Flagged), so the soak exercises heatmaps under faults too.
        parameters={"MaxImageBytes": SOAK_MAX_IMAGE_BYTES, "Heatmaps": "Flagged"},
        interposer=injection,
        quiet=True,
        lambda_process=True,
    ) as stack:
        assert stack.outputs is not None and stack.emulator is not None
        outputs = stack.outputs
        s3, sqs, dynamodb = stack.client("s3"), stack.client("sqs"), stack.client("dynamodb")
        subscriber = stack.subscribe("soak-downstream")
        version = stack.serve(model_dir)
        for key in keys:
            s3.put_object(Bucket=outputs.input_bucket, Key=key, Body=files[key].body)
        _wait_until_drained(sqs, outputs.queue_url, time.monotonic() + timeout_seconds)
        wall = time.perf_counter() - started
        items = scan_results(dynamodb, outputs.results_table)
        events = Counter(event["detail"]["result_id"] for event in stack.receive_events(subscriber, len(items), 120))
        heatmap_keys = {
            f"s3://{outputs.heatmap_bucket}/{item['Key']}"
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=outputs.heatmap_bucket)
            for item in page.get("Contents", [])
        }
        dead_letters = [message["Body"] for message in drain(sqs, outputs.dlq_url)]
        stats = stack.emulator.stats
        injected = {name: count for client in injection.clients for name, count in client.injected.items()}
        max_receive_count = int(stack.redrive_policy()["maxReceiveCount"])
        predicted_dlq = stack.emulator.exhausted(max_receive_count)
        exhausted_by_faults = {
            key for body in stack.emulator.exhausted_by_faults(max_receive_count) for key in _keys_in(body)
        }
        killed_twice = [key for body in stack.emulator.killed_more_than_once() for key in _keys_in(body)]
        batches = list(stack.emulator.batches)
        assert stack.lambda_process is not None
        killed = stack.lambda_process.killed
    outcome = _check(files, items, dead_letters, f"s3://{outputs.input_bucket}/", version)
    if len(dead_letters) != predicted_dlq:
        outcome.problems.append(f"DLQ holds {len(dead_letters)} messages, the fault schedule predicts {predicted_dlq}")
    result_ids = {f"{item['image_key']}#{item['object_sequence']}" for item in items}
    without_event = result_ids - set(events)
    outcome.problems.extend(f"no event for {result_id}" for result_id in sorted(without_event)[:5])
    for item in items:
        # Every flagged film (PNEUMONIA or INDETERMINATE) points to a heatmap that exists; no other result does.
        heatmap = item.get("heatmap_key")
        flagged = item.get("label") in {"PNEUMONIA", "INDETERMINATE"}
        if flagged != (heatmap is not None) or (heatmap and heatmap not in heatmap_keys):
            outcome.problems.append(f"heatmap of {item['image_key']}: {heatmap} for {item.get('label')}")
    sharing, lost_to_bomb = _films_beside_bombs(files, items, batches, f"s3://{outputs.input_bucket}/")
    # A film the fault plan dead-lettered (every delivery failed, at most one of them killed beside a bomb) was not
    # lost to the bomb: it is in the DLQ, which the fault schedule predicts, and is counted there.
    lost_to_bomb -= exhausted_by_faults
    outcome.problems.extend(f"lost beside a bomb: {key}" for key in sorted(lost_to_bomb)[:5])
    outcome.problems.extend(f"killed on more than one delivery: {key}" for key in sorted(killed_twice)[:5])
    return SoakReport(
        uploads=len(files),
        scored=outcome.statuses[Status.SCORED],
        rejected=outcome.statuses[Status.REJECTED],
        retried_deliveries=stats.messages_failed,
        duplicates_sent=stats.duplicates_sent,
        injected_get_object_faults=injected.get("get_object", 0),
        injected_put_item_faults=injected.get("put_item", 0),
        injected_put_events_faults=injected.get("put_events", 0),
        handler_crashes=stats.handler_crashes,
        invocations_killed=killed.memory + killed.timeout + killed.died,
        peak_invocation_memory_mb=round(killed.peak_added_mb, 1),
        films_sharing_a_batch_with_a_bomb=len(sharing),
        films_lost_to_a_bomb=len(lost_to_bomb),
        messages_killed_twice=len(killed_twice),
        in_dlq=len(dead_letters),
        predicted_dlq=predicted_dlq,
        lost=outcome.lost,
        duplicated_results=outcome.duplicated,
        wrong_outcomes=outcome.wrong,
        heatmaps=sum("heatmap_key" in item for item in items),
        result_events=len(set(events)),
        results_without_event=len(without_event),
        redelivered_events=sum(events.values()) - len(events),
        wall_seconds=round(wall, 1),
        images_per_second=round(len(files) / wall, 1),
        problems=tuple(outcome.problems[:20]),
    )


def _plan_uploads(data_root: Path, sample: Path, uploads: int, *, hog: bool) -> tuple[list[str], dict[str, CorpusFile]]:
    """Keys in upload order, and what each must end as: X-rays from the test split with the corpus mixed in (and
    the memory hog when the fault plan makes its decoding exhaust memory)."""
    xrays = sorted((data_root / "test").glob("*/*.jpeg"))
    corpus = build_corpus(sample, SOAK_MAX_IMAGE_BYTES)
    files: dict[str, CorpusFile] = {}
    for index, path in zip(range(uploads), itertools.cycle(xrays), strict=False):
        files[f"incoming/soak/{index:05d}-{path.name}"] = CorpusFile(path.name, path.read_bytes(), Status.SCORED)
    keys = list(files)
    stride = max(1, len(keys) // max(1, len(corpus)))
    for position, corpus_file in enumerate(corpus):
        key = f"incoming/corpus/{corpus_file.name}"
        keys.insert(position * stride + position, key)
        files[key] = corpus_file
    if hog:
        # The memory hog goes first, so its first delivery shares a batch with first deliveries only and its
        # invocation is killed as Lambda would kill it: a batch holding a retried record is decoded in isolation.
        hog_file = memory_hog(Image.open(sample).convert("L"))
        key = f"incoming/corpus/{hog_file.name}"
        keys.insert(0, key)
        files[key] = hog_file
    return keys, files


def _check(
    files: dict[str, CorpusFile], items: list[dict[str, Any]], dead_letters: list[str], prefix: str, version: str
) -> _Outcome:
    """Compare every upload's results with what it must end as."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_key.setdefault(item["image_key"], []).append(item)
    dlq_keys = {key for body in dead_letters for key in _keys_in(body)}
    problems: list[str] = []
    lost = duplicated = wrong = 0
    for key, expected in files.items():
        results = by_key.get(prefix + key, [])
        if not results:
            if key not in dlq_keys:
                lost += 1
                problems.append(f"lost: {key}")
            continue
        if len(results) > 1:
            duplicated += 1
            problems.append(f"{len(results)} results for {key}")
        result = results[0]
        if expected.expected_status is Status.REJECTED:
            outcome_ok = result["status"] == Status.REJECTED and result.get("reason") == expected.expected_reason
        else:
            outcome_ok = result["status"] == Status.SCORED and result.get("model_version") == version
        if not outcome_ok:
            wrong += 1
            problems.append(f"{key}: {result['status']} {result.get('reason')}, expected {expected.expected_status}")
    statuses = Counter(results[0]["status"] for results in by_key.values())
    return _Outcome(lost, duplicated, wrong, statuses, problems)


def _films_beside_bombs(
    files: dict[str, CorpusFile], items: list[dict[str, Any]], batches: list[list[str]], prefix: str
) -> tuple[set[str], set[str]]:
    """The valid films that shared an invocation with a decompression bomb, and those of them without a SCORED
    result."""
    bombs = {key for key, file in files.items() if file.expected_reason is RejectionReason.DECOMPRESSION_BOMB}
    sharing: set[str] = set()
    for bodies in batches:
        keys = {key for body in bodies for key in _keys_in(body)}
        if keys & bombs:
            sharing.update(key for key in keys if key in files and files[key].expected_status is Status.SCORED)
    scored = {item["image_key"].removeprefix(prefix) for item in items if item["status"] == Status.SCORED}
    return sharing, sharing - scored


def _wait_until_drained(sqs: Any, queue_url: str, deadline: float) -> None:
    """Until the queue holds no visible or in-flight message for two consecutive looks."""
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        attributes = sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        waiting = int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )
        quiet = quiet + 1 if waiting == 0 else 0
        time.sleep(1.0)


def _keys_in(body: str) -> list[str]:
    try:
        records = json.loads(body).get("Records", [])
    except (ValueError, AttributeError):
        return []
    return [unquote_plus(record["s3"]["object"]["key"]) for record in records]


def print_report(report: SoakReport | BurstReport) -> None:
    """The soak's figures as a markdown table."""
    print("| figure | value |\n|---|---|")
    for name, value in asdict(report).items():
        if name != "problems":
            print(f"| {name.replace('_', ' ')} | {value} |")
    print(f"\n{'PASSED' if report.passed else 'FAILED'}" + "".join(f"\n  {problem}" for problem in report.problems))


@dataclass(frozen=True)
class BurstReport:
    """What a burst measured; every problem (a film lost, scored twice, dead-lettered) must be absent to pass."""

    uploads: int
    maximum_concurrency: int | None
    """The event source's ``ScalingConfig.MaximumConcurrency``; None: no cap (the poller's five batches at once)."""
    account_concurrency: int | None
    max_receive_count: int
    scored: int
    in_dlq: int
    lost: int
    duplicated_results: int
    invocations: int
    throttled_invocations: int
    redelivered_messages: int
    """Deliveries that did not end in a deleted message (throttled or failed): each is one more receive."""
    peak_concurrency: int
    wall_seconds: float
    images_per_second: float
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def run_burst(
    samples: Path,
    model_dir: Path,
    *,
    uploads: int = 2000,
    maximum_concurrency: int | None = 2,
    account_concurrency: int | None = 2,
    retry_delay_seconds: int | None = None,
    timeout_seconds: float = 1800.0,
) -> BurstReport:
    """Upload ``uploads`` films (the samples' X-rays, smallest first, cycled) at once to a stack whose scoring
    event source is capped at ``maximum_concurrency`` on an account of ``account_concurrency``, and check that every
    film has exactly one SCORED result and the dead-letter queue is empty. ``retry_delay_seconds`` shortens the
    visibility timeout of a throttled or failed batch (the uncapped comparison)."""
    films = sorted(samples.rglob("*.jpeg"), key=lambda path: path.stat().st_size)
    bodies = {
        f"incoming/burst/{index:05d}-{path.name}": path.read_bytes()
        for index, path in zip(range(uploads), itertools.cycle(films), strict=False)
    }
    template, parameters = load_template(), dict[str, Any]()
    if maximum_concurrency is not None:
        template, parameters = with_maximum_concurrency(template, parameters, maximum_concurrency)
    started = time.perf_counter()
    with LocalStack(
        retry_delay_seconds=retry_delay_seconds,
        parameters=parameters,
        template=template,
        account_concurrency=account_concurrency,
        quiet=True,
    ) as stack:
        assert stack.outputs is not None and stack.emulator is not None
        outputs = stack.outputs
        s3, sqs = stack.client("s3"), stack.client("sqs")
        version = stack.serve(model_dir)
        drain(sqs, outputs.queue_url)  # S3's s3:TestEvent, before the poller takes it as a batch of its own.
        with ThreadPoolExecutor(max_workers=8) as uploaders:
            # Several uploaders at once, so the queue fills far faster than two invocations drain it.
            bucket = outputs.input_bucket
            list(uploaders.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=bodies[key]), bodies))
        _wait_until_drained(sqs, outputs.queue_url, time.monotonic() + timeout_seconds)
        wall = time.perf_counter() - started
        items = scan_results(stack.client("dynamodb"), outputs.results_table)
        dead_letters = [key for message in drain(sqs, outputs.dlq_url) for key in _keys_in(message["Body"])]
        stats = stack.emulator.stats
        max_receive_count = int(stack.redrive_policy()["maxReceiveCount"])
    prefix = f"s3://{outputs.input_bucket}/"
    results = Counter(item["image_key"].removeprefix(prefix) for item in items)
    scored = {
        item["image_key"].removeprefix(prefix)
        for item in items
        if item["status"] == Status.SCORED and item.get("model_version") == version
    }
    lost = [key for key in bodies if key not in results and key not in dead_letters]
    duplicated = [key for key, count in results.items() if count > 1]
    problems = [f"dead-lettered: {key}" for key in dead_letters[:5]]
    problems += [f"lost: {key}" for key in lost[:5]]
    problems += [f"{results[key]} results for {key}" for key in duplicated[:5]]
    problems += [f"not scored by {version}: {key}" for key in sorted(set(results) - scored)[:5]]
    return BurstReport(
        uploads=len(bodies),
        maximum_concurrency=maximum_concurrency,
        account_concurrency=account_concurrency,
        max_receive_count=max_receive_count,
        scored=len(scored),
        in_dlq=len(dead_letters),
        lost=len(lost),
        duplicated_results=len(duplicated),
        invocations=stats.invocations,
        throttled_invocations=stats.throttled_invocations,
        redelivered_messages=stats.messages_failed,
        peak_concurrency=stats.peak_concurrency,
        wall_seconds=round(wall, 1),
        images_per_second=round(len(bodies) / wall, 1),
        problems=tuple(problems),
    )
