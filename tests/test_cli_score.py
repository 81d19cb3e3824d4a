"""`pneumoscan score`: one JSON line per file; a bad file gets an error line and the rest are still scored.

The artifact is the release model with a film-condition head (the whole screening stage), not the smoke run's: a
model trained for one epoch at 64 px has a head too weak to be sure of keeping every sample film."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumoscan.cli import main
from scoring.litert import INFERENCE_BATCH

pytestmark = pytest.mark.slow


def test_score_prints_one_line_per_image(
    screened_release: Path, sample_paths: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each image gets path, label, confidence, pneumonia_probability, the operating points and model_version; the
    label agrees with its number."""
    assert main(["score", "--model", str(screened_release), *map(str, sample_paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in sample_paths]
    for line in lines:
        assert set(line) == {
            "path",
            "label",
            "confidence",
            "pneumonia_probability",
            "normal_below",
            "pneumonia_from",
            "model_version",
        }
        assert line["label"] in {"NORMAL", "INDETERMINATE", "PNEUMONIA"}
        assert line["confidence"] >= 0.5


def test_bad_files_get_error_lines_and_the_rest_are_scored(
    screened_release: Path, sample_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Corrupt, empty and missing files each get an error line; good files around them are scored."""
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpeg"
    paths = [sample_paths[0], corrupt, empty, missing, sample_paths[-1]]
    assert main(["score", "--model", str(screened_release), *map(str, paths)]) == 1
    lines = {json.loads(line)["path"]: json.loads(line) for line in capsys.readouterr().out.splitlines()}
    assert lines[str(corrupt)]["reason"] == "CORRUPT_IMAGE"
    assert lines[str(empty)]["reason"] == "EMPTY_FILE"
    assert "cannot read file" in lines[str(missing)]["error"]
    assert lines[str(sample_paths[0])]["label"] in {"NORMAL", "INDETERMINATE", "PNEUMONIA"}
    assert lines[str(sample_paths[-1])]["label"] in {"NORMAL", "INDETERMINATE", "PNEUMONIA"}


def test_many_files_are_printed_in_order_across_slices(
    screened_release: Path, sample_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """More files than one inference slice holds, unreadable and corrupt ones among them, still get one line each
    in the order named, and each film's line is the one it gets when scored alone."""
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = tmp_path / "missing.jpeg"
    paths = [*sample_paths, missing, *reversed(sample_paths), corrupt, sample_paths[0], missing]
    assert len(paths) > 2 * INFERENCE_BATCH
    assert main(["score", "--model", str(screened_release), *map(str, paths)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [str(path) for path in paths]
    for path in sample_paths:
        assert main(["score", "--model", str(screened_release), str(path)]) == 0
        [alone] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert all(line == alone for line in lines if line["path"] == str(path))
    assert "cannot read file" in lines[len(sample_paths)]["error"]
    assert lines[-3]["reason"] == "CORRUPT_IMAGE"
