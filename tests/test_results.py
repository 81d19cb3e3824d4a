"""The results table's reads: latest and history of an image, and results by time, on the template's table."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import jsonschema
import pytest
from moto import mock_aws

from core.results import (
    DEFAULT_BY_DAY_SHARDS,
    InvalidPageTokenError,
    ResultsTable,
    ScoringResult,
    day_shard,
    plain_item,
)
from infra.resources import create_data_plane
from pneumoscan.day_shards import add_day_shards
from publisher.handler import result_detail
from scoring.heatmaps import MAX_KEY_BYTES, HeatmapStore
from tests.conftest import REPOSITORY_ROOT

REGION = "us-east-1"
START = datetime(2026, 11, 26, 22, 0, tzinfo=UTC)


@pytest.fixture
def table() -> Iterator[ResultsTable]:
    with mock_aws():
        clients = [boto3.client(name, region_name=REGION) for name in ("s3", "sqs", "dynamodb", "events")]
        outputs = create_data_plane(*clients, region=REGION)
        yield ResultsTable(clients[2], outputs.results_table)


def result(key: str, sequence: str, moment: datetime, **fields: Any) -> ScoringResult:
    values: dict[str, Any] = {
        "status": "SCORED",
        "object_etag": "etag",
        "object_size": 10,
        "object_version_id": None,
        "latency_ms": 5.0,
        "model_version": "model-a",
        "label": "NORMAL",
        **fields,
    }
    scored_at = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return ScoringResult(image_key=f"s3://in/{key}", object_sequence=sequence, scored_at=scored_at, **values)


def scan_items(table: ResultsTable) -> list[dict[str, Any]]:
    """Every item of the table, as plain values."""
    return [plain_item(item) for item in table._dynamodb.scan(TableName=table.table_name)["Items"]]


def test_latest_is_the_newest_scoring_of_the_newest_version(table: ResultsTable) -> None:
    """Re-scorings of the newest version win over its upload; an older version re-scored later never does."""
    table.put_once(result("a", "0A", START))
    table.put_once(result("a", "0B", START + timedelta(minutes=1)))
    table.put_once(result("a", "0B|model-b", START + timedelta(minutes=2), model_version="model-b"))
    table.put_once(result("a", "0B|model-0", START + timedelta(minutes=3), model_version="model-0"))
    table.put_once(result("a", "0A|model-c", START + timedelta(minutes=4), model_version="model-c"))
    latest = table.latest("s3://in/a")
    assert latest is not None
    assert (latest["object_sequence"], latest["version_sequence"]) == ("0B|model-0", "0B")
    assert [item["object_sequence"] for item in table.history("s3://in/a")] == [
        "0A",
        "0A|model-c",
        "0B",
        "0B|model-0",
        "0B|model-b",
    ]


def test_results_since_a_time_page_across_days(table: ResultsTable) -> None:
    """Results of several days come back oldest first, a page at a time, optionally of one status."""
    moments = [START + timedelta(hours=hours) for hours in range(0, 50, 5)]  # Three UTC days.
    for index, moment in enumerate(moments):
        status = "REJECTED" if index % 3 == 0 else "SCORED"
        table.put_once(result(f"k{index}", "01", moment, status=status))
    until = START + timedelta(days=3)
    pages: list[list[str]] = []
    token = None
    while True:
        page = table.scored_since(START, until=until, limit=4, page_token=token)
        pages.append([item["image_key"] for item in page.items])
        token = page.next_token
        if token is None:
            break
    assert list(itertools.chain.from_iterable(pages)) == [f"s3://in/k{index}" for index in range(10)]
    assert [len(page) for page in pages] == [4, 4, 2]
    rejected = table.scored_since(START + timedelta(hours=1), until=until, status="REJECTED", limit=100)
    assert [item["image_key"] for item in rejected.items] == ["s3://in/k3", "s3://in/k6", "s3://in/k9"]
    assert rejected.next_token is None


def test_a_day_is_spread_over_its_shards_and_read_back_in_time_order(table: ResultsTable) -> None:
    """A day's results land on several of its ``<day>#<shard>`` keys, each key's always on the same one; a read
    merges the shards oldest first, results of the same millisecond in key order, across pages."""
    moments = [START + timedelta(minutes=index // 3) for index in range(30)]  # Three results per millisecond.
    for index, moment in enumerate(moments):
        table.put_once(result(f"k{index:02d}", "01", moment))
    table.put_once(result("k00", "02", START + timedelta(hours=1)))
    items = scan_items(table)
    shards = {item["day_shard"] for item in items}
    assert len(shards) > 1
    assert shards <= {f"2026-11-26#{shard}" for shard in range(DEFAULT_BY_DAY_SHARDS)}
    assert len({item["day_shard"] for item in items if item["image_key"] == "s3://in/k00"}) == 1
    expected = sorted(items, key=lambda item: (item["scored_at"], item["image_key"], item["object_sequence"]))
    read: list[tuple[str, str]] = []
    token = None
    while True:
        page = table.scored_since(START, until=START + timedelta(hours=2), limit=4, page_token=token)
        read += [(item["image_key"], item["object_sequence"]) for item in page.items]
        token = page.next_token
        if token is None:
            break
    assert read == [(item["image_key"], item["object_sequence"]) for item in expected]


def test_the_shard_count_is_the_tables(table: ResultsTable) -> None:
    """A table of three shards per day writes only ``#0`` to ``#2`` and reads every one of them."""
    three = ResultsTable(table._dynamodb, table.table_name, by_day_shards=3)
    for index in range(12):
        three.put_once(result(f"k{index}", "01", START + timedelta(seconds=index)))
    assert {item["day_shard"] for item in scan_items(three)} == {f"2026-11-26#{shard}" for shard in range(3)}
    page = three.scored_since(START, until=START + timedelta(hours=1), limit=100)
    assert [item["image_key"] for item in page.items] == [f"s3://in/k{index}" for index in range(12)]
    assert day_shard("s3://in/k0", "2026-11-26", 3) == next(
        item["day_shard"] for item in scan_items(three) if item["image_key"] == "s3://in/k0"
    )


def test_results_written_before_sharding_are_migrated_into_the_index(table: ResultsTable) -> None:
    """Results without ``day_shard`` (written before the index was sharded) are invisible to a read by time until
    the migration writes it; a second run changes nothing, and a new shard count re-shards every result."""
    for index in range(5):
        table.put_once(result(f"k{index}", "01", START + timedelta(seconds=index)))
    dynamodb = table._dynamodb
    for item in scan_items(table)[:3]:
        key = {"image_key": {"S": item["image_key"]}, "object_sequence": {"S": item["object_sequence"]}}
        dynamodb.update_item(TableName=table.table_name, Key=key, UpdateExpression="REMOVE day_shard")
    window = {"until": START + timedelta(hours=1), "limit": 100}
    assert len(table.scored_since(START, **window).items) == 2
    assert add_day_shards(dynamodb, table.table_name, DEFAULT_BY_DAY_SHARDS, segments=2) == 3
    assert len(table.scored_since(START, **window).items) == 5
    assert add_day_shards(dynamodb, table.table_name, DEFAULT_BY_DAY_SHARDS) == 0
    add_day_shards(dynamodb, table.table_name, 2, reshard=True)
    assert {item["day_shard"] for item in scan_items(table)} <= {"2026-11-26#0", "2026-11-26#1"}
    two = ResultsTable(dynamodb, table.table_name, by_day_shards=2)
    assert len(two.scored_since(START, **window).items) == 5


def test_a_foreign_page_token_is_refused(table: ResultsTable) -> None:
    """A page token this command did not hand out is a clear error, not a crash or an empty page."""
    with pytest.raises(InvalidPageTokenError):
        table.scored_since(START, page_token="not-a-token")


def test_event_detail_is_the_item_with_its_result_id(table: ResultsTable) -> None:
    """The event feed's detail is the table item with plain JSON numbers and an id for deduplication."""
    written = result(
        "b", "01", START, confidence=0.75, pneumonia_probability=0.25, normal_below=0.3, pneumonia_from=0.5
    )
    table.put_once(written)
    item = table.latest("s3://in/b")
    assert item is not None
    detail = result_detail(item)
    assert detail == {**written.to_item(), "result_id": "s3://in/b#01"}
    assert isinstance(detail["object_size"], int) and isinstance(detail["confidence"], float)


@pytest.mark.parametrize(
    "key",
    [
        "incoming/line\nbreak.jpeg",
        "incoming/\nleading-newline.png",
        "incoming/trailing-newline.jpeg\n",
        "incoming/tab\there.dcm",
        "incoming/Röntgen Thorax 胸部 صورة 🫁.jpeg",
        "incoming/\r\x1b[2J\u202ecarriage-return-escape-bidi",
        "incoming/line\u2028separator.jpeg",  # JavaScript's "." matches neither it nor \r: validators in JS differ.
        "incoming/" + "ü" * 505,  # 1,019 bytes: the heatmap is named by a digest.
    ],
    ids=[
        "newline",
        "leading-newline",
        "trailing-newline",
        "tab",
        "non-ascii",
        "controls",
        "line-separator",
        "near-the-limit",
    ],
)
def test_the_result_event_schema_accepts_every_key_s3_accepts(table: ResultsTable, key: str) -> None:
    """A result of any key S3 accepts (controls, line breaks, any script, up to 1,024 bytes), with the heatmap key
    the scoring function gives it, is an event that the published schema accepts."""
    assert len(key.encode()) <= MAX_KEY_BYTES
    schema = json.loads((REPOSITORY_ROOT / "schemas" / "result-event.schema.json").read_text())
    heatmap_key = HeatmapStore.key_for(f"s3://in/{key}", "01")
    scores = {"label": "PNEUMONIA", "confidence": 0.9, "pneumonia_probability": 0.9}
    points = {"normal_below": 0.5, "pneumonia_from": 0.8}
    written = result(key, "01", START, heatmap_key=f"s3://heatmaps/{heatmap_key}", **scores, **points)
    table.put_once(written)
    item = table.latest(written.image_key)
    assert item is not None and item["image_key"] == f"s3://in/{key}"
    jsonschema.validate(result_detail(item), schema)
