"""training/Dockerfile: reproducible and least-privileged. This machine cannot pull base images, so the build itself
is documented in the README, not tested; these tests read the Dockerfile, and `make lint` runs hadolint on it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
