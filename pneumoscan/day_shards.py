"""Writes ``day_shard`` on results written before the by-day index was sharded (or under another shard count).

The migration of an existing table (README, "Migrating to the sharded by-day index"): once the new index
``ResultsByDayShard`` exists, every result without a ``day_shard`` (or, with ``--reshard``, every result) gets the
value the scoring function would write now, and DynamoDB adds it to the index. Items are updated in place, never
created: an update names an item by its key and is conditional on the item still existing.

    python -m pneumoscan.day_shards --stack-name pneumoscan [--reshard]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from core.results import DEFAULT_BY_DAY_SHARDS, day_shard
from pneumoscan.errors import run_reported
from pneumoscan.stack import StackTarget


def add_day_shards(dynamodb: Any, table_name: str, shards: int, *, reshard: bool = False, segments: int = 1) -> int:
    """Set ``day_shard`` on each result that lacks it (every result with ``reshard``); returns how many changed.
    ``segments`` parallel scans (threads; boto3 clients are thread-safe) share the table."""
    if segments == 1:
        return _migrate_segment(dynamodb, table_name, shards, reshard, {})
    with ThreadPoolExecutor(max_workers=segments) as pool:
        counts = pool.map(
            lambda segment: _migrate_segment(
                dynamodb, table_name, shards, reshard, {"Segment": segment, "TotalSegments": segments}
            ),
            range(segments),
        )
        return sum(counts)


def _migrate_segment(dynamodb: Any, table_name: str, shards: int, reshard: bool, segment: dict[str, int]) -> int:
    """One scan (or one segment of a parallel scan) of the migration."""
    arguments: dict[str, Any] = {
        "TableName": table_name,
        "ProjectionExpression": "image_key, object_sequence, scored_at, day_shard",
        **segment,
    }
    if not reshard:
        arguments["FilterExpression"] = "attribute_not_exists(day_shard)"
    changed = 0
    while True:
        page = dynamodb.scan(**arguments)
        for item in page.get("Items", []):
            image_key, scored_at = item["image_key"]["S"], item["scored_at"]["S"]
            wanted = day_shard(image_key, scored_at[:10], shards)
            if item.get("day_shard", {}).get("S") == wanted:
                continue
            try:
                dynamodb.update_item(
                    TableName=table_name,
                    Key={"image_key": item["image_key"], "object_sequence": item["object_sequence"]},
                    UpdateExpression="SET day_shard = :shard",
                    ConditionExpression="attribute_exists(image_key)",
                    ExpressionAttributeValues={":shard": {"S": wanted}},
                )
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                    raise
                continue  # Deleted since the scan: nothing to migrate.
            changed += 1
        if "LastEvaluatedKey" not in page:
            return changed
        arguments["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumoscan.day_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--stack-name", help="a deployed stack")
    parser.add_argument("--outputs", type=Path, help="the outputs file of pneumoscan local up")
    parser.add_argument("--endpoint-url", help="an endpoint other than AWS's")
    parser.add_argument("--table", help="the results table (without --stack-name or --outputs)")
    parser.add_argument(
        "--shards",
        type=int,
        help=f"the stack's ResultsByDayShards (default: the stack's, else {DEFAULT_BY_DAY_SHARDS})",
    )
    parser.add_argument("--reshard", action="store_true", help="rewrite every result's day_shard (a new shard count)")
    parser.add_argument("--segments", type=int, default=8, help="parallel scan segments (default 8)")
    arguments = parser.parse_args(argv)
    return run_reported(lambda: _migrate(parser, arguments), "day_shards")


def _migrate(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> int:
    """Give the results of the table the arguments name their ``day_shard``."""
    target = StackTarget.resolve(
        stack_name=arguments.stack_name, outputs_file=arguments.outputs, endpoint_url=arguments.endpoint_url
    )
    table = target.outputs.results_table if target.outputs is not None else arguments.table
    if not table:
        parser.error("name the results table with --table, --stack-name or --outputs")
    shards = arguments.shards or (target.outputs.by_day_shards if target.outputs else DEFAULT_BY_DAY_SHARDS)
    if shards < 1 or arguments.segments < 1:
        parser.error("--shards and --segments must be at least 1")
    dynamodb = target.client("dynamodb")
    changed = add_day_shards(dynamodb, table, shards, reshard=arguments.reshard, segments=arguments.segments)
    print(f"{changed} results given a day_shard of {shards} shards per day", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
