"""Site calibration: Platt scaling on a site's films moves the intercept, the split keeps patients on one side, too
few films are refused in one line, and the new artifact serves sigmoid(logit / T + b) and is published and promoted
like any other."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.special import expit

from core.model_card import (
    EXPLAINER_FILE,
    GATE_FILE,
    MODEL_FILE,
    ModelArtifactError,
    ServingSpec,
    read_card,
    sha256_of,
    verify_artifact,
)
from core.model_registry import ModelRegistry
from pneumoscan.cli import main
from pneumoscan.status import expected_pneumonia_rate
from scoring.classifier import Classifier
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL
from tests.test_first_hour import pneumoscan
from training.calibration import fit_temperature, sigmoid
from training.data import LabelledFile, list_split, load_images, manifest_sha256, patient_id
from training.ledger import LEDGER_VARIABLE, read_ledger
from training.metrics import expected_calibration_error
from training.site_calibration import (
    SiteCalibrationError,
    check_both_classes,
    fit_platt,
    split_by_patient,
)

FILMS_PER_CLASS = 60
RESAMPLES = "200"


def _shifted(seed: int, count: int, temperature: float, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(true logit), and served logits whose calibrated P is sigmoid(logit / T + b)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.5, count)
    labels = (rng.random(count) < expit(true_logits)).astype(int)
    return labels, (true_logits - intercept) * temperature


def test_platt_recovers_a_known_shift_that_temperature_cannot() -> None:
    """Logits shifted and scaled are mapped back by Platt scaling (temperature and intercept recovered), while
    temperature scaling alone leaves a large calibration error."""
    labels, logits = _shifted(seed=0, count=20000, temperature=1.5, intercept=-2.0)
    platt = fit_platt(labels, logits)
    assert platt.temperature == pytest.approx(1.5, rel=0.05)
    assert platt.intercept == pytest.approx(-2.0, abs=0.1)
    assert expected_calibration_error(labels, platt.probabilities(logits)) < 0.02
    assert expected_calibration_error(labels, sigmoid(logits, fit_temperature(labels, logits))) > 0.05


def test_a_site_whose_labels_fall_with_the_logit_is_refused() -> None:
    """A fitted slope that is not positive would invert the model's ranking: it is refused, not served."""
    labels, logits = _shifted(seed=1, count=500, temperature=1.0, intercept=0.0)
    with pytest.raises(SiteCalibrationError, match="slope is not positive"):
        fit_platt(labels, -logits)


def _film_name(patient: str, index: int) -> str:
    """A file name of the Kaggle set's patterns for a patient's ``index``-th film."""
    return f"{patient}_bacteria_{index}.jpeg" if patient.startswith("person") else f"{patient}-{index:04d}.jpeg"


def _films(patients: dict[str, tuple[int, int]]) -> list[LabelledFile]:
    """Files of patients given as id -> (label, film count)."""
    files = [
        LabelledFile(path=Path(name), label=label, patient_id=patient_id(name))
        for patient, (label, count) in patients.items()
        for name in (_film_name(patient, index) for index in range(1, count + 1))
    ]
    assert {f.patient_id for f in files} == set(patients)
    return files


def test_the_patient_split_never_puts_one_patient_on_both_sides(data_root: Path) -> None:
    """Every film of a patient is on one side; each class's patients are halved (the fit part rounded up); the
    split does not depend on the order of the files; the real train split's patients stay on one side too."""
    rng = np.random.default_rng(2)
    patients = {f"IM-{number:04d}": (0, int(rng.integers(1, 4))) for number in range(1, 42)}
    patients |= {f"NORMAL2-IM-{number:04d}": (1, int(rng.integers(1, 6))) for number in range(1, 58)}
    files = _films(patients)
    fit, held_out = split_by_patient(files)
    fit_patients, held_patients = {f.patient_id for f in fit}, {f.patient_id for f in held_out}
    assert not fit_patients & held_patients
    assert len(fit) + len(held_out) == len(files)
    for label, total in ((0, 41), (1, 57)):
        assert len({p for p in fit_patients if patients[p][0] == label}) == math.ceil(total / 2)
    assert split_by_patient(files[::-1]) == (fit[::-1], held_out[::-1])
    real_fit, real_held_out = split_by_patient(list_split(data_root / "train"))
    assert not {f.patient_id for f in real_fit} & {f.patient_id for f in real_held_out}


def test_a_part_without_a_class_is_refused() -> None:
    """When all of a class's films come from one patient, one part lacks that class: refused, naming the class."""
    files = _films({"IM-0001": (0, 60), **{f"person{n}": (1, 2) for n in range(40)}})
    fit, held_out = split_by_patient(files)
    check_both_classes(fit, "fit")
    with pytest.raises(SiteCalibrationError, match="the held-out part has no NORMAL films"):
        check_both_classes(held_out, "held-out")


def _site(folder: Path, data_root: Path, per_class: int) -> Path:
    """A site folder of the first ``per_class`` TRAIN films of each class (never the test split)."""
    for name in ("NORMAL", "PNEUMONIA"):
        (folder / name).mkdir(parents=True)
        for source in sorted((data_root / "train" / name).iterdir())[:per_class]:
            shutil.copyfile(source, folder / name / source.name)
    return folder


def test_too_few_films_are_refused_in_one_line(data_root: Path, tmp_path: Path) -> None:
    """A site with fewer than --min-per-class films of a class: one line on stderr, exit code 5, no artifact."""
    site = _site(tmp_path / "site", data_root, per_class=10)
    output = tmp_path / "out"
    completed = pneumoscan(["calibrate", "--data", str(site), "--output", str(output)], tmp_path, timeout=120)
    assert completed.returncode == 5, completed.stderr
    assert completed.stderr.splitlines() == [
        "pneumoscan calibrate: the site has 10 NORMAL and 10 PNEUMONIA films; site calibration needs at least 50 of "
        "each; give --data the site's labelled films (NORMAL/ and PNEUMONIA/, at least --min-per-class of each "
        "class, from two or more patients each) and --output a new folder"
    ]
    assert completed.stdout == ""
    assert not output.exists()


@dataclass(frozen=True)
class CalibratedSite:
    site: Path
    artifact: Path
    printed: dict[str, Any]
    ledger: Path


@pytest.fixture(scope="module")
def calibrated(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> CalibratedSite:
    """``pneumoscan calibrate`` with the release model on 60 TRAIN films per class laid out as a data set's test
    split (``chest_xray/test`` beside a ``train``), so its scoring is recorded, in a ledger of this test's own."""
    root = tmp_path_factory.mktemp("site-data") / "chest_xray"
    (root / "train").mkdir(parents=True)
    site = _site(root / "test", data_root, FILMS_PER_CLASS)
    output = tmp_path_factory.mktemp("site-artifact") / "calibrated"
    ledger = root.parent / "ledger.jsonl"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv(LEDGER_VARIABLE, str(ledger))
        exit_code = main(["calibrate", "--data", str(site), "--output", str(output), "--resamples", RESAMPLES])
    assert exit_code == 0
    return CalibratedSite(site=site, artifact=output, printed=json.loads(printed.getvalue()), ledger=ledger)


def test_the_new_artifact_keeps_the_model_files_and_records_the_site(calibrated: CalibratedSite) -> None:
    """The new artifact verifies, its served files are the release's (same sha256), its version, derived_from and
    site_calibration section say what was done on which films, and the command printed the same."""
    spec = verify_artifact(calibrated.artifact)
    card, release = read_card(calibrated.artifact), read_card(RELEASE_MODEL)
    for name in (MODEL_FILE, EXPLAINER_FILE, GATE_FILE):
        assert sha256_of(calibrated.artifact / name) == sha256_of(RELEASE_MODEL / name)
    assert re.fullmatch(re.escape(release["version"]) + r"-site-\d{8}T\d{6}Z", spec.version)
    assert card["derived_from"]["version"] == release["version"]
    assert card["derived_from"]["model_sha256"] == release["model_sha256"]
    site = card["site_calibration"]
    files = list_split(calibrated.site)
    assert site["data_manifest_sha256"] == manifest_sha256({"site": files})
    assert site["official_test_split"] is True
    assert sum(sum(part.values()) for part in site["films"].values()) == 2 * FILMS_PER_CLASS
    assert spec.temperature == pytest.approx(1.0 / site["parameters"]["slope"])
    assert spec.intercept == site["parameters"]["intercept"] != 0.0
    assert spec.points.to_dict() == card["calibration"]["operating_points"]
    held_out = site["held_out"]
    assert held_out["site_calibrated"]["count"] == sum(site["films"]["held_out"].values())
    # Platt scaling is an increasing map of the logit: the films' order, so the AUC, is the shipped model's.
    assert held_out["site_calibrated"]["auc"]["value"] == pytest.approx(held_out["as_shipped"]["auc"]["value"])
    assert calibrated.printed["version"] == spec.version
    assert calibrated.printed["held_out"]["site_calibrated"]["auc"]["value"] == round(
        held_out["site_calibrated"]["auc"]["value"], 4
    )
    assert (calibrated.artifact / "report" / "site_calibration" / "reliability.png").is_file()


def test_the_new_artifact_serves_the_site_calibration(calibrated: CalibratedSite) -> None:
    """Served probabilities are sigmoid(logit / T + b) with the card's temperature and intercept, and differ from
    the release's on the same films."""
    release = Classifier.from_directory(RELEASE_MODEL)
    site_model = Classifier.from_directory(calibrated.artifact)
    images = load_images(list_split(calibrated.site)[::12], size=site_model.input_size).images
    logits = site_model.logits(images).astype(np.float64)
    spec = site_model.spec
    served = np.array([p.pneumonia_probability for p in site_model.predict(images)])
    np.testing.assert_allclose(served, np.round(expit(logits / spec.temperature + spec.intercept), 6), atol=1e-6)
    shipped = np.array([p.pneumonia_probability for p in release.predict(images)])
    assert np.abs(served - shipped).max() > 0.01
    labels = [p.label for p in site_model.predict(images)]
    assert labels == [spec.points.call(probability).label for probability in served]


def test_calibrating_the_test_split_is_recorded_in_the_holdout_ledger(calibrated: CalibratedSite) -> None:
    """A site folder that is a data set's test split is counted as a scoring of it, with the held-out figures."""
    (entry,) = read_ledger(calibrated.ledger)
    card = read_card(calibrated.artifact)
    assert entry.run == "pneumoscan calibrate"
    assert entry.version == card["version"]
    assert entry.count == 2 * FILMS_PER_CLASS
    assert entry.figures["auc"] == round(card["site_calibration"]["held_out"]["site_calibrated"]["auc"]["value"], 4)


def test_status_expects_the_sites_pneumonia_rate(calibrated: CalibratedSite) -> None:
    """The drift check of a site-calibrated model expects the share its held-out part called PNEUMONIA."""
    card = read_card(calibrated.artifact)
    matrix = card["site_calibration"]["held_out"]["site_calibrated"]["confusion_matrix"]
    called = matrix["true_positive"] + matrix["false_positive"]
    assert expected_pneumonia_rate(card) == pytest.approx(called / sum(matrix.values()))


def test_publish_and_promote_accept_a_site_calibrated_artifact(
    s3: Any, calibrated: CalibratedSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`calibrate --model s3://.../models/<version>/` reads a published release; `publish` and `promote` take the
    result over the release like any other artifact, and the promoted model downloads with its intercept."""
    release_version = read_card(RELEASE_MODEL)["version"]
    registry = ModelRegistry(s3, MODEL_BUCKET)
    registry.publish(RELEASE_MODEL)
    registry.promote(release_version)
    monkeypatch.setenv(LEDGER_VARIABLE, str(tmp_path / "ledger.jsonl"))
    output = tmp_path / "from-s3"
    model = f"s3://{MODEL_BUCKET}/models/{release_version}/"
    arguments = ["calibrate", "--model", model, "--data", str(calibrated.site), "--output", str(output)]
    assert main([*arguments, "--resamples", "10"]) == 0
    version = read_card(output)["version"]
    assert read_card(output)["derived_from"]["version"] == release_version
    assert main(["publish", "--bucket", MODEL_BUCKET, "--model", str(output)]) == 0
    assert main(["promote", "--bucket", MODEL_BUCKET, "--version", version]) == 0
    pointer, folder = registry.download_current(tmp_path / "cache")
    assert pointer.version == version
    assert verify_artifact(folder).intercept == read_card(output)["calibration"]["intercept"]


def test_a_card_without_an_intercept_serves_exactly_as_before() -> None:
    """Every existing card has intercept 0 and the scorer's probability is still sigmoid(logit / temperature)."""
    spec = verify_artifact(RELEASE_MODEL)
    assert spec.intercept == 0.0
    classifier = Classifier.from_directory(RELEASE_MODEL)
    for logit in (-40.0, -3.2, -1e-9, 0.0, 0.7, 5.5, 40.0):
        expected = round(float(expit(logit / spec.temperature)), 6)
        assert classifier.calibrate(logit).pneumonia_probability == expected


def test_a_card_with_a_non_finite_intercept_is_refused() -> None:
    """An intercept that is not a finite number is a malformed card, never served."""
    card = read_card(RELEASE_MODEL)
    for value in (float("nan"), float("inf"), "high"):
        card["calibration"]["intercept"] = value
        with pytest.raises(ModelArtifactError):
            ServingSpec.from_card(card)
