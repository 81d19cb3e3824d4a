"""A newcomer's first hour on a machine with no AWS configuration: a quiet demo, the README's local-stack recipe, and
one-line errors for the usual mistakes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pneumoscan.native_output import LineFilter
from pneumoscan.stack import StackTarget, is_loopback
from tests.conftest import REPOSITORY_ROOT, SAMPLES, stop_server

LITERT_NOISE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"


INFRA_BIN = REPOSITORY_ROOT / ".venv-infra" / "bin"
"""Where `make test` installs SAM CLI, cfn-lint, checkov and the AWS CLI."""


def fresh_environment(home: Path) -> dict[str, str]:
    """This process's environment as a machine with no AWS configuration has it: no AWS_* variable, an empty HOME."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    environment["HOME"] = str(home)
    # The README's commands as a user's shell finds them: this environment's `pneumoscan` first, then the AWS CLI
    # that `make test` installs with the infrastructure tools.
    search_path = [str(Path(sys.executable).parent), str(INFRA_BIN), environment.get("PATH", "")]
    environment["PATH"] = os.pathsep.join(search_path)
    return environment


def readme_local_stack_recipe(port: int) -> list[str]:
    """The README's local-stack recipe, line by line, on ``port`` rather than 5000 (another test may hold it)."""
    text = (REPOSITORY_ROOT / "README.md").read_text()
    block = text[text.index("```sh\npneumoscan local up") + len("```sh\n") :]
    lines = block[: block.index("```")].strip().splitlines()
    return [line.replace("5000", str(port)) for line in lines]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def pneumoscan(arguments: list[str], home: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The ``pneumoscan`` command, run as a program (so it owns its standard error) in a fresh environment."""
    return subprocess.run(  # The interpreter running the tests, on arguments built here.
        [sys.executable, "-m", "pneumoscan.cli", *arguments],
        cwd=REPOSITORY_ROOT,
        env=fresh_environment(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_line_filter_drops_litert_noise_and_passes_everything_else_at_once() -> None:
    """Noise lines vanish even when split across writes; other text, partial lines included, is not held back."""
    line_filter = LineFilter()
    assert line_filter.feed(b"first\nIN") == b"first\n"
    assert line_filter.feed(LITERT_NOISE[2:]) == b""
    assert line_filter.feed(b"progress 10%\r") == b"progress 10%\r"
    assert line_filter.feed(b"progress 20%\r\n" + LITERT_NOISE + b"INFO: other\n") == b"progress 20%\r\nINFO: other\n"
    assert line_filter.feed(LITERT_NOISE.rstrip(b"\n")) == b""
    assert line_filter.flush() == b""


@pytest.mark.slow
def test_demo_prints_no_warning_and_no_info_line(tmp_path: Path) -> None:
    """`pneumoscan demo` on a machine with no AWS configuration scores every sample and prints no warning (Powertools)
    and no ``INFO:`` line (LiteRT's native output) on either stream."""
    completed = pneumoscan(["demo"], tmp_path)
    assert completed.returncode == 0, completed.stderr
    lines = (completed.stdout + completed.stderr).splitlines()
    assert "10 scored, 0 rejected, 0 missing" in completed.stdout
    assert [line for line in lines if "Warning" in line or line.startswith("INFO:")] == []
    assert completed.stderr == ""


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("aws", path=f"{INFRA_BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None,
    reason="the README's recipe uploads with the AWS CLI, which `make test` installs in .venv-infra",
)
def test_readme_local_stack_recipe_works_line_by_line_with_no_aws_configuration(tmp_path: Path) -> None:
    """Each line of the README's local-stack recipe, run as written in a shell with no AWS variables and an empty
    HOME, succeeds without a traceback, the CLI says once that it uses dummy credentials, and the film is scored;
    `local up` prints no warning and no ``INFO:`` line while it scores."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / "models").symlink_to(REPOSITORY_ROOT / "models")
    shutil.copy(SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg", work / "film.jpeg")
    up, *steps, results = readme_local_stack_recipe(free_port())
    environment = fresh_environment(home)

    def shell(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # The README's own line, in bash as a user would type it.
            ["bash", "-c", line], cwd=work, env=environment, capture_output=True, text=True, timeout=120, check=False
        )

    # The server writes to files, not pipes: a pipe nobody reads fills up and would stop the server mid-write.
    server_output, server_errors = tmp_path / "server.out", tmp_path / "server.err"
    with server_output.open("wb") as output, server_errors.open("wb") as errors:
        server = subprocess.Popen(  # The README's first line, run as written until interrupted.
            ["bash", "-c", f"exec {up}"], cwd=work, env=environment, stdout=output, stderr=errors
        )
    try:
        # Generous bounds, so that a loaded machine is not a failure; a stack that never answers still is.
        deadline = time.monotonic() + 180
        while not (work / "local-stack.json").exists():
            assert server.poll() is None, server_errors.read_text()
            assert time.monotonic() < deadline, f"no local-stack.json within 180 s: {server_errors.read_text()}"
            time.sleep(0.2)
        for line in steps:
            completed = shell(line)
            assert completed.returncode == 0, (line, completed.stderr)
            assert "Traceback" not in completed.stderr
        deadline = time.monotonic() + 300
        while (completed := shell(results)).returncode != 0:
            assert "Traceback" not in completed.stderr
            assert time.monotonic() < deadline, (
                f"no result within 300 s: {completed.stdout} {completed.stderr} {server_errors.read_text()}"
            )
            time.sleep(0.5)
        assert "SCORED" in completed.stdout
        assert completed.stderr.count("dummy AWS credentials") == 1, completed.stderr
        assert len(completed.stderr.splitlines()) == 1
    finally:
        stop_server(server)
    assert server.returncode in {0, 130}
    noise = [line for line in server_errors.read_text().splitlines() if "Warning" in line or line.startswith("INFO:")]
    assert noise == []


@pytest.mark.parametrize(
    ("endpoint_url", "local"),
    [
        ("http://127.0.0.1:5000", True),
        ("http://localhost:4566", True),
        ("http://[::1]:5000", True),
        ("https://s3.eu-west-1.amazonaws.com", False),
        ("http://10.0.0.5:5000", False),
        (None, False),
    ],
)
def test_a_loopback_endpoint_is_a_local_target(endpoint_url: str | None, local: bool) -> None:
    """Only an endpoint on this machine gets dummy credentials; a remote one uses the caller's AWS configuration."""
    target = StackTarget.resolve(stack_name=None, outputs_file=None, endpoint_url=endpoint_url)
    assert is_loopback(endpoint_url) is local
    assert target.local is local


def test_a_local_target_signs_with_dummy_credentials_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no AWS variables and an empty HOME, a loopback target's clients still have credentials and a region."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("pneumoscan.stack._noticed", set())
    target = StackTarget.resolve(stack_name=None, outputs_file=None, endpoint_url="http://127.0.0.1:1")
    clients = [target.client("s3"), target.client("sqs")]
    assert all(client._request_signer._credentials.access_key == "local" for client in clients)
    assert {client.meta.region_name for client in clients} == {"us-east-1"}
    assert capsys.readouterr().err.count("dummy AWS credentials") == 1


@pytest.mark.slow
def test_local_up_without_a_model_says_so_for_every_poll_that_finds_uploads(tmp_path: Path) -> None:
    """`local up --no-model`: an upload is not left waiting silently; stderr gets one line for the batch, naming the
    publish and promote commands that fix it. By default `local up` serves the release model."""
    outputs_file = tmp_path / "stack.json"
    process = subprocess.Popen(  # The interpreter running the tests, on arguments built here.
        [sys.executable, "-m", "pneumoscan.cli", "local", "up", "--port", "0", "--outputs", str(outputs_file),
         "--no-model"],
        cwd=REPOSITORY_ROOT,
        env=fresh_environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not outputs_file.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no outputs file within 60 s"
            time.sleep(0.2)
        target = StackTarget.resolve(stack_name=None, outputs_file=outputs_file, endpoint_url=None)
        assert target.outputs is not None
        s3, sqs = target.client("s3"), target.client("sqs")
        for name in ("a.jpeg", "b.jpeg"):
            body = (SAMPLES / "NORMAL" / "IM-0001-0001.jpeg").read_bytes()
            s3.put_object(Bucket=target.outputs.input_bucket, Key=f"incoming/{name}", Body=body)
            deadline = time.monotonic() + 30
            while _in_flight(sqs, target.outputs.queue_url) < 1 + (name == "b.jpeg"):
                assert time.monotonic() < deadline, "the upload was not delivered within 30 s"
                time.sleep(0.2)
    finally:
        stdout, stderr = stop_server(process)
    notices = [line for line in stderr.splitlines() if "no model is promoted" in line]
    assert len(notices) == 2, stderr
    assert all(line.startswith("1 upload(s) waiting") for line in notices)
    assert all(f"pneumoscan publish --outputs {outputs_file}" in line for line in notices)
    assert all(f"pneumoscan promote --outputs {outputs_file} --version " in line for line in notices)
    assert "no model promoted (--no-model)" in stdout


def _in_flight(sqs: Any, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessagesNotVisible"])
