"""The user's mistakes end in one line on stderr naming the problem and the fix, with the README's exit code; the
traceback only with --debug or PNEUMOSCAN_DEBUG=1."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from core.model_registry import NoCurrentModelError, RegistryError
from pneumoscan import day_shards
from pneumoscan.errors import ExitCode, UsageError, describe
from tests.conftest import SAMPLES
from tests.test_first_hour import pneumoscan

FILM = str(SAMPLES / "NORMAL" / "IM-0001-0001.jpeg")


@pytest.mark.parametrize(
    ("arguments", "exit_code", "words"),
    [
        (["score", "--model", "/tmp", FILM], ExitCode.INVALID_INPUT, "give --model an artifact folder"),
        (["results", "--outputs", "missing.json", "KEY"], ExitCode.MISSING_FILE, "missing.json"),
        (["train", "--data", "/nonexistent"], ExitCode.MISSING_FILE, "give --data"),
        (["train", "--data", ".", "--quantization", "int4"], ExitCode.INVALID_INPUT, "quantization must be one of"),
        (["train", "--data", ".", "--fine-tuned-model", "gone.keras"], ExitCode.MISSING_FILE, "gone.keras"),
        (["requantize", "--keras", "k", "--data", "/none", "--output", "o"], ExitCode.MISSING_FILE, "give --data"),
        (["results", "--outputs", "x.json"], ExitCode.USAGE, "give either KEY"),
    ],
)
def test_a_mistake_is_one_line_on_stderr_with_its_exit_code(
    arguments: list[str], exit_code: ExitCode, words: str, tmp_path: Path
) -> None:
    """A wrong model folder, a missing outputs file, a missing data set (training's or requantize's), a hyper-parameter
    out of range or a missing fine-tuned teacher: one line, no traceback, the documented code."""
    (tmp_path / "x.json").write_text("{}")
    completed = pneumoscan([*arguments], tmp_path, timeout=120)
    assert completed.returncode == exit_code, completed.stderr
    assert len(completed.stderr.splitlines()) == 1, completed.stderr
    assert completed.stderr.startswith(f"pneumoscan {arguments[0]}: ")
    assert words in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


@pytest.mark.parametrize("debug", [["--debug"], ["PNEUMOSCAN_DEBUG=1"]])
def test_debug_shows_the_traceback(debug: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--debug` (after the subcommand too) or PNEUMOSCAN_DEBUG=1 shows the traceback rather than the line."""
    arguments = ["score", "--model", "/tmp", FILM]
    if debug == ["--debug"]:
        arguments.insert(1, "--debug")
    else:
        monkeypatch.setenv("PNEUMOSCAN_DEBUG", "1")
    completed = pneumoscan(arguments, tmp_path, timeout=120)
    assert completed.returncode != 0
    assert "Traceback" in completed.stderr
    assert "ModelArtifactError" in completed.stderr


def _wrapped(cause: BaseException) -> RegistryError:
    """A registry error raised from ``cause``, as the registry raises them."""
    try:
        raise RegistryError("cannot upload in s3://bucket: " + str(cause)) from cause
    except RegistryError as error:
        return error


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (_wrapped(NoCredentialsError()), ExitCode.AWS_CREDENTIALS),
        (_client_error("InvalidClientTokenId"), ExitCode.AWS_CREDENTIALS),
        (_wrapped(_client_error("AccessDenied")), ExitCode.AWS_ACCESS_DENIED),
        (_wrapped(_client_error("NoSuchBucket")), ExitCode.AWS_NO_SUCH_RESOURCE),
        (_client_error("ResourceNotFoundException"), ExitCode.AWS_NO_SUCH_RESOURCE),
        (_wrapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")), ExitCode.AWS_UNREACHABLE),
        (_client_error("InternalError"), ExitCode.AWS_OTHER),
        (NoCurrentModelError("s3://bucket/models/current.json does not exist"), ExitCode.INVALID_INPUT),
        (FileNotFoundError(2, "No such file or directory", "stack.json"), ExitCode.MISSING_FILE),
        (UsageError("name the stack with --stack-name or --outputs"), ExitCode.USAGE),
    ],
)
def test_aws_and_project_errors_have_distinct_codes_and_one_line(error: BaseException, exit_code: ExitCode) -> None:
    """Credentials, access denied, no such resource, unreachable endpoint, the project's and the user's own errors:
    each its own code, one line naming a fix."""
    failure = describe(error, "publish")
    assert failure is not None
    assert failure.exit_code == exit_code
    assert "\n" not in failure.line
    assert failure.line.startswith("pneumoscan publish: ")


def test_a_bug_is_not_disguised() -> None:
    """An error the user cannot fix (a bug) is not turned into a line: main re-raises it with its traceback."""
    assert describe(ZeroDivisionError("division by zero"), "score") is None
    assert describe(KeyError("label"), "score") is None
    labels: dict[str, str] = {}
    with pytest.raises(KeyError) as raised:
        try:
            raise _client_error("AccessDenied")
        except ClientError:
            labels["label"]  # A bug while handling an AWS error.
    assert describe(raised.value, "score") is None


def test_the_day_shard_migration_reports_a_mistake_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m pneumoscan.day_shards`` ends a mistake (an outputs file that is not there) in one line on stderr
    with the README's exit code, as the pneumoscan command does."""
    assert day_shards.main(["--outputs", "/nonexistent/outputs.json"]) == ExitCode.MISSING_FILE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pneumoscan day_shards: ") and "/nonexistent/outputs.json" in line
