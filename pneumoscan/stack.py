"""Where a pneumoscan stack is, for the commands operators run: a deployed stack's CloudFormation outputs, the
outputs file ``pneumoscan local up`` writes, or explicit names on an endpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3

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


@dataclass(frozen=True)
class StackTarget:
    """The stack a command works on (its outputs; None when only explicit names were given) and the endpoint and
    region its clients use: an outputs file names both, a command-line endpoint wins over the file's."""

    outputs: StackOutputs | None
    endpoint_url: str | None
    region: str | None

    @classmethod
    def resolve(cls, *, stack_name: str | None, outputs_file: Path | None, endpoint_url: str | None) -> StackTarget:
        """From ``--outputs FILE``, else ``--stack-name``, else neither (explicit names)."""
        if outputs_file is not None:
            outputs = StackOutputs(**json.loads(outputs_file.read_text()))
            return cls(outputs, endpoint_url or outputs.endpoint_url, outputs.region)
        if stack_name:
            cloudformation = boto3.client("cloudformation", endpoint_url=endpoint_url)
            return cls(outputs_of_deployed_stack(cloudformation, stack_name, endpoint_url), endpoint_url, None)
        return cls(None, endpoint_url, None)

    def client(self, service: str) -> Any:
        """A boto3 client of the target's endpoint and region."""
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=self.region)  # type: ignore[call-overload]  # The service name is a plain str here.
