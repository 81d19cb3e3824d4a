"""The training job's entry point, honouring SageMaker's training-container contract.

Inside SageMaker the data channels arrive under ``/opt/ml/input/data/{train,test}`` (``SM_CHANNEL_*``), the
hyper-parameters in ``/opt/ml/input/config/hyperparameters.json`` and the artifact goes to ``SM_MODEL_DIR``; a
failure's reason is written to ``/opt/ml/output/failure``. Run by hand, ``--data`` and ``--output`` take local
folders or ``s3://`` prefixes instead.

The image runs as uid 10001, and SageMaker creates ``/opt/ml/model`` and ``/opt/ml/output`` itself (root-owned when
it does not hand them to the image's user; README, "The training container"). So before training the job checks
that it can write both its artifact's folder and the failure file's, and stops at once, loudly, when it cannot:
hours of training must never end in an artifact that cannot be written. A failure file that cannot be written is
reported on stderr and raised, never swallowed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from core.s3 import S3Location
from training.config import TrainingConfig, read_hyperparameters
from training.search import SearchSettings, run_search
from training.train import DataSplits, train_and_export

logger = logging.getLogger(__name__)


class OutputNotWritableError(PermissionError):
    """A folder the job must write (its artifact's, or SageMaker's failure file's) cannot be written by its user."""


class FailureFileError(OSError):
    """The job failed, and the reason could not be written to SageMaker's failure file either."""


SAGEMAKER_ROOT = Path("/opt/ml")


@dataclass(frozen=True)
class JobEnvironment:
    """Paths of the SageMaker contract, read once from the environment."""

    train_channel: Path
    test_channel: Path
    model_dir: Path
    hyperparameters_file: Path
    failure_file: Path

    @classmethod
    def from_environment(cls) -> JobEnvironment:
        root = Path(os.environ.get("PNEUMOSCAN_SAGEMAKER_ROOT", str(SAGEMAKER_ROOT)))
        return cls(
            train_channel=Path(os.environ.get("SM_CHANNEL_TRAIN", str(root / "input/data/train"))),
            test_channel=Path(os.environ.get("SM_CHANNEL_TEST", str(root / "input/data/test"))),
            model_dir=Path(os.environ.get("SM_MODEL_DIR", str(root / "model"))),
            hyperparameters_file=root / "input/config/hyperparameters.json",
            failure_file=root / "output/failure",
        )


def run_job(
    data: str | None,
    output: str | None,
    flag_overrides: dict[str, Any],
    *,
    search: SearchSettings | None = None,
    search_results: Path | None = None,
) -> dict[str, Any]:
    """Resolve inputs, outputs and hyper-parameters, train, and write the failure file if anything breaks.

    With ``search``, the recipe search runs first and its winner's values are trained; with ``search_results``,
    the winner of an earlier search (its ``search.json``) is. Either way the trials are recorded in the card."""
    environment = JobEnvironment.from_environment()
    output_target = output or str(environment.model_dir)
    check_writable(environment, None if output_target.startswith("s3://") else Path(output_target))
    try:
        overrides = {**read_hyperparameters(environment.hyperparameters_file), **flag_overrides}
        config = TrainingConfig().with_overrides(overrides)
        with tempfile.TemporaryDirectory(prefix="pneumoscan-") as scratch:
            splits = resolve_data(data, environment, Path(scratch) / "data")
            report: dict[str, Any] | None = None
            if search is not None:
                report = run_search(splits.train_dir, config, search, Path(scratch) / "search").to_dict()
            elif search_results is not None:
                report = json.loads(search_results.read_text())
            if report is not None:
                config = config.with_overrides(report["best"])
            if output_target.startswith("s3://"):
                local_output = Path(scratch) / "artifact"
                card = train_and_export(splits, local_output, config, search=report)
                upload_folder(local_output, S3Location.parse(output_target))
            else:
                card = train_and_export(splits, Path(output_target), config, search=report)
    except Exception as error:
        # Any failure, whatever its type, must reach SageMaker's failure file before the job exits non-zero.
        write_failure(environment.failure_file, error)
        raise
    return card


def resolve_data(data: str | None, environment: JobEnvironment, scratch: Path) -> DataSplits:
    """The train and test folders: from ``--data`` (a folder or s3:// prefix) or from SageMaker's channels."""
    if data is None:
        return DataSplits(train_dir=environment.train_channel, test_dir=environment.test_channel)
    if data.startswith("s3://"):
        download_prefix(S3Location.parse(data), scratch)
        root = scratch
    else:
        root = Path(data)
    return DataSplits(train_dir=root / "train", test_dir=root / "test")


def download_prefix(location: S3Location, destination: Path, s3_client: Any = None) -> int:
    """Copy every object under an S3 prefix into ``destination``, keeping relative paths."""
    s3 = s3_client or boto3.client("s3")
    prefix = location.prefix.rstrip("/") + "/" if location.prefix else ""
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :]
            if not relative or relative.endswith("/"):
                continue
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(location.bucket, item["Key"], str(target))
            count += 1
    logger.info("downloaded %d objects from s3://%s/%s", count, location.bucket, prefix)
    return count


def upload_folder(folder: Path, location: S3Location, s3_client: Any = None) -> int:
    """Copy every file under ``folder`` to the S3 prefix, keeping relative paths."""
    s3 = s3_client or boto3.client("s3")
    prefix = location.prefix.rstrip("/") + "/" if location.prefix else ""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        s3.upload_file(str(path), location.bucket, prefix + path.relative_to(folder).as_posix())
    return len(files)


def check_writable(environment: JobEnvironment, artifact_dir: Path | None) -> None:
    """Stop before training when the artifact's folder (a local one) or, inside a SageMaker container, the failure
    file's folder cannot be written: ``OutputNotWritableError`` names the folder, its owner and the job's user
    (``pneumoscan train`` prints it on stderr and exits with code 5)."""
    folders = [] if artifact_dir is None else [artifact_dir]
    if _in_sagemaker_layout(environment.failure_file):
        folders.append(environment.failure_file.parent)
    for folder in folders:
        problem = _unwritable(folder)
        if problem is None:
            continue
        error = OutputNotWritableError(f"cannot write {folder} as uid {os.getuid()}: {problem}")
        if folder != environment.failure_file.parent:
            write_failure(environment.failure_file, error)
        raise error


def _unwritable(folder: Path) -> str | None:
    """Why this process cannot create files in ``folder``, or None when it can. Folders it creates to find out are
    removed again: a job that then fails leaves no empty output folder behind."""
    created = [candidate for candidate in (folder, *folder.parents) if not candidate.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pneumoscan-probe-"):
            pass
        for candidate in created:  # Innermost first.
            candidate.rmdir()
    except OSError as error:
        owner = _owner(folder)
        return f"{error.strerror or error}" + (f" (the folder is owned by uid {owner})" if owner is not None else "")
    return None


def _owner(path: Path) -> int | None:
    """The uid owning ``path`` or its nearest existing parent."""
    for candidate in (path, *path.parents):
        try:
            return candidate.stat().st_uid
        except OSError:
            continue
    return None


def _in_sagemaker_layout(failure_file: Path) -> bool:
    """Whether the job runs under SageMaker's folders: outside a SageMaker container (no /opt/ml) there is no
    failure file to write."""
    return failure_file.parent.parent.is_dir()


def write_failure(failure_file: Path, error: BaseException) -> None:
    """Leave the reason where SageMaker shows it; outside a SageMaker container (no /opt/ml) there is none. When it
    cannot be written, stderr says so beside the reason, and ``FailureFileError`` is raised (from the write's
    error; the job's own error stays its context)."""
    if not _in_sagemaker_layout(failure_file):
        return
    reason = f"{type(error).__name__}: {error}"
    try:
        failure_file.parent.mkdir(parents=True, exist_ok=True)
        failure_file.write_text(f"{reason}\n\n{''.join(traceback.format_exception(error))}")
    except OSError as write_error:
        print(
            f"pneumoscan train: the job failed ({reason}), and its reason could not be written to {failure_file}: "
            f"{write_error}",
            file=sys.stderr,
            flush=True,
        )
        raise FailureFileError(f"could not write the failure reason to {failure_file}: {write_error}") from write_error
