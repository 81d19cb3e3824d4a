"""Reading the Kaggle ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}`` layout into arrays.

Every image goes through ``core.preprocessing.preprocess``, the very function the scorer uses, and the
validation split is carved from train at patient level so no patient is seen on both sides.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from core.preprocessing import INPUT_SIZE, preprocess
from core.rejections import InvalidImageError

CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
"""Class index order: 0 is NORMAL, 1 is PNEUMONIA (the positive class)."""

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),  # person123_bacteria_456.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),  # IM-0001-0001.jpeg and NORMAL2-IM-0001-0001.jpeg
)


class DataLayoutError(ValueError):
    """The data folder does not hold a usable chest_xray layout; the message names the problem."""


@dataclass(frozen=True)
class LabelledFile:
    """One image file of the layout with its class index and patient identifier."""

    path: Path
    label: int
    patient_id: str


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one split, aligned with their source files."""

    images: np.ndarray
    """``(n, INPUT_SIZE, INPUT_SIZE, 1)`` uint8."""
    labels: np.ndarray
    """``(n,)`` int, indices into ``CLASS_NAMES``."""
    files: tuple[LabelledFile, ...]

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self) -> dict[str, int]:
        """How many images each class holds."""
        return {name: int((self.labels == index).sum()) for index, name in enumerate(CLASS_NAMES)}


def patient_id(file_name: str) -> str:
    """The patient a Kaggle file name belongs to; unknown patterns count as their own patient."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1)
    return Path(file_name).stem


def image_family(file_name: str) -> str:
    """The source family of a Kaggle file: ``IM`` or ``NORMAL2`` normals, ``bacteria`` or ``virus`` pneumonia.

    The official test split holds a larger share of ``NORMAL2`` normals than train, so validation is also reported
    per family: a model that does well on every family is less likely to be fitting one source's look."""
    if "_bacteria_" in file_name:
        return "bacteria"
    if "_virus_" in file_name:
        return "virus"
    if file_name.startswith("NORMAL2-"):
        return "NORMAL2"
    if file_name.startswith("IM-"):
        return "IM"
    return "other"


def list_split(split_dir: Path) -> list[LabelledFile]:
    """List ``split_dir/{NORMAL,PNEUMONIA}`` files, failing clearly when the layout is unusable."""
    if not split_dir.is_dir():
        raise DataLayoutError(f"{split_dir} does not exist; expected NORMAL/ and PNEUMONIA/ folders in it")
    files: list[LabelledFile] = []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = split_dir / class_name
        if not class_dir.is_dir():
            raise DataLayoutError(f"missing class folder {class_dir}")
        paths = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataLayoutError(f"class folder {class_dir} holds no .jpeg, .jpg or .png files")
        files.extend(LabelledFile(path=p, label=label, patient_id=patient_id(p.name)) for p in paths)
    return files


def patient_level_split(
    files: Sequence[LabelledFile], validation_fraction: float, seed: int
) -> tuple[list[LabelledFile], list[LabelledFile]]:
    """Split into (train, validation) so each patient is on one side only, keeping class proportions.

    ``validation_fraction`` of the patients of each class are held out, so the validation share of images is the
    one requested, up to the number of films per patient."""
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
    # Patients, not images, are split: each patient is stratified by the class of its images (in this data set
    # every patient's films share one class; a mixed patient counts by its first file).
    patients: dict[str, int] = {}
    for item in files:
        patients.setdefault(item.patient_id, item.label)
    names = sorted(patients)
    _, validation_patients = train_test_split(
        names, test_size=validation_fraction, stratify=[patients[name] for name in names], random_state=seed
    )
    held_out = set(validation_patients)
    return [f for f in files if f.patient_id not in held_out], [f for f in files if f.patient_id in held_out]


def limit_per_class(files: Sequence[LabelledFile], limit: int | None) -> list[LabelledFile]:
    """The first ``limit`` files of each class (all of them when ``limit`` is None), for smoke runs."""
    if limit is None:
        return list(files)
    return [f for label in range(len(CLASS_NAMES)) for f in [f for f in files if f.label == label][:limit]]


def load_images(files: Sequence[LabelledFile], size: int = INPUT_SIZE, workers: int = 4) -> ImageSet:
    """Decode files through the shared preprocessing, failing with the names of unreadable files."""

    def decode(item: LabelledFile) -> np.ndarray | str:
        try:
            return preprocess(item.path.read_bytes(), size=size).pixels
        except (InvalidImageError, OSError) as error:
            return f"{item.path}: {error}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(decode, files))
    failures = [d for d in decoded if isinstance(d, str)]
    if failures:
        listed = "\n  ".join(failures[:10])
        raise DataLayoutError(f"{len(failures)} unreadable image file(s):\n  {listed}")
    images = np.stack([d for d in decoded if isinstance(d, np.ndarray)])
    return ImageSet(images=images, labels=np.array([f.label for f in files], dtype=np.int64), files=tuple(files))


def manifest_sha256(files_by_split: dict[str, Sequence[LabelledFile]]) -> str:
    """A fingerprint of exactly which bytes were used: sha256 over sorted 'sha256  split/CLASS/name' lines."""
    lines = []
    for split, files in files_by_split.items():
        for item in files:
            digest = hashlib.sha256(item.path.read_bytes()).hexdigest()
            lines.append(f"{digest}  {split}/{CLASS_NAMES[item.label]}/{item.path.name}\n")
    lines.sort(key=lambda line: line.split("  ", 1)[1])
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights that make both classes count equally in the loss."""
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    if (counts == 0).any():
        raise DataLayoutError(f"a class has no training images: counts {counts.tolist()}")
    return {index: float(len(labels) / (len(CLASS_NAMES) * count)) for index, count in enumerate(counts)}


def split_as_trained(
    card: Mapping[str, Any], data_dir: Path, mismatch: type[Exception]
) -> tuple[list[LabelledFile], list[LabelledFile], list[LabelledFile]]:
    """The fit, validation and test files of the data an artifact's card was trained and evaluated on, carved with
    its seed and share; raises ``mismatch`` when ``data_dir`` is not that data (its manifest differs)."""
    hyperparameters = card["hyperparameters"]
    train_files = limit_per_class(list_split(data_dir / "train"), hyperparameters["limit_per_class"])
    test_files = limit_per_class(list_split(data_dir / "test"), hyperparameters["limit_per_class"])
    if manifest_sha256({"train": train_files, "test": test_files}) != card["data_manifest_sha256"]:
        raise mismatch(f"{data_dir} is not the data {card['version']} was trained and evaluated on")
    fit_files, validation_files = patient_level_split(
        train_files, hyperparameters["validation_fraction"], hyperparameters["seed"]
    )
    return fit_files, validation_files, test_files
