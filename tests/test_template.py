"""template.yaml: linted, built without Docker, and least-privilege by construction."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from infra.resources import create_data_plane
from infra.template import evaluate_conditions, is_created, load_template, references, resources_of_type
from tests.conftest import REPOSITORY_ROOT

INFRA_BIN = Path(os.environ.get("PNEUMOSCAN_INFRA_BIN", REPOSITORY_ROOT / ".venv-infra" / "bin"))
TEMPLATE = REPOSITORY_ROOT / "template.yaml"
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024


def _tool(name: str) -> str:
    path = INFRA_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make test` installs the infrastructure tools into .venv-infra")
    return str(path)


def _run(*command: str, cwd: Path = REPOSITORY_ROOT, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "us-east-1"}
    environment["PATH"] = f"{INFRA_BIN}:{environment['PATH']}"
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment, check=False
    )


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def _function_statements(template: dict[str, Any], function: str = "ScoringFunction") -> list[dict[str, Any]]:
    """The data statements of a function's role: those about its own logs and traces are checked on their own."""
    role = template["Resources"][function]["Properties"]["Role"]["Fn::GetAtt"][0]
    policies = template["Resources"][role]["Properties"]["Policies"]
    return [
        statement
        for policy in policies
        for statement in policy["PolicyDocument"]["Statement"]
        if not any(action.startswith(("logs:", "xray:")) for action in statement["Action"])
    ]


def _text(value: Any) -> str:
    """An intrinsic-function value as a string to match resource patterns against."""
    if isinstance(value, dict):
        inner = next(iter(value.values()))
        return " ".join(map(str, inner)) if isinstance(inner, list) else str(inner)
    return str(value)


def test_sam_validate_lint_passes() -> None:
    """`sam validate --lint` finds nothing."""
    result = _run(_tool("sam"), "validate", "--lint", "--template", str(TEMPLATE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_passes() -> None:
    """cfn-lint finds no error or warning."""
    result = _run(_tool("cfn-lint"), str(TEMPLATE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_passes() -> None:
    """checkov's CloudFormation checks pass; every skip is justified in the template next to the resource."""
    result = _run(
        _tool("checkov"),
        "--skip-download",
        "--quiet",
        "--compact",
        "--framework",
        "cloudformation",
        "--file",
        str(TEMPLATE),
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_sam_build_without_docker_fits_lambda(template: dict[str, Any], tmp_path: Path) -> None:
    """`sam build` succeeds without Docker, the unzipped function stays under Lambda's 250 MB, and every built
    function ships the core and its own package only, importing its handler from there."""
    build_dir = tmp_path / "build"
    result = _run(
        _tool("sam"),
        "build",
        "--template",
        str(TEMPLATE),
        "--build-dir",
        str(build_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    function_dir = build_dir / "ScoringFunction"
    size = _size(function_dir)
    print(f"\nunzipped function size: {size / 1024 / 1024:.1f} MB")
    assert size < LAMBDA_UNZIPPED_LIMIT
    assert (function_dir / "scoring" / "handler.py").is_file()
    assert any(function_dir.glob("ai_edge_litert*"))
    publisher_dir = build_dir / "ResultPublisherFunction"
    publisher_size = _size(publisher_dir)
    print(f"unzipped publisher size: {publisher_size / 1024 / 1024:.1f} MB")
    assert (publisher_dir / "publisher" / "handler.py").is_file()
    assert not any(publisher_dir.glob("ai_edge_litert*"))
    for logical_id in LIGHT_FUNCTIONS:
        print(f"unzipped {logical_id} size: {_size(build_dir / logical_id) / 1024 / 1024:.1f} MB")
    _import_built_handlers(template, build_dir)


LIGHT_FUNCTIONS = ("ResultPublisherFunction", "BatchBackfillFunction", "PromotionFunction")
"""The functions that need no LiteRT, numpy, Pillow or pydicom."""
HEAVY_MODULES = ("ai_edge_litert", "numpy", "PIL", "pydicom")

_IMPORT_CHECK = """
import importlib, json, sys
build_dir, module = sys.argv[1], sys.argv[2]
sys.path.append(build_dir)
handler = getattr(importlib.import_module(module), "lambda_handler")
loaded = {name: getattr(sys.modules[name], "__file__", None) for name in sys.modules}
print(json.dumps({"callable": callable(handler), "loaded": loaded}))
"""


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _import_built_handlers(template: dict[str, Any], build_dir: Path) -> None:
    """Every function's handler imports from its built folder: its own package and the core come from there (no
    module is missing from the zip), and the light functions load none of LiteRT, numpy, Pillow or pydicom.

    The folder's wheels are built for Lambda's Python 3.12, so it comes last on the path of an isolated interpreter:
    third-party packages come from the test environment where it has them, and the project's packages, which
    no other path entry holds, from the folder. Neither check is weakened: a module missing from the zip is not
    found, and a heavy package the test environment has would be seen loaded."""
    first_party = {path.name for path in (REPOSITORY_ROOT / "functions").iterdir() if (path / "__init__.py").is_file()}
    functions = {
        logical_id: resource["Properties"]["Handler"].rsplit(".", 1)[0]
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == "AWS::Serverless::Function"
    }
    assert set(LIGHT_FUNCTIONS) < set(functions)
    for logical_id, module in functions.items():
        function_dir = build_dir / logical_id
        shipped = {path.name for path in function_dir.iterdir() if path.name in first_party}
        assert shipped == {"core", module.split(".")[0]}, logical_id
        result = _run(str(Path(sys.executable)), "-I", "-c", _IMPORT_CHECK, str(function_dir), module)
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["callable"], logical_id
        ours = {name: path for name, path in report["loaded"].items() if name.split(".")[0] in first_party}
        assert ours, logical_id
        assert all(path and path.startswith(str(function_dir)) for path in ours.values()), (logical_id, ours)
        if logical_id in LIGHT_FUNCTIONS:
            assert not any(name.split(".")[0] in HEAVY_MODULES for name in report["loaded"]), logical_id


def test_function_requirements_match_the_scoring_extra() -> None:
    """functions/requirements.txt and functions/scoring/requirements.txt ship the scoring extra's packages (boto3
    comes with the runtime)."""
    extra = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "scoring"
    ]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ]", line.strip(), maxsplit=1)[0].lower() for line in requirements}

    shipped = [
        line
        for folder in (REPOSITORY_ROOT / "functions", REPOSITORY_ROOT / "functions" / "scoring")
        for line in (folder / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert names(shipped) == names(extra) - {"boto3"}


def test_function_data_access_is_scoped(template: dict[str, Any]) -> None:
    """No data statement uses '*' resources, reads outside incoming/ and models/, writes anywhere but the results
    table and heatmaps/, or reads more of the table than one image's history."""
    statements = _function_statements(template)
    assert statements
    for statement in statements:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for resource in resources:
            assert _text(resource).strip() != "*", statement["Sid"]
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all("*" not in action for action in actions), statement["Sid"]
        text = " ".join(_text(resource) for resource in resources)
        if "input" in text:
            assert all(action in {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"} for action in actions)
            if "s3:ListBucket" in actions:
                assert statement["Condition"]["StringLike"]["s3:prefix"] == {"Fn::Sub": "${InputPrefix}*"}
            else:
                assert text.endswith("${InputPrefix}*")
        if "ModelBucket" in text:
            assert actions == ["s3:GetObject"]
            assert text.endswith("/models/*")
        if "HeatmapBucket" in text:
            assert actions == ["s3:PutObject"]
            assert text.endswith("/heatmaps/*")
        if "dynamodb:" in " ".join(actions):
            assert actions in (["dynamodb:PutItem"], ["dynamodb:Query"])
            assert "/index/" not in text  # The by-day index is for operators, not the function.


def test_buckets_deny_insecure_transport_and_are_encrypted(template: dict[str, Any]) -> None:
    """Both buckets are encrypted, private, and their policies deny requests without TLS."""
    resources = template["Resources"]
    policies = {
        properties["Properties"]["Bucket"]["Ref"]: properties["Properties"]["PolicyDocument"]["Statement"]
        for properties in resources.values()
        if properties["Type"] == "AWS::S3::BucketPolicy"
    }
    for logical_id, resource in resources.items():
        if resource["Type"] != "AWS::S3::Bucket":
            continue
        properties = resource["Properties"]
        assert properties["BucketEncryption"]["ServerSideEncryptionConfiguration"], logical_id
        assert all(properties["PublicAccessBlockConfiguration"].values()), logical_id
        # The blanket deny (every action); the model bucket adds narrower denies that keep versions immutable.
        [deny] = [s for s in policies[logical_id] if s["Effect"] == "Deny" and s["Action"] == "s3:*"]
        assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_published_model_versions_are_immutable(template: dict[str, Any]) -> None:
    """The model bucket's policy denies writing under models/<version>/ without If-None-Match, and deleting there;
    the pointer models/current.json stays writable (it is not under models/*/*)."""
    [policy] = [
        resource["Properties"]["PolicyDocument"]["Statement"]
        for resource in template["Resources"].values()
        if resource["Type"] == "AWS::S3::BucketPolicy" and resource["Properties"]["Bucket"] == {"Ref": "ModelBucket"}
    ]
    statements = {statement["Sid"]: statement for statement in policy}
    write = statements["PublishedVersionsAreWrittenOnce"]
    assert (write["Effect"], write["Principal"], write["Action"]) == ("Deny", "*", "s3:PutObject")
    assert write["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/models/*/*"}
    assert write["Condition"] == {"Null": {"s3:if-none-match": "true"}}
    delete = statements["PublishedVersionsAreNeverDeleted"]
    assert (delete["Effect"], delete["Principal"]) == ("Deny", "*")
    assert set(delete["Action"]) == {"s3:DeleteObject", "s3:DeleteObjectVersion"}
    assert delete["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/models/*/*"}


def test_queue_table_and_function_settings(template: dict[str, Any]) -> None:
    """Queues are encrypted and keep messages 14 days, the scoring queue and its DLQ alike; the visibility timeout is
    at least 6x the function timeout plus the event source's batching window, as AWS recommends."""
    resources = template["Resources"]
    function = resources["ScoringFunction"]["Properties"]
    queue = resources["ScoringQueue"]["Properties"]
    window = function["Events"]["Uploads"]["Properties"]["MaximumBatchingWindowInSeconds"]
    assert queue["VisibilityTimeout"] >= 6 * function["Timeout"] + window
    assert queue["MessageRetentionPeriod"] == 14 * 24 * 3600
    assert 1 < queue["RedrivePolicy"]["maxReceiveCount"] <= 10
    assert queue["SqsManagedSseEnabled"]
    assert resources["ScoringDeadLetterQueue"]["Properties"]["SqsManagedSseEnabled"]
    assert resources["ScoringDeadLetterQueue"]["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    table = resources["ResultsTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["SSESpecification"]["SSEEnabled"]
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]
    assert "StreamSpecification" in table
    event = function["Events"]["Uploads"]["Properties"]
    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_training_pipeline_definition_is_consistent(template: dict[str, Any]) -> None:
    """The state machine starts with training, every transition exists, and every substitution is provided."""
    text = (REPOSITORY_ROOT / "infra" / "training_pipeline.asl.json").read_text()
    definition = json.loads(text)
    states = definition["States"]
    assert definition["StartAt"] == "Train"
    assert states["Train"]["Resource"].endswith(":states:::sagemaker:createTrainingJob.sync")
    for name, state in states.items():
        targets = [state.get("Next"), state.get("Default"), *(choice["Next"] for choice in state.get("Choices", []))]
        assert all(target in states for target in targets if target), name
    assert states["GateFailed"]["Type"] == "Fail"
    pipeline = template["Resources"]["TrainingPipeline"]["Properties"]
    used = set(re.findall(r"\$\{(\w+)\}", text))
    assert used == set(pipeline["DefinitionSubstitutions"])


def test_heatmaps_go_where_they_cannot_trigger_scoring(template: dict[str, Any]) -> None:
    """The heatmap bucket has no notifications, and the function is told to write there."""
    resources = template["Resources"]
    assert "NotificationConfiguration" not in resources["HeatmapBucket"]["Properties"]
    environment = resources["ScoringFunction"]["Properties"]["Environment"]["Variables"]
    assert environment["HEATMAP_BUCKET"] == {"Ref": "HeatmapBucket"}


FAILED_RECORDS_METRIC = "RecordsFailed"
"""The scoring function's metric of records reported in batchItemFailures (dimension: fault class), which issue
20's failure log line adds to the handler (branch i20-throughput): the alarm and the dashboard read it already."""


def _emitted_metrics() -> set[str]:
    """The metric names the scoring function and the publisher emit (the names their handlers pass to Powertools)."""
    sources = (REPOSITORY_ROOT / "functions" / name / "handler.py" for name in ("scoring", "publisher"))
    return set(re.findall(r'name="(\w+)"', " ".join(path.read_text() for path in sources))) | {FAILED_RECORDS_METRIC}


def _dashboard(template: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's body, parameters at their defaults and every other substitution a placeholder string."""
    defaults = {name: spec.get("Default") for name, spec in template["Parameters"].items()}
    text = template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    text = re.sub(r"\$\{(\w+)\}", lambda match: str(defaults.get(match.group(1), "${placeholder}")), text)
    body: dict[str, Any] = json.loads(re.sub(r"\$\{[^}]+\}", "placeholder", text))
    return body


def test_dashboard_shows_the_metrics_the_functions_emit(template: dict[str, Any]) -> None:
    """Every pneumoscan metric on the dashboard is one a function emits, and drift is shown per model version."""
    body = _dashboard(template)
    expressions = [
        metric[0]["expression"]
        for widget in body["widgets"]
        for metric in widget["properties"]["metrics"]
        if isinstance(metric[0], dict)
    ]
    searched = {name for expression in expressions for name in re.findall(r'MetricName="(\w+)"', expression)}
    assert searched
    assert searched <= _emitted_metrics(), searched - _emitted_metrics()
    drift = [
        expression
        for expression in expressions
        if "PneumoniaDetected" in expression or "PneumoniaProbability" in expression
    ]
    assert len([expression for expression in drift if not expression.startswith("SUM(")]) == 2
    assert all("model_version" in expression for expression in drift)
    queue_metrics = {
        tuple(metric[:2])
        for widget in body["widgets"]
        for metric in widget["properties"]["metrics"]
        if isinstance(metric[0], str)
    }
    assert {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Duration"),
    } <= queue_metrics


def test_batch_backfill_can_only_read_incoming_and_send_to_the_scoring_queue(template: dict[str, Any]) -> None:
    """The Batch Operations function reads nothing outside incoming/, writes no object, and sends only to the queue."""
    actions = set()
    for statement in _function_statements(template, "BatchBackfillFunction"):
        actions.update(statement["Action"])
        text = _text(statement["Resource"])
        if statement["Action"] == ["sqs:SendMessage"]:
            assert statement["Resource"] == {"Fn::GetAtt": ["ScoringQueue", "Arn"]}
        elif "s3:ListBucket" in statement["Action"]:
            assert statement["Condition"]["StringLike"]["s3:prefix"] == {"Fn::Sub": "${InputPrefix}*"}
        else:
            assert text.endswith("${InputPrefix}*")
    assert actions == {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "sqs:SendMessage"}


# Least privilege, read from the template CloudFormation deploys: SAM's translation adds roles, managed policies
# and event source mappings that template.yaml does not show.

NO_RESOURCE_LEVEL_PERMISSIONS = {
    # X-Ray's write and sampling APIs name no resource: Lambda and Step Functions send traces with these.
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    # The ECR login token is account-wide; pulling the image itself is scoped to the training repository.
    "ecr:GetAuthorizationToken",
    # CloudWatch metrics name no resource (the training role's statement is limited to SageMaker's namespace).
    "cloudwatch:PutMetricData",
    # Step Functions' log delivery is configured through CloudWatch Logs' account-level delivery APIs.
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
}
"""The only actions a statement may grant on '*': AWS defines no resource-level permissions for them."""

ALLOWED_MANAGED_POLICIES: frozenset[str] = frozenset()
"""Managed policies a role may attach: none. Each grants on '*' what an explicit statement grants on one resource."""

SQS_CONSUMER_ACTIONS = {
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes",
}


@pytest.fixture(scope="module")
def translated() -> dict[str, Any]:
    """template.yaml after SAM's transform, as CloudFormation receives it (infra/sam_translate.py in .venv-infra)."""
    result = _run(_tool("python"), "-m", "infra.sam_translate", str(TEMPLATE))
    assert result.returncode == 0, result.stdout + result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _role_statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement of a role's inline policies, both branches of an Fn::If included."""
    statements: list[dict[str, Any]] = []
    for policy in role["Properties"].get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in statement:
                statements.extend(branch for branch in statement["Fn::If"][1:] if "Effect" in branch)
            else:
                statements.append(statement)
    return statements


def _roles(translated: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in translated["Resources"].items()
        if resource["Type"] == "AWS::IAM::Role"
    }


def _role_of(translated: dict[str, Any], logical_id: str) -> str:
    """The logical id of the role a function or state machine runs as (RoleArn or Role: !GetAtt X.Arn)."""
    properties = translated["Resources"][logical_id]["Properties"]
    role = properties.get("Role") or properties.get("RoleArn")
    assert isinstance(role, dict) and "Fn::GetAtt" in role, (logical_id, role)
    name, attribute = role["Fn::GetAtt"]
    assert attribute == "Arn"
    return str(name)


def test_no_role_attaches_a_managed_policy(translated: dict[str, Any]) -> None:
    """No role of the deployed template attaches an AWS managed policy (SAM adds them to the roles it generates:
    AWSLambdaSQSQueueExecutionRole grants queue reads and deletes on every queue)."""
    roles = _roles(translated)
    assert {"ScoringFunctionRole", "ResultPublisherFunctionRole"} <= set(roles)
    for logical_id, role in roles.items():
        attached = set(role["Properties"].get("ManagedPolicyArns", []))
        assert attached <= ALLOWED_MANAGED_POLICIES, (logical_id, attached)


def test_every_function_and_the_pipeline_run_as_their_own_declared_role(
    template: dict[str, Any], translated: dict[str, Any]
) -> None:
    """Each function and the state machine names a role declared in template.yaml, none shared: SAM generates none."""
    runners = [
        logical_id
        for logical_id, resource in translated["Resources"].items()
        if resource["Type"] in {"AWS::Lambda::Function", "AWS::StepFunctions::StateMachine"}
    ]
    assert len(runners) == 5
    roles = [_role_of(translated, logical_id) for logical_id in runners]
    assert len(set(roles)) == len(roles), roles
    for runner, role in zip(runners, roles, strict=True):
        assert template["Resources"][role]["Type"] == "AWS::IAM::Role", role
        service = "states" if "StateMachine" in translated["Resources"][runner]["Type"] else "lambda"
        [trust] = template["Resources"][role]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": f"{service}.amazonaws.com"}, role
        assert trust["Action"] == "sts:AssumeRole", role


def _resource_text(resource: Any) -> str:
    """A statement's resource as text: GetAtt as 'X.Arn', Sub as its template string, a literal as itself."""
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        return ".".join(resource["Fn::GetAtt"])
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        argument = resource["Fn::Sub"]
        return str(argument if isinstance(argument, str) else argument[0])
    assert isinstance(resource, str), resource
    return resource


def test_every_statement_names_its_resources(translated: dict[str, Any]) -> None:
    """Every allowed action applies to named resources; '*' only for actions with no resource-level permissions, and
    no ARN leaves its service, region, account or resource type open."""
    for logical_id, role in _roles(translated).items():
        for statement in _role_statements(role):
            assert statement["Effect"] == "Allow", logical_id
            actions = _as_list(statement["Action"])
            assert all("*" not in action.split(":", 1)[1] for action in actions), (logical_id, actions)
            for resource in _as_list(statement["Resource"]):
                text = _resource_text(resource)
                if text == "*":
                    assert set(actions) <= NO_RESOURCE_LEVEL_PERMISSIONS, (logical_id, statement.get("Sid"))
                elif text.startswith("arn:"):
                    # arn:partition:service:region:account:resource; only the resource's own path may be a pattern.
                    for pseudo in ("${AWS::Partition}", "${AWS::Region}", "${AWS::AccountId}"):
                        text = text.replace(pseudo, "pseudo")
                    parts = text.split(":", 5)
                    assert not any("*" in part for part in parts[:5]), (logical_id, text)
                    assert not parts[5].startswith("*"), (logical_id, text)
                else:
                    # A GetAtt, or a Sub that starts from one (${ModelBucket.Arn}/models/*).
                    assert re.match(r"^\$?\{?\w+\.(Arn|StreamArn)", text), (logical_id, text)


def _grants(translated: dict[str, Any], role: str) -> list[tuple[set[str], list[str]]]:
    return [
        (set(_as_list(statement["Action"])), [_resource_text(r) for r in _as_list(statement["Resource"])])
        for statement in _role_statements(translated["Resources"][role])
    ]


def test_scoring_role_consumes_its_own_queue_and_no_other(translated: dict[str, Any]) -> None:
    """The scoring function's role receives, deletes and extends messages of the scoring queue only: it cannot touch
    its dead-letter queue (whose messages are the evidence of failures) or any other queue."""
    role = _role_of(translated, "ScoringFunction")
    queue_grants = [(actions, resources) for actions, resources in _grants(translated, role) if "sqs:" in str(actions)]
    assert queue_grants
    granted: set[str] = set()
    for actions, resources in queue_grants:
        assert all(action.startswith("sqs:") for action in actions), actions
        assert resources == ["ScoringQueue.Arn"], resources
        granted |= actions
    assert granted == SQS_CONSUMER_ACTIONS
    mentioned = " ".join(" ".join(resources) for _, resources in _grants(translated, role))
    assert "DeadLetterQueue" not in mentioned
    assert ":sqs:" not in mentioned
    # The event source mapping reads the same queue the role is scoped to.
    [mapping] = [
        resource["Properties"]
        for resource in translated["Resources"].values()
        if resource["Type"] == "AWS::Lambda::EventSourceMapping"
        and resource["Properties"]["FunctionName"] == {"Ref": "ScoringFunction"}
    ]
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["ScoringQueue", "Arn"]}


def test_publisher_role_reads_only_the_results_stream(translated: dict[str, Any]) -> None:
    """The publisher's role reads the results table's stream only, sends only to its own dead-letter queue and puts
    events only on the results bus."""
    role = _role_of(translated, "ResultPublisherFunction")
    for actions, resources in _grants(translated, role):
        if any(action.startswith("dynamodb:") for action in actions):
            assert actions <= {
                "dynamodb:DescribeStream",
                "dynamodb:GetRecords",
                "dynamodb:GetShardIterator",
                "dynamodb:ListStreams",
            }, actions
            assert resources in (["ResultsTable.StreamArn"], ["${ResultsTable.Arn}/stream/*"]), resources
        if any(action.startswith("sqs:") for action in actions):
            assert (actions, resources) == ({"sqs:SendMessage"}, ["PublisherDeadLetterQueue.Arn"])
        if any(action.startswith("events:") for action in actions):
            assert (actions, resources) == ({"events:PutEvents"}, ["ResultsEventBus.Arn"])


def test_functions_log_to_their_own_log_group_only(template: dict[str, Any], translated: dict[str, Any]) -> None:
    """Every function logs to a log group of its own with a retention, and its role writes to that group only (no
    CreateLogGroup: it cannot create groups that keep logs forever)."""
    functions = [
        logical_id
        for logical_id, resource in translated["Resources"].items()
        if resource["Type"] == "AWS::Lambda::Function"
    ]
    groups = set()
    for function in functions:
        group = translated["Resources"][function]["Properties"]["LoggingConfig"]["LogGroup"]
        assert set(group) == {"Ref"}, function
        groups.add(group["Ref"])
        assert template["Resources"][group["Ref"]]["Type"] == "AWS::Logs::LogGroup"
        assert template["Resources"][group["Ref"]]["Properties"]["RetentionInDays"] > 0
        log_grants = [
            (actions, resources)
            for actions, resources in _grants(translated, _role_of(translated, function))
            if any(action.startswith("logs:") for action in actions)
        ]
        assert log_grants == [({"logs:CreateLogStream", "logs:PutLogEvents"}, [f"{group['Ref']}.Arn"])], function
    assert len(groups) == len(functions)


def test_queues_accept_tls_only(template: dict[str, Any]) -> None:
    """Every queue has a policy denying every action without TLS, and S3 may still send notifications to the scoring
    queue (from the input bucket only)."""
    resources = template["Resources"]
    policies = [
        resource["Properties"] for resource in resources.values() if resource["Type"] == "AWS::SQS::QueuePolicy"
    ]
    queues = [logical_id for logical_id, resource in resources.items() if resource["Type"] == "AWS::SQS::Queue"]
    assert len(queues) == 3
    for queue in queues:
        covering = [policy for policy in policies if {"Ref": queue} in policy["Queues"]]
        assert len(covering) == 1, queue
        statements = covering[0]["PolicyDocument"]["Statement"]
        [deny] = [statement for statement in statements if statement["Effect"] == "Deny"]
        assert (deny["Principal"], deny["Action"]) == ("*", "sqs:*")
        assert {"Fn::GetAtt": [queue, "Arn"]} in _as_list(deny["Resource"])
        assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    [scoring] = [policy for policy in policies if {"Ref": "ScoringQueue"} in policy["Queues"]]
    [allow] = [statement for statement in scoring["PolicyDocument"]["Statement"] if statement["Effect"] == "Allow"]
    assert (allow["Principal"], allow["Action"]) == ({"Service": "s3.amazonaws.com"}, "sqs:SendMessage")
    assert "aws:SourceArn" in allow["Condition"]["ArnEquals"]


RETAINED = ("ResultsTable", "InputBucket", "ModelBucket", "HeatmapBucket", "AccessLogsBucket")
"""What a deleted or replaced stack leaves behind: results, the uploads they were computed from, the models that
computed them, the heatmaps shown with them, and the access logs of all of these."""


def test_results_images_and_models_outlive_the_stack(template: dict[str, Any], translated: dict[str, Any]) -> None:
    """The results table and the buckets are retained when the stack is deleted or a change replaces them."""
    stateful = {
        logical_id
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] in {"AWS::S3::Bucket", "AWS::DynamoDB::Table"}
    }
    assert stateful == set(RETAINED)
    for document in (template, translated):
        for logical_id in RETAINED:
            resource = document["Resources"][logical_id]
            assert resource.get("DeletionPolicy") == "Retain", logical_id
            assert resource.get("UpdateReplacePolicy") == "Retain", logical_id


# The training pipeline: created only with training data, and every run that does not promote raises an alarm.

PIPELINE_ONLY = (
    "TrainingPipeline",
    "TrainingPipelineRole",
    "TrainingPipelineLogs",
    "TrainingPipelineUnsuccessfulAlarm",
    "TrainingJobRole",
    "PromotionFunction",
    "PromotionFunctionRole",
    "PromotionFunctionLogs",
)
"""The resources that only the training pipeline uses."""


def test_the_pipeline_exists_only_with_a_training_data_bucket(template: dict[str, Any]) -> None:
    """Without TrainingDataBucket none of the pipeline's resources is created; with it all are."""
    resources = template["Resources"]
    without = evaluate_conditions(template)
    with_data = evaluate_conditions(template, {"TrainingDataBucket": "hospital-training-data"})
    for logical_id in PIPELINE_ONLY:
        assert not is_created(resources[logical_id], without), logical_id
        assert is_created(resources[logical_id], with_data), logical_id
    assert is_created(resources["ScoringFunction"], without)


@pytest.mark.parametrize("training_data_bucket", ["", "hospital-training-data"])
def test_nothing_refers_to_a_resource_that_is_not_created(template: dict[str, Any], training_data_bucket: str) -> None:
    """Every resource and output that exists refers only to resources that exist (and to parameters), with and
    without training data."""
    conditions = evaluate_conditions(template, {"TrainingDataBucket": training_data_bucket})
    created = {logical_id for logical_id, resource in template["Resources"].items() if is_created(resource, conditions)}
    known = created | set(template["Parameters"])
    declarations = [
        *(template["Resources"][logical_id] for logical_id in created),
        *(output for output in template["Outputs"].values() if is_created(output, conditions)),
    ]
    for declaration in declarations:
        named = references({key: value for key, value in declaration.items() if key != "Condition"}, conditions)
        named |= set(_as_list(declaration.get("DependsOn", [])))
        assert named <= known, named - known


def test_unsuccessful_and_refused_training_runs_raise_an_alarm(template: dict[str, Any]) -> None:
    """A pipeline execution that fails, times out or is aborted raises an alarm on the alarm topic, and a model the
    gate refuses (or a gate that errs) fails the execution: the only way to succeed is promoted == true."""
    alarm = template["Resources"]["TrainingPipelineUnsuccessfulAlarm"]
    assert alarm["Condition"] == "HasTrainingData"
    properties = alarm["Properties"]
    assert properties["AlarmActions"] == [TOPIC_IN_USE]
    assert (properties["ComparisonOperator"], properties["Threshold"]) == ("GreaterThanThreshold", 0)
    watched = {}
    for query in properties["Metrics"]:
        if "MetricStat" in query:
            metric = query["MetricStat"]["Metric"]
            assert metric["Namespace"] == "AWS/States"
            assert metric["Dimensions"] == [{"Name": "StateMachineArn", "Value": {"Ref": "TrainingPipeline"}}]
            assert query["MetricStat"]["Stat"] == "Sum"
            watched[query["Id"]] = metric["MetricName"]
    assert set(watched.values()) == {"ExecutionsFailed", "ExecutionsTimedOut", "ExecutionsAborted"}
    [total] = [query for query in properties["Metrics"] if query.get("ReturnData", True)]
    assert all(identifier in total["Expression"] for identifier in watched)
    definition = json.loads((REPOSITORY_ROOT / "infra" / "training_pipeline.asl.json").read_text())
    states = definition["States"]
    assert not any("Catch" in state for state in states.values())
    succeed = [name for name, state in states.items() if state["Type"] == "Succeed"]
    assert succeed == ["Promoted"]
    [choice] = [state for state in states.values() if state["Type"] == "Choice"]
    assert choice["Choices"] == [{"Variable": "$.gate.promoted", "BooleanEquals": True, "Next": "Promoted"}]
    assert states[choice["Default"]]["Type"] == "Fail"
    # Nothing but the choice on promoted leads to success.
    assert not [state for state in states.values() if "Promoted" in (state.get("Next"), state.get("Default"))]


TOPIC_IN_USE = {"Fn::If": ["CreatesAlarmTopic", {"Ref": "AlarmTopic"}, {"Ref": "AlarmTopicArn"}]}
"""The stack's own alarm topic, or the existing one AlarmTopicArn names."""


def test_alarms_can_be_delivered_to_the_encrypted_topic(template: dict[str, Any]) -> None:
    """Every alarm notifies the topic in use when it fires and when it clears; the stack's own topic has a key that
    lets CloudWatch publish (the AWS managed key for SNS does not: alarms sent to a topic encrypted with it are
    dropped)."""
    resources = template["Resources"]
    alarms = [resource["Properties"] for resource in resources.values() if resource["Type"] == "AWS::CloudWatch::Alarm"]
    assert alarms
    assert all(alarm["AlarmActions"] == [TOPIC_IN_USE] for alarm in alarms)
    assert all(alarm["OKActions"] == [TOPIC_IN_USE] for alarm in alarms)
    key = resources["AlarmTopic"]["Properties"]["KmsMasterKeyId"]
    assert set(key) == {"Ref"}, key
    policy = resources[key["Ref"]]["Properties"]["KeyPolicy"]["Statement"]
    [cloudwatch] = [
        statement for statement in policy if statement["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert set(cloudwatch["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    assert cloudwatch["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


def test_alarm_topic_accepts_tls_only_and_cloudwatch_alarms_may_publish(template: dict[str, Any]) -> None:
    """The alarm topic's one policy denies publishing, subscribing and managing the topic without TLS to everyone, and
    (replacing SNS's default policy) lets this account's CloudWatch alarms publish (and the promotion rule, below)."""
    resources = template["Resources"]
    policies = [
        resource["Properties"] for resource in resources.values() if resource["Type"] == "AWS::SNS::TopicPolicy"
    ]
    [policy] = [policy for policy in policies if {"Ref": "AlarmTopic"} in policy["Topics"]]
    statements = policy["PolicyDocument"]["Statement"]
    [deny] = [statement for statement in statements if statement["Effect"] == "Deny"]
    assert deny["Principal"] == "*"
    assert {"sns:Publish", "sns:Subscribe", "sns:SetTopicAttributes", "sns:DeleteTopic"} <= set(deny["Action"])
    assert _as_list(deny["Resource"]) == [{"Ref": "AlarmTopic"}]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    [allow] = [
        statement
        for statement in statements
        if statement["Effect"] == "Allow" and statement["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert allow["Action"] == "sns:Publish"
    assert allow["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert ":alarm:*" in _text(allow["Condition"]["ArnLike"]["aws:SourceArn"])


def test_validated_population_bounds_reach_the_scoring_function(template: dict[str, Any]) -> None:
    """MinPatientAgeYears and MaxPatientAgeYears default to empty (the served model card's range) and reach the
    scoring function's environment under the names its settings read."""
    parameters = template["Parameters"]
    variables = template["Resources"]["ScoringFunction"]["Properties"]["Environment"]["Variables"]
    for parameter, variable in (
        ("MinPatientAgeYears", "MIN_PATIENT_AGE_YEARS"),
        ("MaxPatientAgeYears", "MAX_PATIENT_AGE_YEARS"),
    ):
        assert parameters[parameter]["Default"] == ""
        assert variables[variable] == {"Ref": parameter}


# Issue 20: deployable on a fresh account, every failure visible, alarms that reach someone, retention by policy.


def _functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resources_of_type(template, "AWS::Serverless::Function")


def test_no_function_reserves_concurrency_unless_asked(template: dict[str, Any], translated: dict[str, Any]) -> None:
    """No function reserves concurrency by default (a reservation can fail the deploy on a low-quota account): the
    scoring function's only reservation is ReservedConcurrency behind a condition that is false at its default."""
    for logical_id, properties in _functions(template).items():
        if logical_id != "ScoringFunction":
            assert "ReservedConcurrentExecutions" not in properties, logical_id
    reservation = _functions(template)["ScoringFunction"]["ReservedConcurrentExecutions"]
    assert reservation == {
        "Fn::If": ["HasReservedConcurrency", {"Ref": "ReservedConcurrency"}, {"Ref": "AWS::NoValue"}]
    }
    assert template["Parameters"]["ReservedConcurrency"]["Default"] == 0
    assert not evaluate_conditions(template)["HasReservedConcurrency"]
    assert evaluate_conditions(template, {"ReservedConcurrency": 20})["HasReservedConcurrency"]
    for logical_id, resource in translated["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function":
            reserved = resource["Properties"].get("ReservedConcurrentExecutions")
            assert reserved is None or set(reserved) == {"Fn::If"}, logical_id


def test_the_scoring_event_source_caps_concurrency(template: dict[str, Any], translated: dict[str, Any]) -> None:
    """The scoring function's SQS event source runs at most MaximumConcurrency functions (default 10, at least 2 as
    AWS requires), in the template CloudFormation receives too."""
    event = _functions(template)["ScoringFunction"]["Events"]["Uploads"]
    assert event["Type"] == "SQS"
    assert event["Properties"]["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}
    parameter = template["Parameters"]["MaximumConcurrency"]
    assert (parameter["Default"], parameter["MinValue"]) == (10, 2)
    [mapping] = [
        resource["Properties"]
        for resource in translated["Resources"].values()
        if resource["Type"] == "AWS::Lambda::EventSourceMapping"
        and resource["Properties"]["FunctionName"] == {"Ref": "ScoringFunction"}
    ]
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}


def test_tracing_is_a_parameter_and_off_by_default(template: dict[str, Any], translated: dict[str, Any]) -> None:
    """X-Ray tracing follows the Tracing parameter (PassThrough by default, Active on request) for every function
    and the training pipeline; nothing turns it on unconditionally."""
    assert template["Globals"]["Function"]["Tracing"] == {"Ref": "Tracing"}
    parameter = template["Parameters"]["Tracing"]
    assert parameter["Default"] == "PassThrough"
    assert set(parameter["AllowedValues"]) == {"PassThrough", "Active"}
    assert all("Tracing" not in properties for properties in _functions(template).values())
    pipeline = template["Resources"]["TrainingPipeline"]["Properties"]["Tracing"]
    assert pipeline == {"Enabled": {"Fn::If": ["TracingIsActive", True, False]}}
    assert not evaluate_conditions(template)["TracingIsActive"]
    for logical_id, resource in translated["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function":
            assert resource["Properties"]["TracingConfig"] == {"Mode": {"Ref": "Tracing"}}, logical_id


@pytest.mark.parametrize(
    ("email", "topic", "accepted"),
    [
        ("", "", False),
        ("oncall@example.org", "", True),
        ("", "arn:aws:sns:us-east-1:123456789012:oncall", True),
        ("oncall@example.org", "arn:aws:sns:us-east-1:123456789012:oncall", True),
    ],
)
def test_a_deploy_must_name_whom_alarms_reach(template: dict[str, Any], email: str, topic: str, accepted: bool) -> None:
    """The template's rule refuses a deploy with neither AlarmEmail nor AlarmTopicArn, and accepts either."""
    [rule] = template["Rules"].values()
    [assertion] = rule["Assertions"]
    check = {"Parameters": template["Parameters"], "Conditions": {"assertion": assertion["Assert"]}}
    assert evaluate_conditions(check, {"AlarmEmail": email, "AlarmTopicArn": topic})["assertion"] is accepted


@pytest.mark.parametrize("topic", ["", "arn:aws:sns:us-east-1:123456789012:oncall"])
def test_alarms_go_to_the_topic_in_use(template: dict[str, Any], topic: str) -> None:
    """With AlarmTopicArn the stack creates no topic (nor its key and policy) and everything refers to that topic;
    without it, the stack's own; the e-mail subscription and the promotion notice go to the same topic."""
    conditions = evaluate_conditions(template, {"AlarmTopicArn": topic, "AlarmEmail": "oncall@example.org"})
    resources = template["Resources"]
    for logical_id in ("AlarmTopic", "AlarmTopicKey", "AlarmTopicPolicy"):
        assert is_created(resources[logical_id], conditions) is (topic == ""), logical_id
    assert is_created(resources["AlarmEmailSubscription"], conditions)
    assert resources["AlarmEmailSubscription"]["Properties"]["TopicArn"] == TOPIC_IN_USE
    [target] = resources["ModelPromotedRule"]["Properties"]["Targets"]
    assert target["Arn"] == TOPIC_IN_USE
    assert template["Outputs"]["AlarmTopicArn"]["Value"] == TOPIC_IN_USE
    created = {logical_id for logical_id, resource in resources.items() if is_created(resource, conditions)}
    for logical_id in created:
        named = references({k: v for k, v in resources[logical_id].items() if k != "Condition"}, conditions)
        assert named <= created | set(template["Parameters"]), (logical_id, named - created)


def _watched(alarm: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], str]]:
    """(namespace, metric, dimensions, statistic) of every metric an alarm reads; a Metrics Insights query as
    ("insights", its text, {}, "")."""
    properties = alarm["Properties"]
    if "MetricName" in properties:
        dimensions = {item["Name"]: item["Value"] for item in properties.get("Dimensions", [])}
        statistic = properties.get("Statistic") or properties["ExtendedStatistic"]
        return [(properties["Namespace"], properties["MetricName"], dimensions, statistic)]
    watched = []
    for query in properties["Metrics"]:
        if "MetricStat" in query:
            metric = query["MetricStat"]["Metric"]
            dimensions = {item["Name"]: item["Value"] for item in metric.get("Dimensions", [])}
            watched.append((metric["Namespace"], metric["MetricName"], dimensions, query["MetricStat"]["Stat"]))
        elif query["Expression"].startswith("SELECT"):
            watched.append(("insights", query["Expression"], {}, ""))
    return watched


def _alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }


def _alarm_on(template: dict[str, Any], namespace: str, metric: str, **dimensions: Any) -> list[str]:
    """The alarms that read ``metric`` with at least these dimensions."""
    return [
        logical_id
        for logical_id, alarm in _alarms(template).items()
        for watched in _watched(alarm)
        if watched[:2] == (namespace, metric) and dimensions.items() <= watched[2].items()
    ]


def test_every_function_alarms_on_errors_and_throttles(template: dict[str, Any]) -> None:
    """Each function, and no fewer, has an alarm on its Errors and one on its Throttles, created with it."""
    for logical_id, function in template["Resources"].items():
        if function["Type"] != "AWS::Serverless::Function":
            continue
        for metric in ("Errors", "Throttles"):
            [alarm] = _alarm_on(template, "AWS/Lambda", metric, FunctionName={"Ref": logical_id})
            assert template["Resources"][alarm].get("Condition") == function.get("Condition"), alarm
            assert _alarms(template)[alarm]["Properties"]["Threshold"] == 0


def test_failed_dropped_rejected_and_heatmap_faults_alarm(template: dict[str, Any]) -> None:
    """Records failed (every fault class summed), records dropped and heatmap failures alarm on the first one;
    rejections alarm per reason above RejectionAlarmThreshold; every metric they read is one the functions emit in
    the namespace the template gives them."""
    namespace = _functions(template)["ScoringFunction"]["Environment"]["Variables"]["POWERTOOLS_METRICS_NAMESPACE"]
    queries = {
        watched[1]: alarm
        for alarm in _alarms(template).values()
        for watched in _watched(alarm)
        if watched[0] == "insights"
    }
    for metric in (FAILED_RECORDS_METRIC, "RecordsDropped", "HeatmapsFailed"):
        alarm = queries.pop(f"SELECT SUM({metric}) FROM {namespace}")
        assert (alarm["Properties"]["ComparisonOperator"], alarm["Properties"]["Threshold"]) == (
            "GreaterThanThreshold",
            0,
        )
    rejections = queries.pop(f"SELECT SUM(ImagesRejectedByReason) FROM {namespace} GROUP BY reason")
    assert rejections["Properties"]["Threshold"] == {"Ref": "RejectionAlarmThreshold"}
    assert not queries
    handler = (REPOSITORY_ROOT / "functions" / "scoring" / "handler.py").read_text()
    assert f'NAMESPACE = "{namespace}"' in handler
    assert 'add_dimension(name="reason"' in handler
    assert {"RecordsDropped", "HeatmapsFailed", "ImagesRejectedByReason"} <= _emitted_metrics()


def test_duration_near_the_timeout_alarms(template: dict[str, Any]) -> None:
    """The scoring function's p99 duration alarms above 80% of its timeout."""
    [logical_id] = _alarm_on(template, "AWS/Lambda", "Duration", FunctionName={"Ref": "ScoringFunction"})
    alarm = _alarms(template)[logical_id]["Properties"]
    assert alarm["ExtendedStatistic"] == "p99"
    assert alarm["Threshold"] == 0.8 * _functions(template)["ScoringFunction"]["Timeout"] * 1000


def test_stream_lag_dynamodb_throttles_and_dead_letters_alarm(template: dict[str, Any]) -> None:
    """The publisher's IteratorAge, throttled requests to the results table (its writes and queries) and throttle
    events of its by-day index, and both dead-letter queues' depth each have an alarm."""
    assert _alarm_on(template, "AWS/Lambda", "IteratorAge", FunctionName={"Ref": "ResultPublisherFunction"})
    table = {"Ref": "ResultsTable"}
    for operation in ("PutItem", "Query"):
        assert _alarm_on(template, "AWS/DynamoDB", "ThrottledRequests", TableName=table, Operation=operation)
    indexes = template["Resources"]["ResultsTable"]["Properties"]["GlobalSecondaryIndexes"]
    for index in indexes:
        for metric in ("WriteThrottleEvents", "ReadThrottleEvents"):
            name = index["IndexName"]
            assert _alarm_on(template, "AWS/DynamoDB", metric, TableName=table, GlobalSecondaryIndexName=name)
    for queue in ("ScoringDeadLetterQueue", "PublisherDeadLetterQueue"):
        dimension = {"Fn::GetAtt": [queue, "QueueName"]}
        assert _alarm_on(template, "AWS/SQS", "ApproximateNumberOfMessagesVisible", QueueName=dimension), queue


def test_a_promoted_model_is_announced(template: dict[str, Any]) -> None:
    """A write of models/current.json in the model bucket reaches the alarm topic through EventBridge, which the
    topic's policy and key let publish for that rule only."""
    resources = template["Resources"]
    bucket = resources["ModelBucket"]["Properties"]
    assert bucket["NotificationConfiguration"]["EventBridgeConfiguration"] == {"EventBridgeEnabled": True}
    pattern = resources["ModelPromotedRule"]["Properties"]["EventPattern"]
    assert pattern["detail"] == {
        "bucket": {"name": [{"Ref": "ModelBucket"}]},
        "object": {"key": ["models/current.json"]},
    }
    assert pattern["detail-type"] == ["Object Created"]
    statements = resources["AlarmTopicPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    [events] = [s for s in statements if s["Principal"] == {"Service": "events.amazonaws.com"}]
    assert events["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["ModelPromotedRule", "Arn"]}}}
    key = resources["AlarmTopicKey"]["Properties"]["KeyPolicy"]["Statement"]
    assert [s for s in key if s["Principal"] == {"Service": "events.amazonaws.com"}]


def test_input_films_are_kept_by_policy(template: dict[str, Any]) -> None:
    """The input bucket expires earlier versions after InputNoncurrentVersionDays, never expires current films, and
    moves them to InputTransitionStorageClass after InputTransitionDays only when that is set (0, the default, is
    off)."""
    rules = {
        rule["Id"]: rule
        for rule in template["Resources"]["InputBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    }
    expiry = rules["ExpireEarlierVersionsOfFilms"]
    assert expiry["NoncurrentVersionExpiration"] == {"NoncurrentDays": {"Ref": "InputNoncurrentVersionDays"}}
    assert all("ExpirationInDays" not in rule and "ExpirationDate" not in rule for rule in rules.values())
    transition = rules["TransitionCurrentFilms"]
    assert transition["Status"] == {"Fn::If": ["TransitionsFilms", "Enabled", "Disabled"]}
    [move] = transition["Transitions"]
    assert move["StorageClass"] == {"Ref": "InputTransitionStorageClass"}
    assert move["TransitionInDays"]["Fn::If"][:2] == ["TransitionsFilms", {"Ref": "InputTransitionDays"}]
    parameters = template["Parameters"]
    assert parameters["InputTransitionDays"]["Default"] == 0
    assert set(parameters["InputTransitionStorageClass"]["AllowedValues"]) == {"STANDARD_IA", "GLACIER_IR"}
    assert not evaluate_conditions(template)["TransitionsFilms"]
    assert evaluate_conditions(template, {"InputTransitionDays": 90})["TransitionsFilms"]


def test_the_dashboard_shows_throughput_latency_outcomes_card_and_cost(template: dict[str, Any]) -> None:
    """The dashboard shows throughput, upload-to-result time with the queue's wait, outcomes by reason, the flagged
    share against the card's rate and the cost drivers."""
    widgets = {widget["properties"]["title"]: widget["properties"] for widget in _dashboard(template)["widgets"]}

    def shown(title_start: str) -> str:
        [properties] = [properties for title, properties in widgets.items() if title.startswith(title_start)]
        return json.dumps(properties)

    assert "ImagesScored" in shown("Throughput")
    latency = shown("Upload to result")
    assert "ApproximateAgeOfOldestMessage" in latency and "ScoringLatency" in latency
    assert "ImagesRejectedByReason" in shown("Outcomes by reason") and FAILED_RECORDS_METRIC in shown("Outcomes")
    card = widgets["Flagged share (PNEUMONIA or INDETERMINATE) against the model card"]
    [line] = card["annotations"]["horizontal"]
    assert line["value"] == float(template["Parameters"]["ExpectedFlaggedRate"]["Default"])
    cost = shown("Cost drivers")
    for metric in ("Invocations", "Duration", "ConsumedWriteCapacityUnits", "HeatmapsStored"):
        assert metric in cost, metric


def test_heatmap_policy_reaches_the_scoring_function(template: dict[str, Any]) -> None:
    """Heatmaps (default OnRequest: only films whose upload or backfill asks) reaches the function as HEATMAPS, with
    exactly the values its settings accept."""
    from scoring.settings import HEATMAP_POLICIES  # noqa: PLC0415  # The function's package, only for this check.

    parameter = template["Parameters"]["Heatmaps"]
    assert parameter["Default"] == "OnRequest"
    assert set(parameter["AllowedValues"]) == set(HEATMAP_POLICIES)
    variables = _functions(template)["ScoringFunction"]["Environment"]["Variables"]
    assert variables["HEATMAPS"] == {"Ref": "Heatmaps"}


@pytest.mark.parametrize(("parameters", "transition"), [({}, None), ({"InputTransitionDays": 90}, 90)])
def test_the_local_data_plane_keeps_films_by_the_templates_policy(
    template: dict[str, Any], parameters: dict[str, Any], transition: int | None
) -> None:
    """The data plane built from the template (the local stack's) gives the input bucket the template's lifecycle
    for the stack's parameters: earlier versions expire, current films move only when a transition is set and never
    expire; the scoring queue keeps messages 14 days."""
    with mock_aws():
        clients = {name: boto3.client(name, region_name="us-east-1") for name in ("s3", "sqs", "dynamodb", "events")}
        outputs = create_data_plane(
            clients["s3"], clients["sqs"], clients["dynamodb"], clients["events"], parameters=parameters
        )
        rules = {
            rule["ID"]: rule
            for rule in clients["s3"].get_bucket_lifecycle_configuration(Bucket=outputs.input_bucket)["Rules"]
        }
        retention = clients["sqs"].get_queue_attributes(
            QueueUrl=outputs.queue_url, AttributeNames=["MessageRetentionPeriod"]
        )["Attributes"]["MessageRetentionPeriod"]
    default_days = template["Parameters"]["InputNoncurrentVersionDays"]["Default"]
    assert rules["ExpireEarlierVersionsOfFilms"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == default_days
    assert rules["ExpireEarlierVersionsOfFilms"]["Status"] == "Enabled"
    assert not [rule for rule in rules.values() if "Expiration" in rule]
    moving = rules["TransitionCurrentFilms"]
    assert moving["Status"] == ("Disabled" if transition is None else "Enabled")
    if transition is not None:
        assert moving["Transitions"] == [{"Days": transition, "StorageClass": "GLACIER_IR"}]
    assert int(retention) == 14 * 24 * 3600


def test_cloudformation_receives_the_alarm_rule(template: dict[str, Any], translated: dict[str, Any]) -> None:
    """SAM's transform passes the rule on: the template CloudFormation checks parameters against still has it."""
    assert translated["Rules"] == template["Rules"]
