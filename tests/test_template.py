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

import pytest

from infra.template import load_template
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
    policies = template["Resources"][function]["Properties"]["Policies"]
    return [statement for policy in policies for statement in policy["Statement"]]


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
    """Queues are encrypted with a DLQ of 14 days; the visibility timeout is at least 6x the function timeout."""
    resources = template["Resources"]
    function = resources["ScoringFunction"]["Properties"]
    queue = resources["ScoringQueue"]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * function["Timeout"]
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


def test_dashboard_shows_the_metrics_the_functions_emit(template: dict[str, Any]) -> None:
    """Every pneumoscan metric on the dashboard is one a function emits, and drift is shown per model version."""
    body = json.loads(
        re.sub(
            r"\$\{[^}]+\}",
            "placeholder",
            template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"],
        )
    )
    expressions = [
        metric[0]["expression"]
        for widget in body["widgets"]
        for metric in widget["properties"]["metrics"]
        if isinstance(metric[0], dict)
    ]
    searched = {re.search(r'MetricName="(\w+)"', expression).group(1) for expression in expressions}  # type: ignore[union-attr]
    sources = (REPOSITORY_ROOT / "functions" / name / "handler.py" for name in ("scoring", "publisher"))
    emitted = set(re.findall(r'name="(\w+)"', " ".join(path.read_text() for path in sources)))
    assert searched <= emitted, searched - emitted
    drift = [
        expression
        for expression in expressions
        if "PneumoniaDetected" in expression or "PneumoniaProbability" in expression
    ]
    assert len(drift) == 2
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
