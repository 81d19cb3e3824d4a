"""A set of files that are not chest radiographs, for measuring the input gate.

Each is an upload the scorer must refuse as ``NOT_A_CHEST_XRAY`` rather than diagnose: blank and constant images,
gradients and noise, natural photographs, documents, graphics, microscopy, and other body parts and modalities
(CT, MR, a retinal fundus, a head phantom). They come from packages the development environment installs
(scikit-image's and scikit-learn's sample images, matplotlib's sample data, pydicom's test files) or are drawn
here with a fixed seed, so the set is the same on every machine and nothing is downloaded. None of them is used to
fit or tune the gate, which learns from training X-rays only; they only measure it.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from infra.dicom_films import with_patient_age

SYNTHETIC_SIDE = 512
"""Side of the images drawn here, about the size of a small upload."""


@dataclass(frozen=True)
class NonRadiograph:
    """One file that is not a chest X-ray, with the kind of thing it shows."""

    name: str
    category: str
    data: bytes


def non_radiographs(seed: int = 0) -> list[NonRadiograph]:
    """The whole set, in a fixed order."""
    return [*_synthetic(np.random.default_rng(seed)), *_documents(), *_package_images(), *_other_modalities()]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB" if pixels.ndim == 3 else "L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _synthetic(rng: np.random.Generator) -> Iterator[NonRadiograph]:
    """Blank, constant, gradient, noise and pattern images: what a broken modality or a test upload sends."""
    side = SYNTHETIC_SIDE
    ramp = np.linspace(0, 255, side)
    yy, xx = np.mgrid[0:side, 0:side]
    radius = np.hypot(yy - side / 2, xx - side / 2) / (side / np.sqrt(2))
    for level in (0, 128, 255):
        yield NonRadiograph(f"constant-{level}.png", "blank", _png(np.full((side, side), level, np.uint8)))
    yield NonRadiograph("white.jpeg", "blank", _jpeg(np.full((side, side), 255, np.uint8)))
    gradients = {
        "horizontal": np.tile(ramp, (side, 1)),
        "vertical": np.tile(ramp[:, np.newaxis], (1, side)),
        "diagonal": (yy + xx) / (2 * side - 2) * 255,
        "radial": (1 - radius) * 255,
        "vignette": np.clip(1.4 - radius * 1.6, 0, 1) * 200,
    }
    for name, values in gradients.items():
        yield NonRadiograph(f"gradient-{name}.png", "gradient", _png(values.astype(np.uint8)))
    noises = {
        "uniform": rng.integers(0, 256, (side, side)),
        "gaussian": np.clip(rng.normal(128, 40, (side, side)), 0, 255),
        "salt-and-pepper": np.where(rng.random((side, side)) < 0.5, 0, 255),
        "dark-gaussian": np.clip(rng.normal(30, 10, (side, side)), 0, 255),
        "colour": rng.integers(0, 256, (side, side, 3)),
    }
    for name, values in noises.items():
        yield NonRadiograph(f"noise-{name}.png", "noise", _png(values.astype(np.uint8)))
    clouds = Image.fromarray(rng.integers(0, 256, (side // 16, side // 16)).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    yield NonRadiograph("noise-clouds.jpeg", "noise", _jpeg(np.asarray(clouds)))
    yield NonRadiograph(
        "noise-blurred.png", "noise", _png(np.asarray(clouds.filter(ImageFilter.GaussianBlur(radius=8))))
    )
    patterns = {
        "stripes": ((xx // 16) % 2 * 255),
        "checkerboard": (((xx // 32) + (yy // 32)) % 2 * 255),
        "rings": (np.sin(radius * 60) * 127 + 128),
    }
    for name, values in patterns.items():
        yield NonRadiograph(f"pattern-{name}.png", "pattern", _png(values.astype(np.uint8)))
    shapes = Image.new("L", (side, side), 20)
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, side - 64, 2))
        x1, y1 = x0 + int(rng.integers(32, 200)), y0 + int(rng.integers(32, 200))
        draw.ellipse((x0, y0, x1, y1), fill=int(rng.integers(60, 255)))
    yield NonRadiograph("pattern-ellipses.png", "pattern", _png(np.asarray(shapes)))


def _documents() -> Iterator[NonRadiograph]:
    """Pages of text, as a scanned referral or a screenshot of a report would be."""
    lines = [
        "DISCHARGE SUMMARY",
        "The patient was admitted with cough and fever for three days.",
        "Examination: temperature 38.9 C, respiratory rate 42 per minute.",
        "Plan: oral amoxicillin for five days, review in clinic.",
        "Signed, the attending physician.",
    ]
    for index, (background, ink) in enumerate(((255, 0), (240, 40), (0, 255))):
        page = Image.new("L", (600, 800), background)
        draw = ImageDraw.Draw(page)
        for row in range(30):
            draw.text((40, 30 + row * 24), lines[row % len(lines)], fill=ink)
        yield NonRadiograph(f"document-{index}.png", "document", _png(np.asarray(page)))
    table = Image.new("L", (700, 500), 255)
    draw = ImageDraw.Draw(table)
    for row in range(12):
        draw.line((20, 20 + row * 38, 680, 20 + row * 38), fill=0, width=2)
        for column in range(5):
            draw.text((30 + column * 130, 30 + row * 38), f"{row * 7 + column:>5}", fill=0)
    yield NonRadiograph("document-table.png", "document", _png(np.asarray(table)))


def _package_images() -> Iterator[NonRadiograph]:
    """Photographs, documents, graphics and microscopy shipped inside scikit-image, scikit-learn and matplotlib."""
    import matplotlib as mpl  # noqa: PLC0415  # Development packages, imported only when the set is built.
    from skimage import data  # noqa: PLC0415
    from sklearn.datasets import load_sample_images  # noqa: PLC0415

    categories: dict[str, tuple[str, ...]] = {
        "photograph": (
            "astronaut",
            "camera",
            "cat",
            "coffee",
            "coins",
            "horse",
            "rocket",
            "moon",
            "grass",
            "gravel",
            "brick",
            "clock",
            "hubble_deep_field",
        ),
        "document": ("page", "text"),
        "graphic": ("logo", "colorwheel", "checkerboard"),
        "microscopy": ("immunohistochemistry", "cell", "microaneurysms"),
        "other body part": ("retina", "shepp_logan_phantom"),
    }
    loaders: dict[str, Callable[[], np.ndarray]] = {
        name: getattr(data, name) for names in categories.values() for name in names
    }
    for category, names in categories.items():
        for name in names:
            pixels = np.asarray(loaders[name]())
            if pixels.dtype == np.bool_:
                pixels = pixels.astype(np.uint8) * 255
            elif pixels.dtype != np.uint8:
                pixels = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-9)).astype(np.uint8)
            encode = _jpeg if category == "photograph" and pixels.ndim == 3 else _png
            yield NonRadiograph(f"skimage-{name}", category, encode(pixels))
    for index, picture in enumerate(load_sample_images().images):
        yield NonRadiograph(f"sklearn-sample-{index}.jpeg", "photograph", _jpeg(picture))
    sample_data = Path(mpl.get_data_path()) / "sample_data"
    yield NonRadiograph("matplotlib-grace_hopper.jpg", "photograph", (sample_data / "grace_hopper.jpg").read_bytes())
    yield NonRadiograph("matplotlib-logo2.png", "graphic", (sample_data / "logo2.png").read_bytes())
    yield NonRadiograph(
        "matplotlib-present.png", "graphic", (sample_data / "Minduka_Present_Blue_Pack.png").read_bytes()
    )


def _other_modalities() -> Iterator[NonRadiograph]:
    """CT and MR slices of other body parts, as DICOM and as a 16-bit MR image. The DICOM files' stated patient ages
    are removed: the set measures the input gate, and an adult's age (liver_1frame.dcm states 60 years) would have
    the file refused as OUTSIDE_VALIDATED_POPULATION before the gate sees it."""
    import matplotlib as mpl  # noqa: PLC0415  # Development packages, imported only when the set is built.
    import pydicom.data  # noqa: PLC0415

    test_files = Path(pydicom.data.__file__).parent / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"):
        data = with_patient_age((test_files / name).read_bytes(), None)
        yield NonRadiograph(f"pydicom-{name}", "other body part", data)
    # matplotlib's sample MR slice of a head: 256 x 256 big-endian 16-bit values.
    raw = gzip.decompress((Path(mpl.get_data_path()) / "sample_data" / "s1045.ima.gz").read_bytes())
    slice_values = np.frombuffer(raw, dtype=">u2").reshape(256, 256).astype(np.float64)
    scaled = (255 * slice_values / max(float(slice_values.max()), 1.0)).astype(np.uint8)
    yield NonRadiograph("matplotlib-mri-head.png", "other body part", _png(scaled))
