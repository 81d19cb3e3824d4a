"""The local stack: template.yaml on a moto server, and Lambda's SQS semantics around the real handler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from PIL import Image

from core.population import AgeRange, outside_detail
from infra.corpus import dicom_bytes
from infra.demo import run_demo
from infra.dicom_films import with_patient_age
from infra.lambda_process import InvocationKilledError
from infra.local_stack import (
    EventSourceMapping,
    SqsEventSourceEmulator,
    drain,
    reserved_concurrency,
    resolved,
    with_maximum_concurrency,
)
from infra.resources import create_data_plane
from infra.template import load_template
from pneumoscan.errors import ExitCode
from pneumoscan.stack import outputs_of_deployed_stack
from tests.conftest import RELEASE_MODEL, SAMPLES, stop_server

REGION = "us-east-1"
ROOT = Path(__file__).resolve().parent.parent


def test_event_source_mapping_comes_from_the_template() -> None:
    """Batch size, window and partial failures are the template's, not the emulator's own."""
    template = load_template()
    mapping = EventSourceMapping.from_template(template)
    properties = template["Resources"]["ScoringFunction"]["Properties"]["Events"]["Uploads"]["Properties"]
    assert mapping.batch_size == properties["BatchSize"]
    assert mapping.batching_window_seconds == properties["MaximumBatchingWindowInSeconds"]
    assert mapping.report_batch_item_failures
    cap = properties.get("ScalingConfig", {}).get("MaximumConcurrency")
    assert mapping.maximum_concurrency == (None if cap is None else int(resolved(template, cap)))


@pytest.fixture
def queues() -> Iterator[tuple[Any, str, str]]:
    with mock_aws():
        clients = {name: boto3.client(name, region_name=REGION) for name in ("s3", "sqs", "dynamodb", "events")}
        outputs = create_data_plane(
            clients["s3"], clients["sqs"], clients["dynamodb"], clients["events"], region=REGION
        )
        yield clients["sqs"], outputs.queue_url, outputs.dlq_url


def test_resources_follow_the_template(queues: tuple[Any, str, str]) -> None:
    """The queue's visibility timeout and redrive policy are those of template.yaml."""
    sqs, queue_url, dlq_url = queues
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    declared = load_template()["Resources"]["ScoringQueue"]["Properties"]
    assert int(attributes["VisibilityTimeout"]) == declared["VisibilityTimeout"]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert int(redrive["maxReceiveCount"]) == declared["RedrivePolicy"]["maxReceiveCount"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    assert redrive["deadLetterTargetArn"] == dlq_arn


@pytest.mark.parametrize("training_data_bucket", ["", "hospital-training-data"])
def test_resources_follow_the_templates_conditions(training_data_bucket: str) -> None:
    """A resource whose condition does not hold for the stack's parameters is not created, as in CloudFormation: a
    queue that only the training pipeline would use exists only when a training data bucket is configured."""
    template = load_template()
    template["Resources"]["TrainingOnlyQueue"] = {
        "Type": "AWS::SQS::Queue",
        "Condition": "HasTrainingData",
        "Properties": {"SqsManagedSseEnabled": True},
    }
    with mock_aws():
        clients = {name: boto3.client(name, region_name=REGION) for name in ("s3", "sqs", "dynamodb", "events")}
        create_data_plane(
            clients["s3"],
            clients["sqs"],
            clients["dynamodb"],
            clients["events"],
            region=REGION,
            template=template,
            parameters={"TrainingDataBucket": training_data_bucket},
        )
        names = {url.rsplit("/", 1)[1] for url in clients["sqs"].list_queues().get("QueueUrls", [])}
    assert ("pneumoscan-ScoringQueue" in names, "pneumoscan-TrainingOnlyQueue" in names) == (
        True,
        bool(training_data_bucket),
    )


def _count(sqs: Any, url: str) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def test_partial_failures_are_retried_then_dead_lettered(queues: tuple[Any, str, str]) -> None:
    """Successes are deleted; a record that always fails is redelivered until it lands in the DLQ."""
    sqs, queue_url, dlq_url = queues
    for body in ("good-1", "poison", "good-2"):
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    deliveries: dict[str, int] = {}

    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        failures = []
        for record in event["Records"]:
            deliveries[record["body"]] = deliveries.get(record["body"], 0) + 1
            if record["body"] == "poison":
                failures.append({"itemIdentifier": record["messageId"]})
        return {"batchItemFailures": failures}

    mapping = EventSourceMapping(batch_size=10, batching_window_seconds=0, report_batch_item_failures=True)
    emulator = SqsEventSourceEmulator(sqs, queue_url, handler, mapping, retry_delay_seconds=0, region=REGION)
    for _ in range(20):
        emulator.poll_once()
    assert deliveries["good-1"] == deliveries["good-2"] == 1
    assert deliveries["poison"] == 5  # maxReceiveCount of the template
    assert _count(sqs, queue_url) == 0
    assert _count(sqs, dlq_url) == 1


def test_dead_letters_tell_fault_failures_from_repeated_kills(queues: tuple[Any, str, str]) -> None:
    """A message whose deliveries were killed at most once (a bomb's first batch) and otherwise failed is counted as
    exhausted by faults; one killed on every delivery is not."""
    sqs, queue_url, _ = queues
    drain(sqs, queue_url)  # S3's s3:TestEvent.
    kills = {"killed-once": 1, "killed-always": 5}
    seen: dict[str, int] = {}

    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        [record] = event["Records"]
        body = record["body"]
        seen[body] = seen.get(body, 0) + 1
        if seen[body] <= kills[body]:
            raise InvocationKilledError("memory past 1024 MB")
        return {"batchItemFailures": [{"itemIdentifier": record["messageId"]}]}

    for body in kills:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    mapping = EventSourceMapping(batch_size=1, batching_window_seconds=0, report_batch_item_failures=True)
    emulator = SqsEventSourceEmulator(sqs, queue_url, handler, mapping, retry_delay_seconds=0, region=REGION)
    for _ in range(20):
        emulator.poll_once()
    assert seen == {"killed-once": 5, "killed-always": 5}
    assert emulator.exhausted(5) == 2
    assert emulator.exhausted_by_faults(5) == ["killed-once"]


def test_a_crashed_invocation_retries_the_whole_batch(queues: tuple[Any, str, str]) -> None:
    """When the handler raises, no message of the batch is deleted; the next delivery succeeds."""
    sqs, queue_url, _ = queues
    waiting = _count(sqs, queue_url)  # S3 sent its s3:TestEvent when the notification was configured.
    sqs.send_message(QueueUrl=queue_url, MessageBody="one")
    crashes = iter([True, False])

    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        if next(crashes):
            raise RuntimeError("injected crash")
        return {"batchItemFailures": []}

    mapping = EventSourceMapping(batch_size=10, batching_window_seconds=0, report_batch_item_failures=True)
    emulator = SqsEventSourceEmulator(sqs, queue_url, handler, mapping, retry_delay_seconds=0, region=REGION)
    emulator.poll_once()
    assert emulator.stats.handler_crashes == 1
    assert _count(sqs, queue_url) == waiting + 1
    emulator.poll_once()
    assert _count(sqs, queue_url) == 0


@pytest.mark.slow
def test_demo_round_trip_on_the_local_stack(capsys: pytest.CaptureFixture[str]) -> None:
    """`pneumoscan demo`: every sample uploaded to the moto server gets a SCORED result from the real handler."""
    started = time.perf_counter()
    assert run_demo(SAMPLES, RELEASE_MODEL, timeout_seconds=60) == 0
    output = capsys.readouterr().out
    samples = list(Path(SAMPLES).glob("*/*.jpeg"))
    assert f"{len(samples)} scored, 0 rejected, 0 missing" in output
    assert time.perf_counter() - started < 120


@pytest.mark.slow
def test_cli_talks_to_the_local_stack(
    tmp_path: Path, sample_paths: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`local up`'s outputs file lets publish, promote and result reach the stack like a deployed one."""
    from core.model_card import read_card  # noqa: PLC0415
    from infra.local_stack import LocalStack  # noqa: PLC0415
    from pneumoscan.cli import main  # noqa: PLC0415

    with LocalStack() as stack:
        assert stack.outputs is not None
        outputs = tmp_path / "local-stack.json"
        outputs.write_text(stack.outputs.to_json())
        assert main(["publish", "--outputs", str(outputs)]) == 0
        assert main(["promote", "--outputs", str(outputs), "--version", read_card(RELEASE_MODEL)["version"]]) == 0
        stack.client("s3").put_object(
            Bucket=stack.outputs.input_bucket, Key="incoming/cli film.jpeg", Body=sample_paths[0].read_bytes()
        )
        deadline = time.monotonic() + 30
        while main(["result", "--outputs", str(outputs), "incoming/cli film.jpeg"]) != 0:
            assert time.monotonic() < deadline, "no result within 30 s"
            time.sleep(0.2)
    # The stack's functions log to the same stdout (JSON lines too) while the command runs; pick the command's line.
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(next(line for line in reversed(lines) if line.startswith('{"image_key"')))
    assert result["latest"]["status"] == "SCORED"
    assert result["image_key"].endswith("/incoming/cli film.jpeg")
    assert result["history"] == [result["latest"]]


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_up_runs_until_interrupted(tmp_path: Path, stop_signal: int) -> None:
    """`pneumoscan local up` writes its outputs file, serves boto3 clients, and exits cleanly (130) on Ctrl-C or
    SIGTERM, also when started as a shell starts a background job: with SIGINT ignored."""
    outputs_file = tmp_path / "stack.json"
    up = [sys.executable, "-m", "pneumoscan.cli", "local", "up", "--port", "0", "--outputs", str(outputs_file)]
    process = subprocess.Popen(  # bash: ignore SIGINT, then become the command, which inherits the ignored SIGINT.
        ["bash", "-c", 'trap "" INT; exec "$@"', "local-up", *up],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not outputs_file.exists():
            assert process.poll() is None, "local up exited early"
            assert time.monotonic() < deadline, "no outputs file within 60 s"
            time.sleep(0.2)
        outputs = json.loads(outputs_file.read_text())
        assert set(outputs) >= {
            "endpoint_url",
            "input_bucket",
            "input_prefix",
            "model_bucket",
            "results_table",
            "queue_url",
            "dlq_url",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=outputs["endpoint_url"],
            region_name=outputs["region"],
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )
        assert outputs["input_bucket"] in {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
    finally:
        stop_server(process, stop_signal)
    assert process.returncode == ExitCode.INTERRUPTED


def test_stack_name_reads_cloudformation_outputs() -> None:
    """`--stack-name` takes the names from a deployed stack's outputs."""
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {
            name: {"Value": value}
            for name, value in {
                "InputBucketName": "in-bucket", "InputPrefix": "incoming/", "ModelBucketName": "model-bucket",
                "ResultsTableName": "results", "ScoringQueueUrl": "https://queue", "DeadLetterQueueUrl": "https://dlq",
                "HeatmapBucketName": "heatmap-bucket", "ResultsEventBusName": "results-bus",
            }.items()
        },
    }  # fmt: skip
    with mock_aws():
        cloudformation = boto3.client("cloudformation", region_name=REGION)
        cloudformation.create_stack(StackName="pneumoscan", TemplateBody=json.dumps(template))
        outputs = outputs_of_deployed_stack(cloudformation, "pneumoscan")
    assert (outputs.input_bucket, outputs.model_bucket, outputs.results_table) == (
        "in-bucket",
        "model-bucket",
        "results",
    )
    assert (outputs.heatmap_bucket, outputs.event_bus) == ("heatmap-bucket", "results-bus")
    assert outputs.region == REGION


@pytest.mark.slow
def test_template_age_bounds_reach_the_function(sample_paths: list[Path]) -> None:
    """The template's MaxPatientAgeYears reaches the scoring function on the local stack as it does in AWS: at 3, a
    DICOM stating 4 years is REJECTED as OUTSIDE_VALIDATED_POPULATION naming 0 to under 3 years, and a film
    stating no age is scored."""
    from infra.local_stack import LocalStack, scan_results  # noqa: PLC0415

    film = dicom_bytes(Image.open(sample_paths[-1]).convert("L"))
    with LocalStack(parameters={"MaxPatientAgeYears": "3"}, quiet=True) as stack:
        assert stack.outputs is not None
        stack.serve(RELEASE_MODEL)
        s3 = stack.client("s3")
        s3.put_object(Bucket=stack.outputs.input_bucket, Key="incoming/a.dcm", Body=with_patient_age(film, "004Y"))
        s3.put_object(Bucket=stack.outputs.input_bucket, Key="incoming/b.dcm", Body=with_patient_age(film, None))
        deadline = time.monotonic() + 60
        while len(items := scan_results(stack.client("dynamodb"), stack.outputs.results_table)) < 2:
            assert time.monotonic() < deadline, "no results within 60 s"
            time.sleep(0.2)
    outcomes = {item["image_key"].rsplit("/", 1)[-1]: item for item in items}
    assert (outcomes["a.dcm"]["status"], outcomes["a.dcm"]["reason"]) == ("REJECTED", "OUTSIDE_VALIDATED_POPULATION")
    assert outcomes["a.dcm"]["reason_detail"] == outside_detail(AgeRange(0, 3))
    assert outcomes["b.dcm"]["status"] == "SCORED"


def test_local_stack_carries_no_fault_injection() -> None:
    """``pneumoscan local up`` imports the local stack without the soak's fault injection or its hostile corpus."""
    probe = "import sys, infra.local_stack; print(sorted(m for m in sys.modules if m.startswith('infra.')))"
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'functions'}"}
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=environment, cwd=ROOT
    ).stdout
    assert "infra.local_stack" in loaded
    assert "infra.fault_injection" not in loaded
    assert "infra.corpus" not in loaded


def test_the_concurrency_cap_and_reservation_come_from_the_template() -> None:
    """``ScalingConfig.MaximumConcurrency`` and ``ReservedConcurrentExecutions`` are read from the template through
    its parameters and conditions (a reservation that is off is no limit); a template without a cap has none."""
    template = load_template()
    function = template["Resources"]["ScoringFunction"]["Properties"]
    function["Events"]["Uploads"]["Properties"].pop("ScalingConfig", None)
    assert EventSourceMapping.from_template(template).maximum_concurrency is None
    template["Parameters"]["Cap"] = {"Type": "Number", "Default": 7}
    template["Parameters"]["Reserved"] = {"Type": "Number", "Default": 0}
    template.setdefault("Conditions", {})["IsReserved"] = {"Fn::Not": [{"Fn::Equals": [{"Ref": "Reserved"}, 0]}]}
    function["Events"]["Uploads"]["Properties"]["ScalingConfig"] = {"MaximumConcurrency": {"Ref": "Cap"}}
    function["ReservedConcurrentExecutions"] = {"Fn::If": ["IsReserved", {"Ref": "Reserved"}, {"Ref": "AWS::NoValue"}]}
    assert EventSourceMapping.from_template(template).maximum_concurrency == 7
    assert EventSourceMapping.from_template(template, parameters={"Cap": 3}).maximum_concurrency == 3
    assert reserved_concurrency(template) is None
    assert reserved_concurrency(template, parameters={"Reserved": 4}) == 4
    capped, parameters = with_maximum_concurrency(template, {}, 2)
    assert EventSourceMapping.from_template(capped, parameters=parameters).maximum_concurrency == 2


def _run_until(emulator: SqsEventSourceEmulator, done: Callable[[], bool]) -> None:
    """Run the emulator's poller on its own thread until ``done`` holds (at most a minute)."""
    stop = threading.Event()
    poller = threading.Thread(target=emulator.run, args=(stop,), kwargs={"idle_sleep": 0.02})
    poller.start()
    deadline = time.monotonic() + 60
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    poller.join(timeout=60)


def test_the_poller_runs_up_to_the_cap_and_no_further(queues: tuple[Any, str, str]) -> None:
    """With ``MaximumConcurrency`` 2, two invocations run at once (the first waits for a second), none beyond:
    every message is delivered on its first receive, so a backlog waits in the queue rather than being throttled."""
    sqs, queue_url, dlq_url = queues
    drain(sqs, queue_url)  # S3's s3:TestEvent.
    for index in range(40):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"film-{index}")
    inside = [0]
    counting = threading.Lock()
    two_at_once = threading.Event()
    receive_counts: list[str] = []

    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        with counting:
            inside[0] += 1
            if inside[0] == 2:
                two_at_once.set()
        two_at_once.wait(timeout=30)  # Only the first invocation waits: for a second one to run beside it.
        receive_counts.extend(record["attributes"]["ApproximateReceiveCount"] for record in event["Records"])
        with counting:
            inside[0] -= 1
        return {"batchItemFailures": []}

    mapping = EventSourceMapping(
        batch_size=5, batching_window_seconds=0, report_batch_item_failures=True, maximum_concurrency=2
    )
    emulator = SqsEventSourceEmulator(sqs, queue_url, handler, mapping, pollers=8, concurrency_limit=2, region=REGION)
    _run_until(emulator, lambda: emulator.stats.messages_deleted == 40)
    assert emulator.slots == 2
    assert (emulator.stats.messages_deleted, emulator.stats.handler_crashes) == (40, 0)
    assert emulator.stats.peak_concurrency == 2
    assert emulator.stats.throttled_invocations == 0
    assert receive_counts == ["1"] * 40
    assert _count(sqs, queue_url) == _count(sqs, dlq_url) == 0


def test_without_a_cap_the_poller_is_throttled_at_the_functions_limit(queues: tuple[Any, str, str]) -> None:
    """Without ``MaximumConcurrency`` the poller's batches beyond the function's concurrency limit are throttled:
    not handled, back after the visibility timeout with one more receive each (the way a burst dead-letters)."""
    sqs, queue_url, _ = queues
    drain(sqs, queue_url)  # S3's s3:TestEvent.
    for index in range(30):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"film-{index}")
    receive_counts: list[int] = []
    emulator: SqsEventSourceEmulator

    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        # The only invocation the limit allows holds on until another batch has been throttled.
        deadline = time.monotonic() + 30
        while emulator.stats.throttled_invocations == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        receive_counts.extend(int(record["attributes"]["ApproximateReceiveCount"]) for record in event["Records"])
        return {"batchItemFailures": []}

    mapping = EventSourceMapping(batch_size=5, batching_window_seconds=0, report_batch_item_failures=True)
    emulator = SqsEventSourceEmulator(
        sqs, queue_url, handler, mapping, pollers=3, concurrency_limit=1, retry_delay_seconds=0, region=REGION
    )
    _run_until(emulator, lambda: emulator.stats.messages_deleted == 30)
    assert emulator.slots == 3
    assert emulator.stats.throttled_invocations > 0
    assert emulator.stats.peak_concurrency == 1
    assert emulator.stats.messages_deleted == 30
    assert max(receive_counts) > 1  # A throttled batch's messages were received again.
