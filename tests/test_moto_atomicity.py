"""Moto's DynamoDB under concurrent writers, as the scoring function's thread pool writes: conditions and stream
sequence numbers hold as in DynamoDB."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from infra.resources import create_data_plane
from pneumoscan.stack import StackOutputs

REGION = "us-east-1"
WRITERS = 16


@pytest.fixture
def plane() -> Iterator[tuple[Any, StackOutputs]]:
    with mock_aws():
        clients = [boto3.client(name, region_name=REGION) for name in ("s3", "sqs", "dynamodb", "events")]
        yield clients[2], create_data_plane(*clients, region=REGION)


def item(key: str, writer: int) -> dict[str, Any]:
    return {
        "image_key": {"S": key},
        "object_sequence": {"S": "01"},
        "scored_at": {"S": "2026-12-05T00:00:00.000Z"},
        "day_shard": {"S": "2026-12-05#0"},
        "writer": {"N": str(writer)},
    }


def test_one_of_many_concurrent_conditional_puts_wins(plane: tuple[Any, StackOutputs]) -> None:
    """Writers racing to put the same key with attribute_not_exists: exactly one is written, every other one is
    refused, each time."""
    dynamodb, outputs = plane

    def put(key: str, writer: int) -> bool:
        try:
            dynamodb.put_item(
                TableName=outputs.results_table,
                Item=item(key, writer),
                ConditionExpression="attribute_not_exists(image_key)",
            )
        except ClientError as error:
            assert error.response["Error"]["Code"] == "ConditionalCheckFailedException"
            return False
        return True

    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        for round_ in range(10):
            written = list(pool.map(lambda writer, key=f"s3://in/{round_}": put(key, writer), range(WRITERS)))
            assert written.count(True) == 1


def test_concurrent_writes_get_distinct_stream_sequence_numbers(plane: tuple[Any, StackOutputs]) -> None:
    """Every concurrent write has a stream record of its own, under a sequence number of its own."""
    dynamodb, outputs = plane
    keys = [f"s3://in/{index}" for index in range(WRITERS * 10)]
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        list(pool.map(lambda key: dynamodb.put_item(TableName=outputs.results_table, Item=item(key, 0)), keys))
    streams = boto3.client("dynamodbstreams", region_name=REGION)
    arn = dynamodb.describe_table(TableName=outputs.results_table)["Table"]["LatestStreamArn"]
    [shard] = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
    iterator = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")
    records = streams.get_records(ShardIterator=iterator["ShardIterator"], Limit=1000)["Records"]
    numbers = [record["dynamodb"]["SequenceNumber"] for record in records]
    assert len(numbers) == len(keys)
    assert len(set(numbers)) == len(numbers)
