"""Cost per million images: what one scored film costs in requests, billed milliseconds and log bytes, at the list
prices of bench/prices.json.

The scoring handler runs in this process on moto (the template's resources, the release model published and
promoted), fed the bench's films one to an invocation (``live``: a quiet stream of uploads, where the batching
window closes on one message) and ten to an invocation (``batched``: a backlog). Measured here: the handler's
S3 and DynamoDB requests (counted on its clients), the bytes it writes to its log (log lines and the metrics'
EMF records), the size of each results item (DynamoDB bills a write per started KB, in the table and again in the
ResultsByDay index), and its wall time per invocation, billed at the template's memory. Modelled from AWS's
documented behaviour: the SQS requests (S3's notification sends one message per upload; Lambda's poller receives
a batch and deletes it), one EventBridge event per result, the result publisher's invocations, and Lambda's own
START/END/REPORT lines. The share of films that get a heatmap (a PUT) is the model card's expected flagged share.

Run with `make bench`; merges its figures into bench/results.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from moto import mock_aws

from core.model_card import read_card
from core.model_registry import ModelRegistry
from infra.local_stack import LocalContext, drain, scan_results
from infra.resources import create_data_plane
from infra.template import load_template
from pneumoscan.status import expected_pneumonia_rate
from scoring import handler
from scoring.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
PRICES = ROOT / "bench" / "prices.json"
RELEASE = ROOT / "models" / "release"
FILMS = sorted((ROOT / "samples").glob("*/*.jpeg"))
REGION = "us-east-1"
ROUNDS = 4
"""Each film is scored this many times in each mode (as a new upload each time)."""
LIVE_BAR_USD = 8.0
"""The issue's bar: a million live images at list prices."""
PUBLISHER_MEMORY_GB = 0.25
PUBLISHER_BILLED_MS = 10
"""The result publisher's billed time per invocation (modelled: one PutEvents call of up to ten entries)."""
MILLION = 1_000_000
XRAY_RESERVOIR_RATE = 0.05
"""The share of requests beyond the first each second that X-Ray's default sampling rule records."""
IDLE_POLLERS = 5
"""Lambda's SQS event source polls with five pollers while the queue is idle (AWS's documented starting number)."""
PLATFORM_LINES = (
    "START RequestId: {id} Version: $LATEST\n",
    "END RequestId: {id}\n",
    "REPORT RequestId: {id}\tDuration: 123.45 ms\tBilled Duration: 124 ms\tMemory Size: 1024 MB\t"
    "Max Memory Used: 345 MB\t\n",
)
"""Lambda's own lines per invocation in the function's log group (text format)."""
TRACE_HEADER = "Root=1-6751f2a0-3c5f1e2a9b7d4c6e8f0a1b2c;Parent=53995c3f42cd8ad8;Sampled=0;Lineage=1:8e3f4a2b:0"
"""What Lambda sets in _X_AMZN_TRACE_ID on every invocation, sampled or not."""
FUNCTION_NAME = "pneumoscan-ScoringFunction-Ab1Cd2Ef3Gh4"
"""A function name as CloudFormation generates it (the stack name, the logical id, a suffix)."""


@dataclass
class Measured:
    """What one mode's invocations did."""

    images: int = 0
    invocations: int = 0
    flagged: int = 0
    heatmaps: int = 0
    invocation_ms: list[float] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    log_bytes: Counter[str] = field(default_factory=Counter)
    write_units: int = 0


def item_bytes(value: dict[str, Any]) -> int:
    """An item's size as DynamoDB bills it: attribute names plus values (numbers about 1 byte per 2 digits)."""
    size = 0
    for name, typed in value.items():
        size += len(name.encode())
        [(kind, inner)] = typed.items()
        if kind == "S":
            size += len(inner.encode())
        elif kind == "N":
            size += math.ceil(len(inner.strip("-").replace(".", "")) / 2) + 1
        elif kind in {"BOOL", "NULL"}:
            size += 1
        elif kind == "M":
            size += 3 + item_bytes(inner)
        elif kind == "L":
            size += 3 + sum(item_bytes({"": element}) for element in inner)
        else:
            size += len(str(inner))
    return size


def _count_requests(client: Any, counter: Counter[str]) -> None:
    """Count every API call ``client`` makes, by service and operation."""
    service = client.meta.service_model.service_name

    def count(**arguments: Any) -> None:
        counter[f"{service}:{arguments['model'].name}"] += 1

    client.meta.events.register("before-call.*.*", count)


def _classify(line: str) -> str:
    """A log line as 'emf' (a metrics record), or the level of a log line."""
    record = json.loads(line)
    return "emf" if "_aws" in record else str(record.get("level", "other")).lower()


def measure(batch: int, heatmaps: str) -> Measured:
    """Score every film ROUNDS times, ``batch`` to an invocation, with the heatmap policy ``heatmaps`` (the
    template's ``Heatmaps``), and account for what the handler did."""
    measured = Measured()
    os.environ.update(
        {"AWS_DEFAULT_REGION": REGION, "POWERTOOLS_TRACE_DISABLED": "1", "_X_AMZN_TRACE_ID": TRACE_HEADER}
    )
    with mock_aws(), tempfile.TemporaryDirectory() as cache:
        s3 = boto3.client("s3", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        outputs = create_data_plane(s3, sqs, dynamodb, boto3.client("events", region_name=REGION), region=REGION)
        registry = ModelRegistry(s3, outputs.model_bucket)
        registry.publish(RELEASE)
        registry.promote(read_card(RELEASE)["version"])
        settings = Settings.from_environment(
            {
                "RESULTS_TABLE": outputs.results_table,
                "INPUT_BUCKET": outputs.input_bucket,
                "INPUT_PREFIX": outputs.input_prefix,
                "MODEL_BUCKET": outputs.model_bucket,
                "MODEL_CACHE_DIR": cache,
                "HEATMAP_BUCKET": outputs.heatmap_bucket,
                "HEATMAPS": heatmaps,
            }
        )
        # The handler's own clients, counted; the bench's uploads and reads go through others.
        function_s3 = boto3.client("s3", region_name=REGION)
        function_dynamodb = boto3.client("dynamodb", region_name=REGION)
        counted: Counter[str] = Counter()
        _count_requests(function_s3, counted)
        _count_requests(function_dynamodb, counted)
        handler.pipeline.set(handler.build_pipeline(settings, function_s3, function_dynamodb))
        drain(sqs, outputs.queue_url)  # S3's s3:TestEvent.
        uploads = [
            (f"incoming/bench/{round_}/{film.parent.name}/{film.name}", film)
            for round_ in range(ROUNDS)
            for film in FILMS
        ]
        # One unmeasured invocation first: the model's download and load belong to a cold start, not an image.
        for key, film in [("incoming/bench/warm-up.jpeg", FILMS[0]), *uploads]:
            s3.put_object(Bucket=outputs.input_bucket, Key=key, Body=film.read_bytes())
        records = [_record(message) for message in drain(sqs, outputs.queue_url)]
        _invoke(records[:1], measured, Counter(), warm_up=True)
        counted.clear()
        for start in range(1, len(records), batch):
            _invoke(records[start : start + batch], measured, counted)
        items = [
            item
            for page in dynamodb.get_paginator("scan").paginate(TableName=outputs.results_table)
            for item in page["Items"]
        ]
        warm_up_key = f"s3://{outputs.input_bucket}/incoming/bench/warm-up.jpeg"
        scored = [item for item in items if item["image_key"]["S"] != warm_up_key]
        # A put is billed per started KB in the table, and again in the by-day index (it projects every attribute).
        measured.write_units = sum(2 * math.ceil(item_bytes(item) / 1024) for item in scored)
        results = [item for item in scan_results(dynamodb, outputs.results_table) if item["image_key"] != warm_up_key]
        measured.flagged = sum(item.get("label") in {"PNEUMONIA", "INDETERMINATE"} for item in results)
        measured.heatmaps = sum(bool(item.get("heatmap_key")) for item in results)
        measured.images = len(results)
        handler.pipeline.set(None)
    measured.requests = counted
    return measured


def _record(message: dict[str, Any]) -> dict[str, Any]:
    """An SQS message as a record of Lambda's SQS event."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:pneumoscan-ScoringQueue",
        "awsRegion": REGION,
    }


def _invoke(records: list[dict[str, Any]], measured: Measured, counted: Counter[str], warm_up: bool = False) -> None:
    """One invocation of the handler: its wall time and every byte it logs."""
    context = LocalContext(
        function_name=FUNCTION_NAME,
        invoked_function_arn=f"arn:aws:lambda:{REGION}:123456789012:function:{FUNCTION_NAME}",
        aws_request_id=str(uuid.uuid4()),
    )
    stream = io.StringIO()
    log_handler = handler.logger.registered_handler
    previous = log_handler.setStream(stream)  # type: ignore[attr-defined]  # Powertools' handler is a StreamHandler.
    try:
        with contextlib.redirect_stdout(stream):
            started = time.perf_counter()
            response = handler.lambda_handler({"Records": records}, context)
            elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        log_handler.setStream(previous)  # type: ignore[attr-defined]
    if response["batchItemFailures"]:
        raise RuntimeError(f"the bench's films failed: {response}")
    if warm_up:
        return
    measured.invocations += 1
    measured.invocation_ms.append(elapsed_ms)
    for line in stream.getvalue().splitlines():
        if line.strip():
            measured.log_bytes[_classify(line)] += len(line.encode()) + 1
    measured.log_bytes["platform"] += sum(
        len(line.format(id=context.aws_request_id).encode()) for line in PLATFORM_LINES
    )


@dataclass(frozen=True)
class PerImage:
    """What one image costs in units AWS bills."""

    lambda_invocations: float
    billed_ms: float
    s3_get_head: float
    s3_put: float
    dynamodb_write_units: float
    dynamodb_read_units: float
    sqs_requests: float
    events: float
    publisher_invocations: float
    log_bytes: float
    info_log_bytes: float


def per_image(measured: Measured, expected_flagged: float) -> PerImage:
    """Per-image units; heatmap PUTs at the card's flagged share rather than the bench's film mix."""
    images = measured.images
    billed = sum(math.ceil(ms) for ms in measured.invocation_ms) / images
    requests = measured.requests
    heatmaps_per_flagged = measured.heatmaps / measured.flagged if measured.flagged else 0.0
    puts_other = requests["s3:PutObject"] - measured.heatmaps
    reads = sum(
        count
        for operation, count in requests.items()
        if operation.startswith("dynamodb:") and operation != "dynamodb:PutItem"
    )
    batches = measured.invocations / images
    return PerImage(
        lambda_invocations=batches,
        billed_ms=billed,
        s3_get_head=(requests["s3:GetObject"] + requests["s3:HeadObject"]) / images,
        s3_put=puts_other / images + expected_flagged * heatmaps_per_flagged,
        dynamodb_write_units=measured.write_units / images,
        dynamodb_read_units=reads / images,
        # S3's notification sends one message per upload; the poller receives a batch and deletes it in one call.
        sqs_requests=1 + 2 * batches,
        events=1.0,
        # The stream delivers the batch's inserts together: one publisher invocation per scoring invocation.
        publisher_invocations=batches,
        log_bytes=sum(measured.log_bytes.values()) / images,
        info_log_bytes=measured.log_bytes["info"] / images,
    )


def cost_lines(
    units: PerImage, prices: dict[str, Any], memory_gb: float, tracing: str, traced_share: float
) -> dict[str, float]:
    """US dollars per million images, by line; with ``tracing`` Active ``traced_share`` of the invocations record
    a trace, with PassThrough none does (neither S3's notifications nor SQS sample one)."""
    lam, s3, ddb = prices["lambda"], prices["s3"], prices["dynamodb"]
    return {
        "lambda requests": (units.lambda_invocations + units.publisher_invocations) * lam["request_per_million"],
        "lambda duration": MILLION
        * (
            units.billed_ms / 1000 * memory_gb
            + units.publisher_invocations * PUBLISHER_BILLED_MS / 1000 * PUBLISHER_MEMORY_GB
        )
        * lam["gb_second_x86"],
        "s3 GET and HEAD": units.s3_get_head * 1000 * s3["get_head_per_thousand"],
        "s3 PUT (heatmaps)": units.s3_put * 1000 * s3["put_per_thousand"],
        "dynamodb writes (table and index)": units.dynamodb_write_units * ddb["write_request_unit_per_million"],
        "dynamodb reads": units.dynamodb_read_units * ddb["read_request_unit_per_million"],
        "sqs requests": units.sqs_requests * prices["sqs"]["standard_request_per_million"],
        "eventbridge events": units.events * prices["eventbridge"]["custom_event_per_million"],
        "cloudwatch logs ingested": units.log_bytes * MILLION / 1e9 * prices["cloudwatch"]["log_ingestion_gb"],
        f"x-ray (Tracing {tracing})": (units.lambda_invocations + units.publisher_invocations)
        * traced_share
        * (prices["xray"]["trace_recorded_per_million"] if tracing == "Active" else 0.0),
    }


def fixed_monthly(template: dict[str, Any], prices: dict[str, Any]) -> dict[str, float]:
    """What the stack costs a month before any image: alarms (per metric they read), custom metrics, the dashboard
    and the alarm topic's key; counted from the template and the handlers."""
    alarm_metrics = 0
    for resource in template["Resources"].values():
        if resource["Type"] != "AWS::CloudWatch::Alarm" or resource.get("Condition") == "HasTrainingData":
            continue
        queries = resource["Properties"].get("Metrics")
        alarm_metrics += (
            1 if queries is None else sum("MetricStat" in query or "SELECT" in query["Expression"] for query in queries)
        )
    sources = " ".join((ROOT / "functions" / name / "handler.py").read_text() for name in ("scoring", "publisher"))
    metric_names = set(re.findall(r'name="(\w+)"', sources)) - {"model_version", "reason"}
    rejection_reasons = len(
        re.findall(r"^    [A-Z_]+ = \"", (ROOT / "functions" / "core" / "rejections.py").read_text(), re.M)
    )
    # One time series per metric name and model version, and one per rejection reason.
    custom_metrics = len(metric_names) + rejection_reasons
    cloudwatch = prices["cloudwatch"]
    return {
        f"alarms ({alarm_metrics} metrics read)": alarm_metrics * cloudwatch["standard_alarm_metric_month"],
        f"custom metrics (about {custom_metrics} series, one model version)": custom_metrics
        * cloudwatch["custom_metric_month"],
        "dashboard": cloudwatch["dashboard_month"],
        "alarm topic's KMS key": prices["kms"]["customer_key_month"],
        # Lambda's SQS event source long-polls an idle queue: modelled as five pollers, one 20 s receive each.
        "idle queue polling (5 pollers, 20 s long polls)": IDLE_POLLERS
        * 3
        * 60
        * prices["sagemaker"]["hours_per_month"]
        / MILLION
        * prices["sqs"]["standard_request_per_million"],
    }


def comparisons(prices: dict[str, Any], ms_per_image: float) -> dict[str, float]:
    """What a user would compare, for the model alone (no queue, table or events): SageMaker real-time endpoints a
    month (24x7), Serverless Inference per million images (1 GB for the scoring function's billed time per image,
    plus the films' bytes in), and batch transform of a 10 M backfill on ml.m5.large (two vCPUs, each scoring at the
    function's billed time per image)."""
    sagemaker = prices["sagemaker"]
    hours = sagemaker["hours_per_month"]
    film_gb = statistics.mean(film.stat().st_size for film in FILMS) / 1e9
    instance_hours = 10 * MILLION * ms_per_image / 1000 / 2 / 3600
    return {
        "sagemaker real-time ml.t3.medium, 24x7, a month": sagemaker["realtime_ml_t3_medium_hour"] * hours,
        "sagemaker real-time ml.m5.large, 24x7, a month": sagemaker["realtime_ml_m5_large_hour"] * hours,
        "sagemaker serverless 1 GB, per million images": MILLION
        * (ms_per_image / 1000 * sagemaker["serverless_gb_second"] + film_gb * sagemaker["serverless_data_gb"]),
        "sagemaker batch transform ml.m5.large, 10 M images": instance_hours
        * sagemaker["batch_transform_ml_m5_large_hour"],
    }


def main() -> dict[str, Any]:
    prices = json.loads(PRICES.read_text())
    template = load_template()
    memory_gb = template["Resources"]["ScoringFunction"]["Properties"]["MemorySize"] / 1024
    expected_flagged = expected_pneumonia_rate(read_card(RELEASE)) or 0.0
    heatmaps = template["Parameters"]["Heatmaps"]["Default"]
    figures: dict[str, Any] = {
        "expected_flagged_share": round(expected_flagged, 3),
        "memory_gb": memory_gb,
        "heatmaps": heatmaps,
    }
    totals: dict[str, float] = {}
    tables: dict[str, dict[str, float]] = {}
    # The template's configuration, live and batched; then live again with a heatmap for every flagged film, the
    # other value of the Heatmaps parameter.
    other = "Flagged" if heatmaps != "Flagged" else "OnRequest"
    for mode, batch, policy in (("live", 1, heatmaps), ("batched", 10, heatmaps), (f"live_heatmaps_{other}", 1, other)):
        measured = measure(batch, policy)
        units = per_image(measured, expected_flagged)
        # X-Ray's default sampling rule records the first request each second and 5% of the rest: a quiet stream's
        # every invocation, a backlog's (many invocations a second) about 5%.
        traced_share = 1.0 if batch == 1 else XRAY_RESERVOIR_RATE
        tracing = template["Parameters"]["Tracing"]["Default"]
        lines = cost_lines(units, prices, memory_gb, tracing, traced_share)
        tables[mode] = lines
        totals[mode] = round(sum(lines.values()), 2)
        figures[mode] = {
            "images": measured.images,
            "invocations": measured.invocations,
            "median_invocation_ms": round(statistics.median(measured.invocation_ms), 1),
            "billed_ms_per_image": round(units.billed_ms, 1),
            "log_bytes_per_image": round(units.log_bytes),
            "info_log_bytes_per_image": round(units.info_log_bytes),
            "log_bytes_by_kind_per_image": {
                kind: round(count / measured.images) for kind, count in sorted(measured.log_bytes.items())
            },
            "requests_per_image": {
                operation: round(count / measured.images, 3) for operation, count in sorted(measured.requests.items())
            },
            "dynamodb_write_units_per_image": round(units.dynamodb_write_units, 2),
            "heatmaps_per_flagged_film": round(measured.heatmaps / measured.flagged, 2) if measured.flagged else 0.0,
            "sqs_requests_per_image": round(units.sqs_requests, 2),
            "usd_per_million_by_line": {line: round(cost, 3) for line, cost in lines.items()},
        }
    fixed = fixed_monthly(template, prices)
    compared = comparisons(prices, figures["batched"]["billed_ms_per_image"])
    alternative = f"live_heatmaps_{other}"
    figures["cost_per_million_images_usd"] = {"live": totals["live"], "batched": totals["batched"]}
    figures[f"cost_per_million_images_usd_{alternative}"] = totals[alternative]
    figures["fixed_monthly_usd"] = {line: round(cost, 2) for line, cost in fixed.items()}
    figures["fixed_monthly_total_usd"] = round(sum(fixed.values()), 2)
    figures["comparison_usd"] = {line: round(cost, 2) for line, cost in compared.items()}
    figures["bars"] = {
        "live_usd_per_million": {
            "target": f"<= {LIVE_BAR_USD}",
            "measured": totals["live"],
            "met": totals["live"] <= LIVE_BAR_USD,
        }
    }
    _print(figures, tables)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # The headline, at the template's configuration: one image an invocation, and full batches of ten.
    headline = figures["cost_per_million_images_usd"]
    RESULTS.write_text(
        json.dumps({**existing, "cost": figures, "cost_per_million_images_usd": headline}, indent=2) + "\n"
    )
    return figures


def _print(figures: dict[str, Any], tables: dict[str, dict[str, float]]) -> None:
    """The cost table, the measured units behind it, the fixed monthly costs and the comparisons."""
    modes = list(tables)
    print(
        f"| per million images, us-east-1 list prices (bench/prices.json) | live, Heatmaps={figures['heatmaps']} "
        f"| batched (10), Heatmaps={figures['heatmaps']} | {modes[2].replace('_', ' ')} |"
    )
    print("|---|---|---|---|")
    for line in tables["live"]:
        print(f"| {line} | " + " | ".join(f"${tables[mode][line]:.2f}" for mode in modes) + " |")
    print("| **total** | " + " | ".join(f"**${sum(tables[mode].values()):.2f}**" for mode in modes) + " |")
    for mode in modes:
        measured = figures[mode]
        print(
            f"{mode}: {measured['images']} images in {measured['invocations']} invocations; billed "
            f"{measured['billed_ms_per_image']} ms an image at {figures['memory_gb']:g} GB; log "
            f"{measured['log_bytes_per_image']} bytes an image ({measured['log_bytes_by_kind_per_image']}); requests "
            f"{measured['requests_per_image']}; DynamoDB write units {measured['dynamodb_write_units_per_image']}"
        )
    print(
        f"heatmap PUTs of flagged films at the model card's expected flagged share, {figures['expected_flagged_share']}"
    )
    print("| fixed, a month | |\n|---|---|")
    for line, cost in figures["fixed_monthly_usd"].items():
        print(f"| {line} | ${cost:.2f} |")
    print("| comparison | |\n|---|---|")
    for line, cost in figures["comparison_usd"].items():
        print(f"| {line} | ${cost:.2f} |")
    bar = figures["bars"]["live_usd_per_million"]
    verdict = "met" if bar["met"] else "NOT met"
    print(f"bar: live {bar['measured']} USD per million images, target {bar['target']}: {verdict}")


if __name__ == "__main__":
    main()
