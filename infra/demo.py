"""The demo: the local stack comes up, the release model is published and promoted, the sample X-rays are uploaded
to ``incoming/``, their results are read back from the results table and printed, with their heatmaps, and the
result events a downstream subscriber of the results bus received are counted."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.results import ResultsTable, Status
from infra.local_stack import LocalStack

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}


@dataclass(frozen=True)
class DemoResult:
    key: str
    expected: str
    item: dict[str, Any] | None


def run_demo(samples: Path, model_dir: Path, timeout_seconds: float = 90.0) -> int:
    """Run the whole round trip; returns the exit code (0 when every sample got a result)."""
    paths = sorted(p for p in samples.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    started = time.perf_counter()
    # The demo shows the heatmaps a deploy with Heatmaps=Flagged makes for every flagged film (the template's
    # default makes them only on request).
    with LocalStack(quiet=True, parameters={"Heatmaps": "Flagged"}) as stack:
        assert stack.outputs is not None
        outputs = stack.outputs
        print(f"local stack up at {outputs.endpoint_url} ({time.perf_counter() - started:.1f} s)")
        s3, dynamodb = stack.client("s3"), stack.client("dynamodb")
        subscriber = stack.subscribe("demo-downstream")
        version = stack.serve(model_dir)
        print(f"published and promoted model {version}")
        keys = {}
        for path in paths:
            key = f"{outputs.input_prefix}{path.parent.name.lower()}/{path.name}"
            s3.put_object(Bucket=outputs.input_bucket, Key=key, Body=path.read_bytes())
            keys[key] = path.parent.name
        print(f"uploaded {len(keys)} X-rays to s3://{outputs.input_bucket}/{outputs.input_prefix}")
        results = _wait_for_results(
            ResultsTable(dynamodb, outputs.results_table), outputs.input_bucket, keys, timeout_seconds
        )
        events = len(stack.receive_events(subscriber, len(keys), timeout_seconds=10))
    _print_table(results)
    heatmaps = [r.item["heatmap_key"] for r in results if r.item is not None and "heatmap_key" in r.item]
    if heatmaps:
        print(f"\nheatmaps are PNG overlays in the heatmap bucket, e.g. {heatmaps[0]}")
    missing = [r.key for r in results if r.item is None]
    scored = [r for r in results if r.item is not None and r.item["status"] == Status.SCORED]
    agree = sum(r.item is not None and r.item.get("label") == r.expected for r in scored)
    referred = sum(r.item is not None and r.item.get("label") == "INDETERMINATE" for r in scored)
    latencies = sorted(float(r.item["latency_ms"]) for r in scored if r.item is not None)
    print(
        f"\n{len(scored)} scored, {len(results) - len(scored) - len(missing)} rejected, {len(missing)} missing; "
        f"{agree} of {len(scored)} agree with the data set's label, {referred} INDETERMINATE (refer to a reader); "
        f"median latency {latencies[len(latencies) // 2] if latencies else float('nan'):.0f} ms; "
        f"{len(heatmaps)} heatmaps; "
        f"{events} result events received by a subscriber of the results bus; "
        f"total {time.perf_counter() - started:.1f} s"
    )
    return 1 if missing else 0


def _wait_for_results(
    table: ResultsTable, bucket: str, keys: dict[str, str], timeout_seconds: float
) -> list[DemoResult]:
    deadline = time.monotonic() + timeout_seconds
    found: dict[str, dict[str, Any]] = {}
    while len(found) < len(keys) and time.monotonic() < deadline:
        for key in keys.keys() - found.keys():
            item = table.latest(f"s3://{bucket}/{key}")
            if item is not None:
                found[key] = item
        time.sleep(0.2)
    return [DemoResult(key, expected, found.get(key)) for key, expected in keys.items()]


def _print_table(results: list[DemoResult]) -> None:
    print(
        f"\n{'key':<46} {'expected':<10} {'label':<13} {'confidence':>10} {'model version':<24} {'latency':>8}  heatmap"
    )
    for result in results:
        item = result.item
        if item is None:
            print(f"{result.key:<46} {result.expected:<10} {'(no result)':<10}")
            continue
        label = item.get("label", item["status"])
        confidence = f"{float(item['confidence']):.3f}" if "confidence" in item else item.get("reason", "")
        print(
            f"{result.key:<46} {result.expected:<10} {label:<13} {confidence:>10} "
            f"{item.get('model_version', '-'):<24} {float(item['latency_ms']):>6.0f}ms  "
            f"{'yes' if 'heatmap_key' in item else '-'}"
        )
