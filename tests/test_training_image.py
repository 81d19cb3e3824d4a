"""training/Dockerfile: reproducible and least-privileged. This machine cannot pull base images, so the build itself
is documented in the README, not tested; these tests read the Dockerfile, and `make lint` runs hadolint on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY_ROOT

DOCKERFILE = REPOSITORY_ROOT / "training" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_base_image_is_pinned_by_digest() -> None:
    """Every FROM names its image by sha256 digest, not by a tag alone."""
    bases = [arguments for instruction, arguments in _instructions() if instruction == "FROM"]
    assert bases
    assert all(re.search(r"@sha256:[0-9a-f]{64}\b", base) for base in bases), bases


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    """The lock file is copied and the dependencies installed from it before any source folder is copied, so a code
    change does not reinstall TensorFlow; the project itself is then installed without dependencies."""
    instructions = _instructions()
    copies = [index for index, (instruction, _) in enumerate(instructions) if instruction == "COPY"]
    first_source = next(index for index in copies if "requirements.lock" not in instructions[index][1])
    installs = [index for index, (instruction, arguments) in enumerate(instructions) if "pip install" in arguments]
    assert instructions[copies[0]][1].split()[0] == "requirements.lock"
    assert "--requirement requirements.lock" in instructions[installs[0]][1] and installs[0] < first_source
    assert all("--no-deps" in instructions[index][1] for index in installs if index > first_source)


def test_the_job_runs_as_a_numeric_non_root_user() -> None:
    """The last USER is a numeric id other than 0, so the job (and a runAsNonRoot check) sees no root."""
    users = [arguments for instruction, arguments in _instructions() if instruction == "USER"]
    assert users
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0


def test_the_commit_build_argument_comes_after_every_run() -> None:
    """GIT_COMMIT is declared after the last RUN: a new commit does not invalidate the installed layers."""
    instructions = _instructions()
    argument = next(index for index, (instruction, arguments) in enumerate(instructions) if instruction == "ARG")
    assert all(instruction != "RUN" for instruction, _ in instructions[argument:])


def _pins(path: Path) -> dict[str, str]:
    """``name: version`` of every ``name==version`` line, names normalised as pip does."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_training_image_and_function_zip_pin_the_same_versions() -> None:
    """Every package the scoring function's zip pins (numpy and Pillow, which resize the films, above all) has the
    same version in the lock file the training image installs, and the lock pins every package of the scoring and
    training extras."""
    lock = _pins(REPOSITORY_ROOT / "requirements.lock")
    function_pins = _pins(REPOSITORY_ROOT / "functions" / "requirements.txt")
    function_pins |= _pins(REPOSITORY_ROOT / "functions" / "scoring" / "requirements.txt")
    assert {"numpy", "pillow"} <= set(function_pins)
    assert {name: lock.get(name) for name in function_pins} == function_pins
    extras = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in extras["scoring"] + extras["training"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]).lower()
        assert name in lock, requirement


JOB_USER = 10001
"""The image's ``USER``."""


def _run_entry_point(root: Path, home: Path, *, as_job_user: bool) -> subprocess.CompletedProcess[str]:
    """``pneumoscan train`` (the image's entry point) in a subprocess under the SageMaker layout at ``root``; as
    uid 10001 when ``as_job_user`` (the harness runs as root). The interpreter lives where uid 10001 may not
    reach (root's home), so the subprocess loads the entry point first, then drops to the job's user."""
    drop = f"os.setgroups([]); os.setgid({JOB_USER}); os.setuid({JOB_USER}); " if as_job_user else ""
    program = (
        "import os, sys; import pneumoscan.cli as cli, training.job; "
        f"{drop}sys.exit(cli.main(['train']))"  # The job's imports are loaded, so only /opt/ml is touched after.
    )
    environment = {
        **os.environ,
        "PYTHONPATH": f"{REPOSITORY_ROOT}:{REPOSITORY_ROOT / 'functions'}",
        "PNEUMOSCAN_SAGEMAKER_ROOT": str(root),
        "HOME": str(home),
    }
    # Inside the container the data come only from SageMaker's channels: PNEUMOSCAN_DATA (which make test exports)
    # would have the job train on the whole data set instead of failing on its empty channel.
    for name in ("SM_MODEL_DIR", "SM_CHANNEL_TRAIN", "SM_CHANNEL_TEST", "PNEUMOSCAN_DATA"):
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=environment, timeout=300, check=False
    )


@pytest.fixture
def sagemaker_layout() -> Iterator[tuple[Path, Path, bool]]:
    """A fake ``/opt/ml`` (hyper-parameters and an empty training channel, so a job that starts fails at once on
    its data), a home for the job's user, and whether the job runs as uid 10001 under root-owned folders (the
    harness is root) or as this user under folders it may not write (chmod)."""
    as_job_user = os.getuid() == 0 and hasattr(os, "setuid")
    base = Path(tempfile.mkdtemp(prefix="pneumoscan-opt-ml-"))
    base.chmod(0o755)  # The job's user must reach its folders, as SageMaker's /opt/ml is reachable.
    root, home = base / "opt-ml", base / "home"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "data" / "train" / "NORMAL").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"epochs": "1", "image_size": "64"}))
    for folder in (root / "model", root / "output", home):
        folder.mkdir()
    for folder in (root, *root.rglob("*")):
        folder.chmod(0o755)
    if as_job_user:
        os.chown(home, JOB_USER, JOB_USER)
    try:
        yield root, home, as_job_user
    finally:
        for folder in (root / "model", root / "output"):
            folder.chmod(0o755)
        shutil.rmtree(base)


def _make_unwritable(folder: Path, as_job_user: bool) -> None:
    """Root-owned (as SageMaker may create it) when the job runs as uid 10001; else read-only to this user."""
    if not as_job_user:
        folder.chmod(0o555)


def _hand_to_job_user(folder: Path, as_job_user: bool) -> None:
    """Owned by the job's user, as when SageMaker hands the folders to the image's ``USER``."""
    if as_job_user:
        os.chown(folder, JOB_USER, JOB_USER)


def test_root_owned_mount_points_fail_the_job_loudly_before_training(
    sagemaker_layout: tuple[Path, Path, bool],
) -> None:
    """With /opt/ml/model and /opt/ml/output root-owned, the entry point stops before training, exit code 5, and
    stderr says both what failed (the artifact's folder) and that the failure file could not be written either."""
    root, home, as_job_user = sagemaker_layout
    for folder in (root / "model", root / "output"):
        _make_unwritable(folder, as_job_user)
    finished = _run_entry_point(root, home, as_job_user=as_job_user)
    assert finished.returncode == 5, finished.stderr
    assert f"cannot write {root / 'model'}" in finished.stderr
    assert f"could not be written to {root / 'output' / 'failure'}" in finished.stderr
    assert "NORMAL holds no" not in finished.stderr  # It never reached the data, let alone training.
    assert not (root / "output" / "failure").exists()


def test_a_root_owned_model_folder_leaves_the_reason_in_the_failure_file(
    sagemaker_layout: tuple[Path, Path, bool],
) -> None:
    """With only /opt/ml/model root-owned, the job stops before training and the failure file names the folder."""
    root, home, as_job_user = sagemaker_layout
    _make_unwritable(root / "model", as_job_user)
    _hand_to_job_user(root / "output", as_job_user)
    finished = _run_entry_point(root, home, as_job_user=as_job_user)
    assert finished.returncode == 5, finished.stderr
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith(f"OutputNotWritableError: cannot write {root / 'model'}")
    assert "NORMAL holds no" not in failure


def test_folders_handed_to_the_job_user_are_written(sagemaker_layout: tuple[Path, Path, bool]) -> None:
    """When SageMaker hands /opt/ml/model and /opt/ml/output to the image's user, the job goes on to read its data
    (here an empty channel, so it fails) and writes that reason to the failure file as uid 10001."""
    root, home, as_job_user = sagemaker_layout
    for folder in (root / "model", root / "output"):
        _hand_to_job_user(folder, as_job_user)
    finished = _run_entry_point(root, home, as_job_user=as_job_user)
    assert finished.returncode != 0
    failure_file = root / "output" / "failure"
    assert "DataLayoutError" in failure_file.read_text()
    if as_job_user:
        assert failure_file.stat().st_uid == JOB_USER
