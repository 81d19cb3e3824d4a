"""A newcomer's first hour on a machine with no AWS configuration: a quiet demo, the README's local-stack recipe, and
one-line errors for the usual mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.native_output import LineFilter
from tests.conftest import REPOSITORY_ROOT

LITERT_NOISE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"


def fresh_environment(home: Path) -> dict[str, str]:
    """This process's environment as a machine with no AWS configuration has it: no AWS_* variable, an empty HOME."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    environment["HOME"] = str(home)
    return environment


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
