"""The int8 export rule: the parity gate with its AUC bar, the layers kept float, the representative films, the
trust checks an int8 model must keep, the float fallback, and ``requantize`` on a trained artifact."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.model_card import MODEL_FILE, read_card, sha256_of, verify_artifact, write_card
from tests.conftest import copy_artifact
from training.data import image_family, list_split
from training.export import (
    AUC_TOLERANCE,
    DENYLIST_ERROR_RATIO,
    PARITY_TOLERANCE,
    ExportCandidate,
    ExportResult,
    LayerError,
    ParityError,
    badly_quantized,
    choice_reason,
    measure_auc,
    representative_films,
    trust_regressions,
)

AT_PARITY = ExportCandidate(
    quantization="int8",
    size_bytes=4_000_000,
    max_probability_difference=PARITY_TOLERANCE / 2,
    label_agreement=1.0,
    label_flips=0,
    milliseconds_per_image=1.5,
    validation_auc=0.9975,
    keras_validation_auc=0.9980,
)
FLOAT = replace(AT_PARITY, quantization="float32", max_probability_difference=1e-6, milliseconds_per_image=4.0)


def test_candidate_within_every_tolerance_passes() -> None:
    """A candidate within the probability tolerance, without far flips and within the AUC bar passes."""
    assert AT_PARITY.passes
    assert AT_PARITY.failures == ()


def test_candidate_losing_auc_fails_although_probabilities_agree() -> None:
    """A validation AUC more than AUC_TOLERANCE below Keras fails the gate, and the reason gives both AUCs."""
    worse = replace(AT_PARITY, validation_auc=AT_PARITY.keras_validation_auc - 2 * AUC_TOLERANCE)
    assert not worse.passes
    [reason] = worse.failures
    assert "validation AUC 0.9940 against Keras 0.9980" in reason


@pytest.mark.parametrize(
    "candidate",
    [
        replace(AT_PARITY, max_probability_difference=0.14),
        replace(AT_PARITY, label_flips=2),
        replace(AT_PARITY, max_probability_difference=math.nan),
        replace(AT_PARITY, validation_auc=math.nan),
    ],
)
def test_candidate_fails_on_each_parity_figure(candidate: ExportCandidate) -> None:
    """Probabilities beyond the tolerance, a far flip, or a NaN figure each fail the gate on their own."""
    assert not candidate.passes
    assert len(candidate.failures) == 1


def test_auc_ignores_float_noise_between_near_ties() -> None:
    """Probabilities that differ by float noise give the same AUC, however the noise reorders near-tied films; a
    real reordering still changes it."""
    labels = np.array([0, 1, 0, 1, 0, 1])
    flat = np.full(6, 0.4999)
    noisy = flat + np.array([3e-10, -2e-10, 1e-10, -3e-10, 2e-10, 0.0])
    assert measure_auc(labels, flat) == measure_auc(labels, noisy) == 0.5
    assert measure_auc(labels, flat + np.array([0, 1e-3, 0, 1e-3, 0, 1e-3])) == 1.0


def test_badly_quantized_layers_are_those_above_the_error_ratio() -> None:
    """Only the layers whose int8 output error exceeds DENYLIST_ERROR_RATIO steps are kept float."""
    errors = (
        LayerError("model/stem_relu/Relu6;model/stem_conv", "CONV_2D", DENYLIST_ERROR_RATIO + 0.3),
        LayerError("model/block1_relu/Relu6", "CONV_2D", 0.29),
        LayerError("model/block0_depthwise_relu/Relu6", "DEPTHWISE_CONV_2D", 3.0),
        LayerError("model/head", "CONV_2D", DENYLIST_ERROR_RATIO),
    )
    assert badly_quantized(errors) == ("model/stem_relu/Relu6;model/stem_conv", "model/block0_depthwise_relu/Relu6")


def test_card_reason_says_why_float_is_served() -> None:
    """The card's reason names the served quantization and each failing figure of the other, with its numbers."""
    failing = replace(AT_PARITY, max_probability_difference=0.1410, label_flips=2)
    reason = choice_reason(FLOAT, (FLOAT, failing))
    assert reason.startswith("float32 is served; float32: 4.00 ms per image")
    assert "int8 fails the parity gate: probabilities differ from Keras by up to 0.1410" in reason
    assert "2 label(s) flip far from an operating point" in reason


def test_card_reason_says_why_int8_is_served() -> None:
    """When both pass, the reason gives both candidates' figures and says int8 is served because it is faster."""
    reason = choice_reason(AT_PARITY, (FLOAT, AT_PARITY))
    assert reason.startswith("int8 is served; int8: 1.50 ms per image")
    assert "float32: 4.00 ms per image" in reason
    assert reason.endswith("passes too, and int8 is at least 1.2x faster")


def test_fall_back_serves_the_float_candidate() -> None:
    """An int8 choice falls back to the float32 candidate's bytes, and the reason says why first."""
    result = ExportResult(b"int8", AT_PARITY, (FLOAT, AT_PARITY), "int8 is served", float_bytes=b"float")
    fallen = result.fall_back("the gate keeps fewer films")
    assert fallen.model_bytes == b"float"
    assert fallen.chosen.quantization == "float32"
    assert fallen.to_dict()["chosen"] == "float32"
    assert fallen.reason == "float32 is served: the gate keeps fewer films. By parity and speed alone: int8 is served"


def test_fall_back_without_a_float_candidate_fails() -> None:
    """An int8-only export has nothing to fall back to."""
    with pytest.raises(ParityError, match="no float32 candidate"):
        ExportResult(b"int8", AT_PARITY, (AT_PARITY,)).fall_back("worse")


def _trust_card() -> dict[str, Any]:
    return {
        "input_gate": {"validation_kept": 1.0},
        "screening": {
            "validation": {
                "clean_kept": 0.996,
                "benign_refused": {"jpeg": 0.0027, "tilt": 0.0053},
                "conditions_refused": {"inverted": 1.0, "blurred": 0.9893},
            }
        },
    }


def test_trust_regressions_empty_when_no_figure_is_worse() -> None:
    """Equal or better gate and screening figures are no regression."""
    better = _trust_card()
    better["screening"]["validation"]["benign_refused"]["jpeg"] = 0.0
    assert trust_regressions(_trust_card(), better) == []


def test_trust_regressions_name_each_worse_figure() -> None:
    """Fewer films kept by the gate or the stage, more benign variants or fewer conditions refused: each named."""
    worse = copy.deepcopy(_trust_card())
    worse["input_gate"]["validation_kept"] = 0.9987
    worse["screening"]["validation"]["clean_kept"] = 0.992
    worse["screening"]["validation"]["benign_refused"]["tilt"] = 0.008
    worse["screening"]["validation"]["conditions_refused"]["blurred"] = 0.98
    regressions = trust_regressions(_trust_card(), worse)
    assert regressions == [
        "the input gate keeps 0.9987 of validation films, was 1.0000",
        "screening keeps 0.9920 of clean films, was 0.9960",
        "screening refuses 0.0080 of tilt, was 0.0053",
        "screening refuses 0.9800 of blurred, was 0.9893",
    ]


def test_representative_films_cover_every_family_with_a_variant_each(data_root: Path) -> None:
    """The representative set draws from every source family of the training films, each film followed by an
    acquisition variant of itself that differs from it."""
    files = list_split(data_root / "train")
    films = representative_films(files, 64, count=40, seed=3)
    count = len(films) // 2
    assert films.shape == (2 * count, 64, 64, 1)
    assert films.dtype == np.uint8
    originals, variants = films[:count], films[count:]
    assert all(not np.array_equal(a, b) for a, b in zip(originals, variants, strict=True))
    families = np.array([image_family(item.path.name) for item in files])
    expected = sum(max(1, round(40 * int(np.sum(families == f)) / len(files))) for f in sorted(set(families)))
    assert count == expected


def test_requantize_writes_an_int8_version_or_nothing(smoke_artifact: Path, data_root: Path, tmp_path: Path) -> None:
    """``requantize`` on a trained artifact either writes a new int8 version whose export passes the gate and whose
    gate and screening figures are no worse than the float version's, or writes nothing and says why in figures."""
    from training.requantize import RequantizeError, requantize  # noqa: PLC0415  # TensorFlow only here.
    from training.train import KERAS_FILE  # noqa: PLC0415  # TensorFlow only here.

    output = tmp_path / "int8"
    source = read_card(smoke_artifact)
    try:
        card = requantize(smoke_artifact, smoke_artifact / KERAS_FILE, data_root, output)
    except RequantizeError as error:
        assert not output.exists() or not any(output.iterdir())
        assert str(error).startswith(f"{source['version']} stays float: ")
        assert "validation AUC" in str(error) or "screening" in str(error) or "input gate" in str(error)
        return
    verify_artifact(output)
    assert card["export"]["chosen"] == "int8"
    assert card["model_sha256"] == sha256_of(output / MODEL_FILE) != source["model_sha256"]
    # The served int8 candidate is the last: post-training int8, then, when that failed, the quantization-aware one.
    int8 = [c for c in card["export"]["candidates"] if c["quantization"] == "int8"][-1]
    assert int8["max_probability_difference"] <= PARITY_TOLERANCE
    assert int8["label_flips"] == 0
    assert int8["keras_validation_auc"] - int8["validation_auc"] <= AUC_TOLERANCE
    assert trust_regressions(source, card) == []
    assert card["derived_from"]["version"] == source["version"]
    assert card["metrics_test_from"]["version"] == source["version"]


def test_requantize_refuses_an_artifact_already_served_as_int8(smoke_artifact: Path, tmp_path: Path) -> None:
    """An artifact already served as int8 is refused before any data is read."""
    from training.requantize import RequantizeError, requantize  # noqa: PLC0415  # TensorFlow only here.
    from training.train import KERAS_FILE  # noqa: PLC0415  # TensorFlow only here.

    copied = copy_artifact(smoke_artifact, tmp_path / "copy", "int8-already")
    card = read_card(copied)
    card["export"]["chosen"] = "int8"
    write_card(copied, card)
    with pytest.raises(RequantizeError, match="already served as int8"):
        requantize(copied, copied / KERAS_FILE, tmp_path / "no-data", tmp_path / "out")
