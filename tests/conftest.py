"""Shared fixtures: the real data set, the sample X-rays and generated image files of every kind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from moto import mock_aws
from PIL import Image

from core.model_card import CARD_FILE, EXPLAINER_FILE, GATE_FILE, MODEL_FILE, SCREENING_FILE, read_card, write_card
from infra.corpus import encode as encode_image

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPOSITORY_ROOT / "samples"
RELEASE_MODEL = REPOSITORY_ROOT / "models" / "release"


def pytest_configure(config: pytest.Config) -> None:
    """Smoke runs score (a few films of) the test split: they record it in a ledger of the test session, never in
    the repository's holdout ledger. Set for the whole session, so CLI subprocesses inherit it."""
    del config
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"pneumoscan-test-ledger-{os.getpid()}.jsonl"
    os.environ["PNEUMOSCAN_HOLDOUT_LEDGER"] = str(scratch)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The chest_xray folder: $PNEUMOSCAN_DATA, else ../shared/data/chest_xray beside the repository."""
    root = Path(os.environ.get("PNEUMOSCAN_DATA", REPOSITORY_ROOT.parent / "shared" / "data" / "chest_xray"))
    if not (root / "train" / "NORMAL").is_dir():
        pytest.fail(f"the chest X-ray data set is not at {root}; set PNEUMOSCAN_DATA")
    return root


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    """The repository's sample X-rays, NORMAL ones first."""
    return sorted(SAMPLES.glob("*/*.jpeg"))


@pytest.fixture(scope="session")
def sample_xray() -> Image.Image:
    """One real X-ray as a grayscale Pillow image."""
    return Image.open(SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg").convert("L")


@pytest.fixture
def encode() -> Callable[..., bytes]:
    """Encode a Pillow image to bytes in a given format."""
    return encode_image


def stop_server(
    process: subprocess.Popen[Any], stop_signal: int = signal.SIGINT, seconds: float = 30
) -> tuple[Any, Any]:
    """Send a server a test started ``stop_signal`` and return what it printed (stdout, stderr). One still running
    ``seconds`` later is killed, so it cannot outlive its test (a leaked child fails later tests), and the test
    fails."""
    process.send_signal(stop_signal)
    try:
        return process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"the server did not stop within {seconds} s of {signal.Signals(stop_signal).name}")


def copy_artifact(artifact: Path, destination: Path, version: str, test_auc: float | None = None) -> Path:
    """A copy of a model artifact under another version (and test AUC, when given): a stand-in for a newly trained
    model."""
    shutil.copytree(artifact, destination)
    card = read_card(destination)
    card["version"] = version
    if test_auc is not None:
        card["metrics"]["test"]["auc"]["value"] = test_auc
    write_card(destination, card)
    return destination


def release_copy(destination: Path) -> Path:
    """The release artifact's served files (model, card, explainer, input gate, screening head when it has one; no
    report) in a folder that a test may change."""
    destination.mkdir()
    for name in (MODEL_FILE, CARD_FILE, EXPLAINER_FILE, GATE_FILE, SCREENING_FILE):
        if (RELEASE_MODEL / name).is_file():
            shutil.copyfile(RELEASE_MODEL / name, destination / name)
    return destination


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A grayscale image of random pixels, for tests that need no real X-ray."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return Image.fromarray(pixels, mode="L")


SMOKE_HYPERPARAMETERS = {
    "image_size": 64,
    "epochs": 1,
    "head_epochs": 2,
    "batch_size": 16,
    "limit_per_class": 40,
    "bootstrap_resamples": 50,
    "patience": 2,
    "student_image_size": 64,
    "student_epochs": 2,
    "quantization": "float32",
}
"""A tiny but real run of the release recipe: the ImageNet-pretrained teacher fine-tuned on real X-rays and the
compact student distilled from it, real TensorFlow, real export; about a minute on two cores."""


@dataclass(frozen=True)
class SmokeRun:
    """The smoke training run of ``pneumoscan train``: its artifact folder and what it printed."""

    artifact: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def smoke_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """``pneumoscan train`` run as a user runs it, in its own process, on a few real X-rays."""
    output = tmp_path_factory.mktemp("smoke-artifact")
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMOKE_HYPERPARAMETERS.items()]
    command = [sys.executable, "-m", "pneumoscan.cli", "train", "--data", str(data_root), "--output", str(output)]
    completed = subprocess.run(  # The interpreter running the tests, on arguments built here.
        [*command, *flags], capture_output=True, text=True, check=False, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return SmokeRun(artifact=output, stdout=completed.stdout, stderr=completed.stderr)


@pytest.fixture(scope="session")
def smoke_artifact(smoke_run: SmokeRun) -> Path:
    """An artifact folder produced by the real training job on a few real X-rays."""
    return smoke_run.artifact


@pytest.fixture(scope="session")
def screened_release(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release model given a film-condition head by ``attach-screening``'s code, fitted on variants of a sample
    of 300 fit films and measured on 120 validation films (a release fits on 1,500 and measures on all 750)."""
    from training.attach_screening import attach_screening  # noqa: PLC0415  # TensorFlow only for tests that use it.

    folder = tmp_path_factory.mktemp("screened-release")
    # The committed release has its head already: the test gives a copy without it a new one.
    unscreened = release_copy(folder / "unscreened")
    card = read_card(unscreened)
    card.pop("screening", None)
    (unscreened / SCREENING_FILE).unlink(missing_ok=True)
    write_card(unscreened, card)
    output = folder / "artifact"
    attach_screening(unscreened, data_root, output, fit_films=300, validation_films=120)
    return output


MODEL_BUCKET = "pneumoscan-models-test"


@pytest.fixture
def s3() -> Iterator[Any]:
    """An S3 client on moto with an empty model bucket named MODEL_BUCKET."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=MODEL_BUCKET)
        yield client
