"""Where a pneumoscan stack is, for the commands operators run: a deployed stack's CloudFormation outputs, the
outputs file ``pneumoscan local up`` writes, or explicit names on an endpoint."""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3

from core.results import DEFAULT_BY_DAY_SHARDS

DATA_PLANE_OUTPUTS = frozenset(
    {
        "InputBucketName",
        "InputPrefix",
        "ModelBucketName",
        "ResultsTableName",
        "ScoringQueueUrl",
        "DeadLetterQueueUrl",
        "HeatmapBucketName",
        "ResultsEventBusName",
    }
)

OPTIONAL_OUTPUTS = frozenset({"ResultsByDayShards"})
"""Outputs a stack deployed before them lacks; their fields then keep their defaults."""


@dataclass(frozen=True)
class StackOutputs:
    """What a client needs to use a stack: the names the template's Outputs give."""

    endpoint_url: str | None
    region: str
    input_bucket: str
    input_prefix: str
    model_bucket: str
    results_table: str
    queue_url: str
    dlq_url: str
    heatmap_bucket: str = ""
    event_bus: str = ""
    alarm_topic_arn: str = ""
    """The topic every alarm goes to (empty for a local stack, which has no alarms' topic)."""
    by_day_shards: int = DEFAULT_BY_DAY_SHARDS
    """Partition keys per day of the results table's by-day index (the template's ``ResultsByDayShards``)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_template_outputs(cls, outputs: dict[str, str], *, endpoint_url: str | None, region: str) -> StackOutputs:
        """From the values of the template's Outputs, keyed by output name."""
        return cls(
            endpoint_url=endpoint_url,
            region=region,
            input_bucket=outputs["InputBucketName"],
            input_prefix=outputs["InputPrefix"],
            model_bucket=outputs["ModelBucketName"],
            results_table=outputs["ResultsTableName"],
            queue_url=outputs["ScoringQueueUrl"],
            dlq_url=outputs["DeadLetterQueueUrl"],
            heatmap_bucket=outputs["HeatmapBucketName"],
            event_bus=outputs["ResultsEventBusName"],
            alarm_topic_arn=outputs.get("AlarmTopicArn", ""),
            by_day_shards=int(outputs.get("ResultsByDayShards", DEFAULT_BY_DAY_SHARDS)),
        )


def outputs_of_deployed_stack(cloudformation: Any, stack_name: str, endpoint_url: str | None = None) -> StackOutputs:
    """The names of a stack deployed with `sam deploy`, read from its CloudFormation outputs."""
    stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    outputs = {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs", [])}
    missing = sorted(DATA_PLANE_OUTPUTS - outputs.keys())
    if missing:
        raise ValueError(f"stack {stack_name} lacks the outputs {', '.join(missing)}; is it a pneumoscan stack?")
    return StackOutputs.from_template_outputs(
        outputs, endpoint_url=endpoint_url, region=cloudformation.meta.region_name
    )


LOCAL_CREDENTIALS = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}
"""What clients of a local stack sign with: moto accepts any credentials, and real ones never leave the machine."""
LOCAL_REGION = "us-east-1"
_noticed: set[str] = set()


def is_loopback(endpoint_url: str | None) -> bool:
    """Whether the endpoint is on this machine (a local moto server), e.g. http://127.0.0.1:5000."""
    host = urlsplit(endpoint_url).hostname if endpoint_url else None
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # A DNS name other than localhost: not known to be local.
        return False


@dataclass(frozen=True)
class StackTarget:
    """The stack a command works on (its outputs; None when only explicit names were given) and the endpoint and
    region its clients use: an outputs file names both, a command-line endpoint wins over the file's. A local
    target (an outputs file, or a loopback endpoint) needs no AWS configuration: its clients sign with dummy
    credentials."""

    outputs: StackOutputs | None
    endpoint_url: str | None
    region: str | None
    local: bool = False

    @classmethod
    def resolve(cls, *, stack_name: str | None, outputs_file: Path | None, endpoint_url: str | None) -> StackTarget:
        """From ``--outputs FILE``, else ``--stack-name``, else neither (explicit names)."""
        if outputs_file is not None:
            outputs = StackOutputs(**json.loads(outputs_file.read_text()))
            return cls(outputs, endpoint_url or outputs.endpoint_url, outputs.region, local=True)
        local = is_loopback(endpoint_url)
        if stack_name:
            cloudformation = cls(None, endpoint_url, None, local).client("cloudformation")
            return cls(outputs_of_deployed_stack(cloudformation, stack_name, endpoint_url), endpoint_url, None, local)
        return cls(None, endpoint_url, None, local)

    def client(self, service: str) -> Any:
        """A boto3 client of the target's endpoint and region; a local target's signs with dummy credentials."""
        if not self.local:
            return boto3.client(service, endpoint_url=self.endpoint_url, region_name=self.region)  # type: ignore[call-overload]  # The service name is a plain str here.
        region = self.region or LOCAL_REGION
        _notice_once(
            f"pneumoscan: local stack at {self.endpoint_url}: using dummy AWS credentials and region {region} "
            "(no AWS configuration needed)"
        )
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=region, **LOCAL_CREDENTIALS)  # type: ignore[call-overload]  # The service name is a plain str here.


def _notice_once(line: str) -> None:
    """Print ``line`` on standard error the first time it comes up in this process."""
    if line not in _noticed:
        _noticed.add(line)
        print(line, file=sys.stderr)
