"""Create the template's data-plane resources (queues, table, buckets and the S3 -> SQS notification) on any
endpoint: a moto server for the local stack, or moto's in-process mock in tests.

Everything is read from ``template.yaml``; a resource the template changes changes here too, and a test that
depends on a property breaks when the template drifts. The template's conditions are evaluated for the stack's
parameters, and a resource whose condition does not hold is not created, as in CloudFormation. The control plane
is deliberately not created: IAM roles, queue and bucket policies, log groups, alarms, the functions and the
training pipeline. Moto does not enforce IAM or resource policies, so creating them would test nothing; the
local stack runs the functions in this process instead, and ``tests/test_template.py`` checks the policies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from infra.moto_atomicity import make_dynamodb_writes_atomic
from infra.template import (
    Resolver,
    evaluate_conditions,
    is_created,
    load_template,
    parameter_defaults,
    resources_of_type,
)
from pneumoscan.stack import DATA_PLANE_OUTPUTS, OPTIONAL_OUTPUTS, StackOutputs

Conditions = Mapping[str, bool]
"""Condition name -> whether it holds for the stack's parameters."""


def create_data_plane(
    s3: Any,
    sqs: Any,
    dynamodb: Any,
    events: Any,
    *,
    region: str = "us-east-1",
    endpoint_url: str | None = None,
    template: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
) -> StackOutputs:
    """Create queues, tables, buckets and event buses as the template declares them; return the stack's outputs."""
    # The data plane is moto's (a local server, or mock_aws): its writes must be as atomic as DynamoDB's.
    make_dynamodb_writes_atomic()
    template = template or load_template()
    values = {**parameter_defaults(template), **(parameters or {})}
    conditions = evaluate_conditions(template, values)
    resolver = Resolver(parameters=values, region=region, conditions=conditions)
    _create_queues(template, sqs, resolver, conditions)
    _create_tables(template, dynamodb, resolver, conditions)
    _create_buckets(template, s3, resolver, region, conditions)
    _create_event_buses(template, events, resolver, conditions)
    # Outputs of resources that the local stack does not create (the function, alarms, topics) are skipped.
    outputs = {
        name: resolver.resolve(spec["Value"])
        for name, spec in template["Outputs"].items()
        if name in DATA_PLANE_OUTPUTS | OPTIONAL_OUTPUTS and is_created(spec, conditions)
    }
    return StackOutputs.from_template_outputs(outputs, endpoint_url=endpoint_url, region=region)


def _create_queues(template: dict[str, Any], sqs: Any, resolver: Resolver, conditions: Conditions) -> None:
    queues = resources_of_type(template, "AWS::SQS::Queue", conditions)
    # Dead-letter queues first: the queues that redrive to them need their ARN.
    ordered = sorted(queues, key=lambda logical_id: "RedrivePolicy" in queues[logical_id])
    for logical_id in ordered:
        properties = resolver.resolve(queues[logical_id])
        name = f"{resolver.parameters['NamePrefix']}-{logical_id}"
        attributes = {
            key: str(properties[key]).lower() if isinstance(properties[key], bool) else str(properties[key])
            for key in ("VisibilityTimeout", "MessageRetentionPeriod", "SqsManagedSseEnabled")
            if key in properties
        }
        if "RedrivePolicy" in properties:
            attributes["RedrivePolicy"] = json.dumps(properties["RedrivePolicy"])
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        resolver.references[logical_id] = url
        resolver.attributes[(logical_id, "Arn")] = arn
        resolver.attributes[(logical_id, "QueueName")] = name


def _create_tables(template: dict[str, Any], dynamodb: Any, resolver: Resolver, conditions: Conditions) -> None:
    for logical_id, raw in resources_of_type(template, "AWS::DynamoDB::Table", conditions).items():
        properties = resolver.resolve(raw)
        name = f"{resolver.parameters['NamePrefix']}-{logical_id}"
        arguments: dict[str, Any] = {
            "TableName": name,
            "AttributeDefinitions": properties["AttributeDefinitions"],
            "KeySchema": properties["KeySchema"],
            "BillingMode": properties.get("BillingMode", "PROVISIONED"),
        }
        if "GlobalSecondaryIndexes" in properties:
            arguments["GlobalSecondaryIndexes"] = properties["GlobalSecondaryIndexes"]
        if "StreamSpecification" in properties:
            arguments["StreamSpecification"] = {"StreamEnabled": True, **properties["StreamSpecification"]}
        if properties.get("SSESpecification", {}).get("SSEEnabled"):
            arguments["SSESpecification"] = {"Enabled": True}
        description = dynamodb.create_table(**arguments)["TableDescription"]
        pitr = properties.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled", False)
        if pitr:
            dynamodb.update_continuous_backups(
                TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
            )
        resolver.references[logical_id] = name
        resolver.attributes[(logical_id, "Arn")] = description["TableArn"]
        resolver.attributes[(logical_id, "StreamArn")] = description.get("LatestStreamArn", "")


def _create_buckets(template: dict[str, Any], s3: Any, resolver: Resolver, region: str, conditions: Conditions) -> None:
    buckets = resources_of_type(template, "AWS::S3::Bucket", conditions)
    # Buckets without notifications first, so the notification targets of the others already exist.
    for logical_id in sorted(buckets, key=lambda logical_id: "NotificationConfiguration" in buckets[logical_id]):
        properties = resolver.resolve(buckets[logical_id])
        # Buckets the template leaves unnamed get a name from the prefix and logical id, as CloudFormation would.
        name = properties.get("BucketName") or f"{resolver.parameters['NamePrefix']}-{logical_id.lower()}"
        location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=name, **location)
        if properties.get("VersioningConfiguration", {}).get("Status") == "Enabled":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        if "BucketEncryption" in properties:
            # CloudFormation's ServerSideEncryptionByDefault is the API's ApplyServerSideEncryptionByDefault.
            rules = [
                {"ApplyServerSideEncryptionByDefault": rule["ServerSideEncryptionByDefault"]}
                for rule in properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
            ]
            s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
        if "LifecycleConfiguration" in properties:
            s3.put_bucket_lifecycle_configuration(
                Bucket=name,
                LifecycleConfiguration={
                    "Rules": [_lifecycle_rule(rule) for rule in properties["LifecycleConfiguration"]["Rules"]]
                },
            )
        if "PublicAccessBlockConfiguration" in properties:
            s3.put_public_access_block(
                Bucket=name, PublicAccessBlockConfiguration=properties["PublicAccessBlockConfiguration"]
            )
        queue_configurations = properties.get("NotificationConfiguration", {}).get("QueueConfigurations", [])
        if queue_configurations:
            s3.put_bucket_notification_configuration(
                Bucket=name,
                NotificationConfiguration={
                    "QueueConfigurations": [
                        _queue_notification(configuration) for configuration in queue_configurations
                    ]
                },
            )
        resolver.references[logical_id] = name
        resolver.attributes[(logical_id, "Arn")] = f"arn:aws:s3:::{name}"


def _create_event_buses(template: dict[str, Any], events: Any, resolver: Resolver, conditions: Conditions) -> None:
    for logical_id, raw in resources_of_type(template, "AWS::Events::EventBus", conditions).items():
        name = resolver.resolve(raw)["Name"]
        arn = events.create_event_bus(Name=name)["EventBusArn"]
        resolver.references[logical_id] = name
        resolver.attributes[(logical_id, "Arn")] = arn


def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """CloudFormation's lifecycle rule in the shape of S3's PutBucketLifecycleConfiguration (the properties the
    template uses)."""
    converted: dict[str, Any] = {
        "ID": rule["Id"],
        "Status": rule["Status"],
        "Filter": {"Prefix": rule.get("Prefix", "")},
    }
    if "ExpirationInDays" in rule:
        converted["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
    if "NoncurrentVersionExpiration" in rule:
        days = rule["NoncurrentVersionExpiration"]["NoncurrentDays"]
        converted["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(days)}
    if "Transitions" in rule:
        converted["Transitions"] = [
            {"Days": int(transition["TransitionInDays"]), "StorageClass": transition["StorageClass"]}
            for transition in rule["Transitions"]
        ]
    if "AbortIncompleteMultipartUpload" in rule:
        days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
        converted["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": int(days)}
    return converted


def _queue_notification(configuration: dict[str, Any]) -> dict[str, Any]:
    """CloudFormation's QueueConfiguration in the shape of S3's PutBucketNotificationConfiguration."""
    notification: dict[str, Any] = {"QueueArn": configuration["Queue"], "Events": [configuration["Event"]]}
    rules = configuration.get("Filter", {}).get("S3Key", {}).get("Rules", [])
    if rules:
        notification["Filter"] = {"Key": {"FilterRules": rules}}
    return notification
