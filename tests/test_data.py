"""Reading the Kaggle layout: patient ids, a leak-free validation split, clear errors for bad layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    DataLayoutError,
    class_weights,
    image_family,
    list_split,
    load_images,
    manifest_sha256,
    patient_id,
    patient_level_split,
)


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("person123_bacteria_456.jpeg", "person123"),
        ("person1678_virus_2895.jpeg", "person1678"),
        ("IM-0001-0001.jpeg", "IM-0001"),
        ("NORMAL2-IM-0095-0001.jpeg", "NORMAL2-IM-0095"),
        ("something-else.png", "something-else"),
    ],
)
def test_patient_id_from_file_name(file_name: str, expected: str) -> None:
    """Kaggle file names map to their patient; unknown names are their own patient."""
    assert patient_id(file_name) == expected


def test_validation_split_has_no_patient_on_both_sides(data_root: Path) -> None:
    """The real training data splits with no patient in both the fit and the validation part."""
    files = list_split(data_root / "train")
    fit, validation = patient_level_split(files, 0.15, seed=42)
    assert len(fit) + len(validation) == len(files) == 5216
    assert not {f.patient_id for f in fit} & {f.patient_id for f in validation}
    assert 0.13 < len(validation) / len(files) < 0.17


def test_validation_split_is_stratified_and_deterministic(data_root: Path) -> None:
    """Both sides keep the class balance, and the same seed gives the same split."""
    files = list_split(data_root / "train")
    _, validation = patient_level_split(files, 0.15, seed=42)
    _, again = patient_level_split(files, 0.15, seed=42)
    overall = np.mean([f.label for f in files])
    assert abs(np.mean([f.label for f in validation]) - overall) < 0.03
    assert [f.path for f in validation] == [f.path for f in again]


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.25, 0.4])
def test_validation_share_is_the_one_requested(data_root: Path, fraction: float) -> None:
    """The held-out share of images follows the requested fraction (0.4 gives 40%, not 50%)."""
    files = list_split(data_root / "train")
    _, validation = patient_level_split(files, fraction, seed=42)
    assert len(validation) / len(files) == pytest.approx(fraction, abs=0.02)


@pytest.mark.parametrize(
    ("file_name", "family"),
    [
        ("person1_bacteria_1.jpeg", "bacteria"),
        ("person1_virus_6.jpeg", "virus"),
        ("IM-0001-0001.jpeg", "IM"),
        ("NORMAL2-IM-0095-0001.jpeg", "NORMAL2"),
        ("upload.png", "other"),
    ],
)
def test_image_family_from_file_name(file_name: str, family: str) -> None:
    """Validation is also reported per source family of the Kaggle files."""
    assert image_family(file_name) == family


def _copy_layout(data_root: Path, destination: Path, per_class: int = 3) -> Path:
    for class_name in ("NORMAL", "PNEUMONIA"):
        target = destination / "train" / class_name
        target.mkdir(parents=True)
        for path in sorted((data_root / "train" / class_name).iterdir())[:per_class]:
            shutil.copy(path, target)
    return destination / "train"


def test_missing_class_folder_is_named(data_root: Path, tmp_path: Path) -> None:
    """A layout without PNEUMONIA/ fails with a message naming the missing folder."""
    split = _copy_layout(data_root, tmp_path)
    shutil.rmtree(split / "PNEUMONIA")
    with pytest.raises(DataLayoutError, match=r"missing class folder .*PNEUMONIA"):
        list_split(split)


def test_empty_class_folder_is_named(data_root: Path, tmp_path: Path) -> None:
    """A class folder with no images fails with a message naming it."""
    split = _copy_layout(data_root, tmp_path)
    for path in (split / "NORMAL").iterdir():
        path.unlink()
    with pytest.raises(DataLayoutError, match="NORMAL holds no"):
        list_split(split)


def test_missing_split_is_named(tmp_path: Path) -> None:
    """A data folder without the split fails clearly."""
    with pytest.raises(DataLayoutError, match="does not exist"):
        list_split(tmp_path / "train")


def test_unreadable_image_is_named(data_root: Path, tmp_path: Path) -> None:
    """A corrupt file in the layout fails the load with the file's path."""
    split = _copy_layout(data_root, tmp_path)
    (split / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    with pytest.raises(DataLayoutError, match=r"IM-9999-0001\.jpeg"):
        load_images(list_split(split), size=64)


def test_manifest_changes_with_any_byte(data_root: Path, tmp_path: Path) -> None:
    """The data fingerprint in the card changes when one file's content changes."""
    split = _copy_layout(data_root, tmp_path)
    before = manifest_sha256({"train": list_split(split)})
    victim = next((split / "NORMAL").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert manifest_sha256({"train": list_split(split)}) != before


def test_class_weights_balance_the_classes() -> None:
    """Weighted, each class contributes the same total to the loss."""
    labels = np.array([0] * 10 + [1] * 30)
    weights = class_weights(labels)
    assert weights[0] * 10 == pytest.approx(weights[1] * 30)
