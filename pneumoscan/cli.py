"""The ``pneumoscan`` command: one front door to training, scoring and the model registry.

Each subcommand imports what it needs when it runs, so scoring and the demo never load TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoscan.errors import ExitCode, MissingPathError, UsageError, run_reported
from pneumoscan.native_output import filtered_stderr
from pneumoscan.terminal_text import InertFormatter, inert

if TYPE_CHECKING:
    from pneumoscan.stack import StackOutputs, StackTarget

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = REPOSITORY_ROOT / "models" / "release"
SAMPLES = REPOSITORY_ROOT / "samples"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one subcommand; returns the process exit code."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    debug = arguments.debug or os.environ.get("PNEUMOSCAN_DEBUG") == "1"
    command = arguments.run.__name__.lstrip("_").replace("_", " ")
    log_lines = logging.StreamHandler()  # A key or an AWS message in a log line reaches the terminal inert.
    log_lines.setFormatter(InertFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[log_lines])
    logging.getLogger("botocore").setLevel(logging.WARNING)
    # Run as the program, the command owns its standard error and drops native libraries' noise from it; called
    # from Python (tests), it leaves the caller's file descriptors alone.
    with filtered_stderr() if argv is None else contextlib.nullcontext():
        return run_reported(lambda: int(arguments.run(arguments)), command, debug=debug)


def _add_train(commands: Any) -> None:
    """The ``train`` command: the SageMaker job's entry point, its hyper-parameters and the recipe search."""
    train = commands.add_parser("train", help="train, calibrate, export and evaluate a model (SageMaker contract)")
    train.add_argument(
        "--data",
        default=os.environ.get("PNEUMOSCAN_DATA"),
        help="DIR or s3://bucket/prefix with train/ and test/ (default: $PNEUMOSCAN_DATA, else SageMaker channels)",
    )
    train.add_argument("--output", help="DIR or s3://bucket/prefix for the artifact (default: $SM_MODEL_DIR)")
    for name, kind in (
        ("architecture", str), ("image-size", int), ("epochs", int), ("batch-size", int), ("learning-rate", float),
        ("weight-decay", float), ("dropout", float), ("validation-fraction", float), ("patience", int), ("seed", int),
        ("weights", str), ("quantization", str), ("quantization-aware-epochs", int), ("limit-per-class", int),
        ("bootstrap-resamples", int), ("ensemble-size", int), ("head-epochs", int), ("head-learning-rate", float),
        ("student-architecture", str), ("student-image-size", int), ("student-epochs", int),
        ("student-learning-rate", float), ("distillation-weight", float), ("distillation-temperature", float),
        ("serve", str), ("evaluate-test", str), ("weight-interpolation", float), ("fine-tuned-model", str),
    ):  # fmt: skip
        train.add_argument(f"--{name}", type=kind, dest=f"hp_{name.replace('-', '_')}", help="hyper-parameter")
    train.add_argument("--arch", type=str, dest="hp_architecture", help="alias of --architecture")
    recipe = train.add_mutually_exclusive_group()
    recipe.add_argument(
        "--search",
        action="store_true",
        help="first search augmentation strength, label smoothing and learning rate on validation (Optuna), then "
        "train the winner",
    )
    recipe.add_argument("--search-results", type=Path, help="train the winner of an earlier search (its search.json)")
    train.add_argument("--search-trials", type=int, default=10, help="most trials of --search (default 10)")
    train.add_argument("--search-minutes", type=float, default=75.0, help="most minutes of --search (default 75)")
    train.set_defaults(run=_train)

    search = commands.add_parser(
        "search", help="the bounded recipe search alone (validation only); writes search.json and search.md"
    )
    search.add_argument("--data", type=Path, default=os.environ.get("PNEUMOSCAN_DATA"), help="the chest_xray folder")
    search.add_argument("--output", type=Path, required=True, help="folder for search.json and search.md")
    search.add_argument("--trials", type=int, default=12, help="most trials (default 12)")
    search.add_argument("--minutes", type=float, default=45.0, help="most minutes (default 45)")
    search.set_defaults(run=_search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    _add_train(commands)

    evaluate = commands.add_parser("evaluate", help="evaluate a LiteRT artifact on a labelled split")
    evaluate.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release model)")
    evaluate.add_argument(
        "--data", type=Path, default=_default_test_split(), help="split folder with NORMAL/ and PNEUMONIA/"
    )
    evaluate.add_argument("--report", type=Path, help="write ROC, confusion matrix and reliability plots here")
    evaluate.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    evaluate.set_defaults(run=_evaluate)

    _add_derived_artifact_commands(commands)

    score = commands.add_parser("score", help="score image files; one JSON line per file")
    score.add_argument(
        "--model",
        default=os.environ.get("PNEUMOSCAN_MODEL", str(RELEASE_MODEL)),
        help="artifact DIR or s3://bucket (promoted model) or s3://bucket/models/VERSION/",
    )
    score.add_argument(
        "--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint, e.g. a local moto server"
    )
    score.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    score.set_defaults(run=_score)

    publish = commands.add_parser("publish", help="upload an artifact to s3://BUCKET/models/<version>/")
    _add_stack_arguments(publish)
    publish.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release model)")
    publish.set_defaults(run=_publish)

    promote = commands.add_parser("promote", help="point models/current.json at a published version")
    _add_stack_arguments(promote)
    promote.add_argument("--version", required=True)
    promote.add_argument("--force", action="store_true", help="promote even when its test AUC is lower")
    promote.set_defaults(run=_promote)

    _add_operations_commands(commands)

    demo = commands.add_parser("demo", help="round trip of the sample X-rays through the local stack")
    demo.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release model)")
    demo.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for all results")
    demo.set_defaults(run=_demo)

    soak = commands.add_parser("soak", help="uploads, hostile files and injected faults through the local stack")
    soak.add_argument("--uploads", type=int, default=2000, help="real X-rays from the test split to upload")
    soak.add_argument("--data", type=Path, default=_default_test_split().parent, help="chest_xray folder")
    soak.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release model)")
    soak.add_argument(
        "--burst",
        action="store_true",
        help="instead: --uploads sample films at once, the scoring event source capped at --max-concurrency on an "
        "account with that much concurrency; every film must be scored, none dead-lettered",
    )
    soak.add_argument("--max-concurrency", type=int, default=2, help="the burst's MaximumConcurrency (default: 2)")
    soak.set_defaults(run=_soak)

    local = commands.add_parser("local", help="the local stack: template.yaml on a moto server")
    local_commands = local.add_subparsers(required=True, metavar="ACTION")
    up = local_commands.add_parser("up", help="run the local stack in the foreground until interrupted")
    up.add_argument("--port", type=int, default=5000, help="moto server port (0 picks a free one)")
    up.add_argument("--outputs", type=Path, default=Path("local-stack.json"), help="where to write endpoint and names")
    up.add_argument(
        "--retry-delay", type=int, help="seconds before a failed message is retried (default: the visibility timeout)"
    )
    served = up.add_mutually_exclusive_group()
    served.add_argument(
        "--model", type=Path, default=RELEASE_MODEL, help="artifact folder to serve (default: the release model)"
    )
    served.add_argument("--no-model", action="store_true", help="start with an empty model registry")
    up.set_defaults(run=_local_up)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--debug`` on the command and on every subcommand, wherever the user types it."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show the traceback of a failure instead of one line (also PNEUMOSCAN_DEBUG=1)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in {id(sub): sub for sub in action.choices.values()}.values():
                _add_debug_flag(subparser, top=False)


def _add_operations_commands(commands: Any) -> None:
    """The commands ops and downstream systems use day to day on a running stack."""
    results = commands.add_parser(
        "results",
        aliases=["result"],
        help="an image's latest result and history, or every result scored since a time",
        description="Give KEY for one image's latest result and its history, or --since for a page of results.",
    )
    _add_stack_arguments(results, bucket=False)
    results.add_argument("--table", help="results table name (or --stack-name / --outputs)")
    results.add_argument(
        "--by-day-shards",
        type=_positive(int),
        help="with --table: the stack's ResultsByDayShards (default 8; --stack-name and --outputs know it)",
    )
    results.add_argument(
        "image_key", nargs="?", metavar="KEY", help="s3://bucket/key, or a key of the stack's input bucket"
    )
    results.add_argument("--since", type=_timestamp, help="ISO 8601 time, e.g. 2026-11-28T08:00Z (UTC if no zone)")
    results.add_argument("--until", type=_timestamp, help="ISO 8601 time (default: now)")
    results.add_argument("--status", choices=("SCORED", "REJECTED"), help="only results of this status")
    results.add_argument("--limit", type=_positive(int), default=100, help="results per page (default 100)")
    results.add_argument("--page-token", help="continue a --since listing where the previous page ended")
    results.add_argument("--format", choices=("json", "table"), default="json", help="output format")
    results.set_defaults(run=_results)

    backfill = commands.add_parser(
        "backfill", help="enqueue existing uploads under a prefix for (re-)scoring by the promoted model"
    )
    _add_stack_arguments(backfill, bucket=False)
    backfill.add_argument("--prefix", help="key prefix to backfill (default: the stack's whole input prefix)")
    backfill.add_argument(
        "--model-version", help="the model that must score them: the promoted one (default: whichever is promoted)"
    )
    backfill.add_argument("--explain", action="store_true", help="store a heatmap for every image, not only PNEUMONIA")
    backfill.add_argument("--rate", type=_positive(float), default=50.0, help="messages per second (default 50)")
    backfill.add_argument("--state", type=Path, help="resume file (default: .pneumoscan-backfill/<plan>.json)")
    backfill.set_defaults(run=_backfill)

    redrive = commands.add_parser(
        "redrive", help="move the dead-letter queue's messages back to the scoring queue, once the cause is fixed"
    )
    _add_stack_arguments(redrive, bucket=False)
    redrive.add_argument("--dry-run", action="store_true", help="only count the dead-lettered messages")
    redrive.set_defaults(run=_redrive)

    status = commands.add_parser(
        "status",
        help="the operator's morning screen: model, queues, results, drift, alarms",
        description="The promoted model and its card's figures, queue depth and oldest message, the dead-letter "
        "queue, results in the last hour and day, the last day's pneumonia rate against the card's, and alarms "
        "in ALARM.",
    )
    _add_stack_arguments(status, bucket=False)
    status.add_argument("--format", choices=("json", "table"), default="table", help="output format")
    status.set_defaults(run=_status)


def _add_stack_arguments(parser: argparse.ArgumentParser, bucket: bool = True) -> None:
    """Where the stack is: a deployed stack's name, a local stack's outputs file, or explicit names."""
    if bucket:
        parser.add_argument("--bucket", help="model bucket (or --stack-name / --outputs)")
    parser.add_argument("--stack-name", help="a deployed pneumoscan stack: names come from its CloudFormation outputs")
    parser.add_argument("--outputs", type=Path, help="the JSON file `pneumoscan local up` wrote")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="e.g. a local moto server")


def _target(arguments: argparse.Namespace) -> StackTarget:
    """The stack the arguments name (--outputs, --stack-name or neither) and the endpoint its clients use."""
    from pneumoscan.stack import StackTarget

    return StackTarget.resolve(
        stack_name=getattr(arguments, "stack_name", None),
        outputs_file=getattr(arguments, "outputs", None),
        endpoint_url=arguments.endpoint_url,
    )


def _required_outputs(target: StackTarget) -> StackOutputs:
    """The outputs of the stack a command cannot run without, or a usage error naming the flags."""
    if target.outputs is None:
        raise UsageError("name the stack with --stack-name or --outputs")
    return target.outputs


def _model_bucket(target: StackTarget, arguments: argparse.Namespace) -> str:
    stack = target.outputs
    bucket: str | None = stack.model_bucket if stack is not None else arguments.bucket
    if not bucket:
        raise UsageError("name the model bucket with --bucket, --stack-name or --outputs")
    return bucket


def _add_derived_artifact_commands(commands: Any) -> None:
    """The commands that write a new version derived from an existing artifact (``build_parser`` would grow past
    ruff's limit)."""
    _add_attach_gate(commands)
    _add_attach_screening(commands)
    _add_requantize(commands)
    _add_calibrate(commands)


def _add_attach_gate(commands: Any) -> None:
    """The ``attach-gate`` command: an artifact's input gate, as a new version."""
    attach = commands.add_parser(
        "attach-gate", help="give an artifact trained before the input gate its gate, as a new version"
    )
    attach.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release model)")
    attach.add_argument("--keras", type=Path, required=True, help="the artifact's model.keras")
    attach.add_argument(
        "--data", type=Path, default=os.environ.get("PNEUMOSCAN_DATA"), help="the chest_xray folder it was trained on"
    )
    attach.add_argument("--output", type=Path, required=True, help="folder for the new artifact")
    attach.set_defaults(run=_attach_gate)


def _add_requantize(commands: Any) -> None:
    """The ``requantize`` command: an artifact's weights served as int8 when they pass the exporter's gate."""
    requantize = commands.add_parser(
        "requantize",
        help="export an artifact's weights again as int8 behind the exporter's parity gate, as a new version",
        description="Converts the artifact's Keras model to int8 as training does (README: int8 serving), gates it on "
        "validation films only and, when it passes, fits the input gate and the screening head again on its features; "
        "exits with code 5, writing nothing, when int8 does not pass; the error line gives the figures.",
    )
    requantize.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release)")
    requantize.add_argument("--keras", type=Path, required=True, help="the artifact's model.keras")
    requantize.add_argument(
        "--data", type=Path, default=os.environ.get("PNEUMOSCAN_DATA"), help="the chest_xray folder it was trained on"
    )
    requantize.add_argument("--output", type=Path, required=True, help="new, empty folder for the new artifact")
    requantize.add_argument(
        "--quantization-aware-epochs",
        type=int,
        default=3,
        help="epochs of quantization-aware fine-tuning when post-training int8 fails the gate (0: none; default 3)",
    )
    requantize.set_defaults(run=_requantize)


def _add_calibrate(commands: Any) -> None:
    """The ``calibrate`` command: a site's own calibration of an artifact, as a new version."""
    calibrate = commands.add_parser(
        "calibrate",
        help="refit an artifact's calibration and operating points on a site's labelled films, as a new version",
        description="Scores DIR/NORMAL and DIR/PNEUMONIA with the artifact's served model, splits the site's patients "
        "in two (README: Site calibration), fits Platt scaling and the operating points on one part, reports on the "
        "other and writes the result as a new artifact.",
    )
    calibrate.add_argument(
        "--model", default=str(RELEASE_MODEL), help="artifact DIR or s3://bucket/models/VERSION/ (default: release)"
    )
    calibrate.add_argument("--data", type=Path, required=True, help="the site's films: DIR/NORMAL and DIR/PNEUMONIA")
    calibrate.add_argument("--output", type=Path, required=True, help="new, empty folder for the new artifact")
    calibrate.add_argument(
        "--min-per-class", type=_positive(int), default=50, help="fewest films of each class (default 50)"
    )
    calibrate.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    calibrate.add_argument(
        "--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint, e.g. a local moto server"
    )
    calibrate.set_defaults(run=_calibrate)


def _add_attach_screening(commands: Any) -> None:
    """The ``attach-screening`` command: an artifact's film-condition head, as a new version."""
    attach = commands.add_parser(
        "attach-screening",
        help="give an artifact trained before the screening checks its film-condition head, as a new version",
    )
    attach.add_argument("--model", type=Path, default=RELEASE_MODEL, help="artifact folder (default: release model)")
    attach.add_argument(
        "--data", type=Path, default=os.environ.get("PNEUMOSCAN_DATA"), help="the chest_xray folder it was trained on"
    )
    attach.add_argument("--output", type=Path, required=True, help="folder for the new artifact")
    attach.set_defaults(run=_attach_screening)


def _default_test_split() -> Path:
    data = os.environ.get("PNEUMOSCAN_DATA", str(REPOSITORY_ROOT.parent / "shared" / "data" / "chest_xray"))
    return Path(data) / "test"


def _train(arguments: argparse.Namespace) -> int:
    data = arguments.data
    if data and not data.startswith("s3://") and not Path(data).is_dir():  # Before TensorFlow takes seconds to load.
        raise MissingPathError(
            f"no data set at {data}; give --data (or PNEUMOSCAN_DATA) the chest_xray folder with train/ and test/"
        )
    from training.config import TrainingConfig

    overrides = {
        key.removeprefix("hp_"): value
        for key, value in vars(arguments).items()
        if key.startswith("hp_") and value is not None
    }
    TrainingConfig().with_overrides(overrides)  # A value out of range fails here, before TensorFlow loads.
    from training.job import run_job
    from training.metrics import headline
    from training.search import SearchSettings

    # Keras's progress lines and the LiteRT converter's native output go to stderr, so stdout holds only the JSON.
    with _stdout_to_stderr():
        card = run_job(
            arguments.data,
            arguments.output,
            overrides,
            search=SearchSettings(trials=arguments.search_trials, minutes=arguments.search_minutes)
            if arguments.search
            else None,
            search_results=arguments.search_results,
        )
    print(
        json.dumps(
            {
                "version": card["version"],
                **{split: headline(metrics) for split, metrics in card["metrics"].items()},
                "served": card["serving"]["served"],
                "comparison": card.get("comparison", {}),
                "training_seconds": card["training_seconds"],
            }
        )
    )
    return 0


def _search(arguments: argparse.Namespace) -> int:
    _require_data_set(arguments.data, "train")
    from training.config import TrainingConfig
    from training.search import SearchSettings, run_search

    settings = SearchSettings(trials=arguments.trials, minutes=arguments.minutes)
    with _stdout_to_stderr():
        report = run_search(Path(arguments.data) / "train", TrainingConfig(), settings, arguments.output)
    print(json.dumps({"best": report.best, "trials": len(report.trials)}))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to standard output, by Python or by native libraries, to standard error."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _evaluate(arguments: argparse.Namespace) -> int:
    from core.model_card import read_card
    from training.evaluate import evaluate_artifact
    from training.ledger import LedgerEntry, git_commit, is_official_test_split, record_scoring
    from training.metrics import headline
    from training.report import write_split_plots

    evaluation, scores = evaluate_artifact(arguments.model, arguments.data, resamples=arguments.resamples)
    if is_official_test_split(arguments.data):
        record_scoring(
            LedgerEntry(
                run="pneumoscan evaluate",
                version=str(read_card(arguments.model)["version"]),
                count=evaluation.count,
                figures=headline(evaluation.to_dict()),
                git_commit=git_commit(),
            )
        )
    if arguments.report:
        write_split_plots(arguments.report, arguments.data.name, scores, evaluation.threshold)
    print(json.dumps(evaluation.to_dict(), indent=2))
    return 0


def _require_data_set(data: Path | str | None, inside: str = "") -> None:
    """Fail in one line when ``--data`` (or PNEUMOSCAN_DATA) names no chest_xray folder (with ``inside`` in it)."""
    if data is None or not (Path(data) / inside).is_dir():
        where = f"at {data}" if data is not None else "given"
        raise MissingPathError(f"no data set {where}; give --data (or PNEUMOSCAN_DATA) the chest_xray folder")


def _attach_gate(arguments: argparse.Namespace) -> int:
    _require_data_set(arguments.data)
    from training.attach_gate import attach_gate

    with _stdout_to_stderr():
        card = attach_gate(arguments.model, arguments.keras, arguments.data, arguments.output)
    print(
        json.dumps({"version": card["version"], "derived_from": card["derived_from"], "input_gate": card["input_gate"]})
    )
    return 0


def _requantize(arguments: argparse.Namespace) -> int:
    _require_data_set(arguments.data)
    from training.requantize import requantize

    with _stdout_to_stderr():
        card = requantize(
            arguments.model,
            arguments.keras,
            arguments.data,
            arguments.output,
            quantization_aware_epochs=arguments.quantization_aware_epochs,
        )
    print(json.dumps({"version": card["version"], "derived_from": card["derived_from"], "export": card["export"]}))
    return 0


def _calibrate(arguments: argparse.Namespace) -> int:
    if not arguments.data.is_dir():
        raise MissingPathError(f"no site data at {arguments.data}; give --data a folder with NORMAL/ and PNEUMONIA/")
    from training.site_calibration import calibrate_site, summary

    card = calibrate_site(
        _local_model(arguments.model, arguments),
        arguments.data,
        arguments.output,
        min_per_class=arguments.min_per_class,
        resamples=arguments.resamples,
    )
    print(json.dumps({"output": str(arguments.output), **summary(card)}, indent=2))
    return 0


def _attach_screening(arguments: argparse.Namespace) -> int:
    _require_data_set(arguments.data)
    from training.attach_screening import attach_screening

    with _stdout_to_stderr():
        card = attach_screening(arguments.model, arguments.data, arguments.output)
    print(
        json.dumps({"version": card["version"], "derived_from": card["derived_from"], "screening": card["screening"]})
    )
    return 0


def _score(arguments: argparse.Namespace) -> int:
    from core.rejections import InvalidImageError
    from scoring.classifier import Classifier
    from scoring.litert import INFERENCE_BATCH
    from scoring.scorer import score_files

    # Every CPU the process may use: a command on a workstation has the machine, unlike a Lambda invocation (one
    # thread). The results are the same to the last digit; 64 films on 2 cores take 1.5 s instead of 2.3 s.
    classifier = Classifier.from_directory(_local_model(arguments.model, arguments), num_threads=_usable_cpus())
    failed = 0
    # A few files at a time, each printed once scored: memory stays the same however many files are named.
    paths: list[Path] = arguments.paths
    for start in range(0, len(paths), INFERENCE_BATCH):
        read: list[tuple[Path, bytes | OSError]] = []
        for path in paths[start : start + INFERENCE_BATCH]:
            try:
                read.append((path, path.read_bytes()))
            except OSError as error:
                read.append((path, error))
        scored = iter(score_files(classifier, [data for _, data in read if isinstance(data, bytes)]))
        for path, data in read:
            if isinstance(data, OSError):
                failed += 1
                print(json.dumps({"path": str(path), "error": f"cannot read file: {data.strerror or data}"}))
                continue
            result = next(scored)
            if isinstance(result, InvalidImageError):
                failed += 1
                print(json.dumps({"path": str(path), "error": str(result), "reason": result.reason.value}))
            else:
                print(json.dumps({
                    "path": str(path),
                    "label": result.label,
                    "confidence": round(result.confidence, 6),
                    "pneumonia_probability": round(result.pneumonia_probability, 6),
                    "normal_below": round(result.operating_points.normal_below, 6),
                    "pneumonia_from": round(result.operating_points.pneumonia_from, 6),
                    "model_version": result.model_version,
                }))  # fmt: skip
    return 1 if failed else 0


def _usable_cpus() -> int:
    """The number of CPUs this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _local_model(model: str, arguments: argparse.Namespace) -> Path:
    """A local artifact folder for ``model``, downloading from S3 when it is an s3:// URL."""
    if not model.startswith("s3://"):
        return Path(model)
    from core.model_registry import ModelRegistry
    from core.s3 import S3Location

    location = S3Location.parse(model)
    registry = ModelRegistry(_target(arguments).client("s3"), location.bucket)
    cache = Path(tempfile.gettempdir()) / "pneumoscan-models"
    if location.prefix.strip("/") in {"", "models", "models/current.json"}:
        return registry.download_current(cache)[1]
    prefix = location.prefix.rstrip("/") + "/"
    destination = cache / prefix.strip("/").replace("/", "_")
    registry.download(prefix, destination)
    return destination


def _publish(arguments: argparse.Namespace) -> int:
    from core.model_registry import ModelRegistry, VersionExistsError

    target = _target(arguments)
    bucket = _model_bucket(target, arguments)
    try:
        prefix = ModelRegistry(target.client("s3"), bucket).publish(arguments.model)
    except VersionExistsError as refusal:
        print(f"pneumoscan publish: refused: {inert(str(refusal))}; publish under a new version", file=sys.stderr)
        return ExitCode.PROMOTION_REFUSED
    print(json.dumps({"published": f"s3://{bucket}/{prefix}"}))
    return 0


def _promote(arguments: argparse.Namespace) -> int:
    from core.model_registry import ModelRegistry, PromotionRefusedError

    target = _target(arguments)
    registry = ModelRegistry(target.client("s3"), _model_bucket(target, arguments))
    try:
        pointer = registry.promote(arguments.version, force=arguments.force)
    except PromotionRefusedError as refusal:
        print(f"pneumoscan promote: refused: {inert(str(refusal))}; use --force to promote anyway", file=sys.stderr)
        return ExitCode.PROMOTION_REFUSED
    print(json.dumps({"current": pointer.version, "test_auc": pointer.test_auc}))
    return 0


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` above zero."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from error
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero: {text}")
        return value

    return parse


def _timestamp(text: str) -> datetime:
    """An ISO 8601 time for --since and --until; UTC when it names no zone."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _results(arguments: argparse.Namespace) -> int:
    from core.results import DEFAULT_BY_DAY_SHARDS, InvalidPageTokenError, ResultsTable, latest_of
    from pneumoscan.output import print_history, print_page

    if (arguments.image_key is None) == (arguments.since is None):
        raise UsageError("give either KEY (one image) or --since (results scored since a time)")
    target = _target(arguments)
    stack = target.outputs
    table_name = stack.results_table if stack is not None else arguments.table
    if not table_name:
        raise UsageError("name the results table with --table, --stack-name or --outputs")
    shards = stack.by_day_shards if stack is not None else arguments.by_day_shards or DEFAULT_BY_DAY_SHARDS
    table = ResultsTable(target.client("dynamodb"), table_name, shards)
    if arguments.since is not None:
        try:
            page = table.scored_since(
                arguments.since,
                until=arguments.until,
                status=arguments.status,
                limit=arguments.limit,
                page_token=arguments.page_token,
            )
        except InvalidPageTokenError as error:
            raise UsageError(str(error)) from error
        print_page(page, arguments.format)
        return 0
    image_key = arguments.image_key
    if not image_key.startswith("s3://"):
        if stack is None:
            raise UsageError("give the full s3://bucket/key, or --stack-name / --outputs to name the input bucket")
        image_key = f"s3://{stack.input_bucket}/{image_key}"
    history = table.history(image_key)  # A TransientResultsError is reported by main, by its AWS cause.
    if not history:
        print(json.dumps({"image_key": image_key, "error": "no result yet"}))
        return 1
    print_history(image_key, latest_of(history), history, arguments.format)
    return 0


def _backfill(arguments: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.model_registry import ModelRegistry
    from pneumoscan.backfill import Backfill, BackfillError, BackfillPlan, default_state_path

    target = _target(arguments)
    stack = _required_outputs(target)
    prefix = arguments.prefix if arguments.prefix is not None else stack.input_prefix
    if not prefix.startswith(stack.input_prefix):
        raise UsageError(f"the function scores only keys under {stack.input_prefix!r}; {prefix!r} is outside it")
    promoted = ModelRegistry(target.client("s3"), stack.model_bucket).current().version  # Errors: see main.
    if arguments.model_version and arguments.model_version != promoted:
        raise UsageError(
            f"{arguments.model_version} is not the promoted model ({promoted}): the function scores with the "
            f"promoted model, so promote it first (pneumoscan promote --version {arguments.model_version})"
        )
    plan = BackfillPlan(
        bucket=stack.input_bucket,
        prefix=prefix,
        queue_url=stack.queue_url,
        model_version=promoted,
        explain=arguments.explain,
        messages_per_second=arguments.rate,
    )
    state_path = arguments.state or default_state_path(plan)
    backfill = Backfill(target.client("s3"), target.client("sqs"), plan, state_path)
    try:
        where = inert(f"s3://{plan.bucket}/{plan.prefix}")
        with tqdm(unit=" objects", desc=f"backfill {where}", file=sys.stderr) as bar:
            state = backfill.run(progress=bar)
    except BackfillError as error:
        print(f"backfill stopped: {inert(str(error))}; run the same command again to resume", file=sys.stderr)
        return 1
    print(json.dumps({"enqueued": state.enqueued, "model_version": promoted, "state": str(state_path)}))
    return 0


def _redrive(arguments: argparse.Namespace) -> int:
    from pneumoscan.redrive import redrive

    target = _target(arguments)
    stack = _required_outputs(target)
    report = redrive(target.client("sqs"), stack.dlq_url, stack.queue_url, dry_run=arguments.dry_run)
    summary = {"dead_letters": report.waiting, "moved": report.moved, "dry_run": report.dry_run}
    print(json.dumps({**summary, **({"move_task": report.move_task} if report.move_task else {})}))
    return 0


def _status(arguments: argparse.Namespace) -> int:
    from pneumoscan.output import print_status
    from pneumoscan.status import collect, stack_alarm_names

    target = _target(arguments)
    stack = _required_outputs(target)
    if arguments.stack_name and arguments.outputs is None:
        where = f"--stack-name {arguments.stack_name}"
        alarm_names: list[str] | None = stack_alarm_names(target.client("cloudformation"), arguments.stack_name)
    else:
        where = f"--outputs {arguments.outputs}"
        alarm_names = None  # A local stack's endpoint holds only its own alarms.
    clients = {service: target.client(service) for service in ("s3", "sqs", "dynamodb", "cloudwatch", "sns")}
    report = collect(
        clients,
        model_bucket=stack.model_bucket,
        results_table=stack.results_table,
        by_day_shards=stack.by_day_shards,
        queue_url=stack.queue_url,
        dlq_url=stack.dlq_url,
        alarm_names=alarm_names,
        redrive_command=f"pneumoscan redrive {where}",
        alarm_topic_arn=stack.alarm_topic_arn or None,
    )
    print_status(report, arguments.format)
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from infra.demo import run_demo

    return run_demo(SAMPLES, arguments.model, timeout_seconds=arguments.timeout)


def _soak(arguments: argparse.Namespace) -> int:
    from infra.soak import BurstReport, SoakReport, print_report, run_burst, run_soak

    logging.getLogger().setLevel(logging.WARNING)  # Thousands of per-image log lines would drown the figures.
    report: SoakReport | BurstReport
    if arguments.burst:
        cap = arguments.max_concurrency
        report = run_burst(
            SAMPLES, arguments.model, uploads=arguments.uploads, maximum_concurrency=cap, account_concurrency=cap
        )
    else:
        sample = SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg"
        report = run_soak(arguments.data, arguments.model, sample, uploads=arguments.uploads)
    print_report(report)
    return 0 if report.passed else 1


def _local_up(arguments: argparse.Namespace) -> int:
    from core.model_card import ModelArtifactError, read_card
    from infra.local_stack import LocalStack

    outputs_file: Path = arguments.outputs
    model: Path = arguments.model
    try:
        version = read_card(model)["version"]
    except (ModelArtifactError, KeyError):  # Only the hint below needs it; a bad folder fails in serve().
        version = "VERSION"

    def waiting_without_model(count: int) -> None:
        print(
            inert(
                f"{count} upload(s) waiting: no model is promoted, so they fail and are retried, then dead-lettered. "
                f"Serve one: pneumoscan publish --outputs {outputs_file} --model {model} && "
                f"pneumoscan promote --outputs {outputs_file} --version {version}"
            ),
            file=sys.stderr,
            flush=True,
        )

    with (
        _stopped_by_signals(),
        LocalStack(
            port=arguments.port,
            retry_delay_seconds=arguments.retry_delay,
            on_waiting_without_model=waiting_without_model,
        ) as stack,
    ):
        assert stack.outputs is not None
        print(stack.outputs.to_json())
        if arguments.no_model:
            print("no model promoted (--no-model): uploads wait until one is published and promoted")
        else:
            print(inert(f"serving model {stack.serve(model)} from {model}"))
        # The outputs file is written last: whoever waits for it to upload finds the model already promoted (an
        # upload before that fails and waits for its retry, minutes with the template's visibility timeout).
        outputs_file.write_text(stack.outputs.to_json() + "\n")
        print(inert(f"outputs written to {outputs_file}; scoring uploads until interrupted (Ctrl-C)"), flush=True)
        threading.Event().wait()
    return 0


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM interrupt the command (exit code 130), whatever it inherited: a shell starts a
    background job with SIGINT ignored, and Python then leaves it ignored. The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # Only the main thread may set handlers.
        yield
        return
    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in stopping}
    for number in stopping:
        signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which Python cannot set back.
                signal.signal(number, handler)


def _interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(number).name)


if __name__ == "__main__":
    sys.exit(main())
