"""Benign JPEG deviations (a missing end marker, stray bytes before a marker) decode to the clean file's pixels;
data cut short stays corrupt; a full-size RGB 4:4:4 progressive film fits the decode budget. Every file is a real
film from the samples, re-encoded at full resolution."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import decode_budget, jpeg_structure
from core.preprocessing import ENDS_BEFORE_LAST_SCAN, preprocess
from core.rejections import MAX_JPEG_COEFFICIENT_BYTES, InvalidImageError, RejectionReason

STRAY = b"\x00\x01\x02\x03"


def _film(sample_paths: list[Path], side: int, mode: str, *, progressive: bool) -> bytes:
    """A real film upscaled to ``side`` px wide and saved as libjpeg does (colour at 4:4:4)."""
    film = Image.open(sample_paths[-1]).convert("L").resize((side, side * 11 // 10), Image.Resampling.BICUBIC)
    encoded = io.BytesIO()
    film.convert(mode).save(encoded, "JPEG", quality=90, progressive=progressive, subsampling=0)
    return encoded.getvalue()


def _scan_starts(data: bytes) -> list[int]:
    return [index for index in range(len(data) - 1) if data[index : index + 2] == b"\xff\xda"]


def _before_every_scan(data: bytes, stray: bytes) -> bytes:
    starts = _scan_starts(data)
    pieces = [data[: starts[0]]]
    pieces += [stray + data[start:end] for start, end in zip(starts, [*starts[1:], len(data)], strict=True)]
    return b"".join(pieces)


DEVIATIONS: dict[str, Callable[[bytes], bytes]] = {
    "missing-end-marker": lambda data: data[:-2],
    "stray-bytes-before-first-scan": lambda data: data[: _scan_starts(data)[0]] + STRAY + data[_scan_starts(data)[0] :],
    "stray-bytes-before-every-scan": lambda data: _before_every_scan(data, STRAY),
    "ten-stray-bytes-before-the-end-marker": lambda data: data[:-2] + bytes(range(1, 11)) + data[-2:],
    "ten-stray-bytes-before-every-scan-no-end-marker": lambda data: _before_every_scan(data, bytes(range(1, 11)))[:-2],
}

LAYOUTS = [("L", False), ("L", True), ("RGB", False), ("RGB", True)]
LAYOUT_IDS = ["gray-baseline", "gray-progressive", "rgb-baseline", "rgb-progressive"]


@pytest.mark.parametrize(("mode", "progressive"), LAYOUTS, ids=LAYOUT_IDS)
def test_benign_deviations_decode_to_the_clean_pixels(sample_paths: list[Path], mode: str, progressive: bool) -> None:
    """A full-resolution film without its end marker, or with stray bytes where a marker belongs, gives exactly the
    model input of the clean file (libjpeg only warns about these and decodes every pixel)."""
    clean = _film(sample_paths, 2000, mode, progressive=progressive)
    expected = preprocess(clean).pixels
    for name, deviate in DEVIATIONS.items():
        deviated = deviate(clean)
        assert deviated != clean
        assert np.array_equal(preprocess(deviated).pixels, expected), name


@pytest.mark.parametrize(("mode", "progressive"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("end_marker", [b"", b"\xff\xd9"], ids=["cut", "cut-end-marker-appended"])
def test_film_cut_at_sixty_percent_is_corrupt(
    sample_paths: list[Path], mode: str, progressive: bool, end_marker: bytes
) -> None:
    """A scan whose data ends before its last block is corrupt, whether or not an end marker follows the cut."""
    clean = _film(sample_paths, 2000, mode, progressive=progressive)
    with pytest.raises(InvalidImageError) as raised:
        preprocess(clean[: len(clean) * 6 // 10] + end_marker)
    assert raised.value.reason is RejectionReason.CORRUPT


def test_progressive_film_cut_between_scans_is_corrupt(sample_paths: list[Path]) -> None:
    """A progressive film that ends after a complete scan but before its last one is corrupt: its scans do not
    carry every coefficient, although each scan it has is whole."""
    clean = _film(sample_paths, 2000, "RGB", progressive=True)
    cut = clean[: _scan_starts(clean)[-1]]
    structure = jpeg_structure.read_structure(cut)
    assert structure is not None and structure.missing_end and not structure.scans_complete
    with pytest.raises(InvalidImageError) as raised:
        preprocess(cut)
    assert (raised.value.reason, raised.value.detail) == (RejectionReason.CORRUPT, ENDS_BEFORE_LAST_SCAN)


@pytest.mark.parametrize(("mode", "progressive"), LAYOUTS, ids=LAYOUT_IDS)
def test_clean_film_is_read_unchanged(sample_paths: list[Path], mode: str, progressive: bool) -> None:
    """A well-formed file is handed to the decoder as uploaded, with its scans complete."""
    clean = _film(sample_paths, 600, mode, progressive=progressive)
    structure = jpeg_structure.read_structure(clean)
    assert structure is not None
    assert structure.repaired is clean
    assert structure.scans_complete
    assert structure.stray_bytes == 0 and not structure.missing_end


def test_stray_bytes_are_dropped_and_counted(sample_paths: list[Path]) -> None:
    """The bytes before a marker are dropped and counted; an end marker is appended where it is missing."""
    clean = _film(sample_paths, 600, "L", progressive=False)
    structure = jpeg_structure.read_structure(DEVIATIONS["stray-bytes-before-first-scan"](clean)[:-2])
    assert structure is not None
    assert (structure.stray_bytes, structure.missing_end) == (len(STRAY), True)
    assert structure.repaired == clean


def test_full_size_rgb_progressive_film_is_scored(sample_paths: list[Path]) -> None:
    """A 4,300 px RGB 4:4:4 progressive JPEG (libjpeg holds 111 MB of its coefficients) decodes to the gray
    film's pixels, as the README's promise of colour films up to about 20 megapixels says."""
    colour = _film(sample_paths, 4300, "RGB", progressive=True)
    gray = _film(sample_paths, 4300, "L", progressive=False)
    difference = np.abs(preprocess(colour).pixels.astype(np.int16) - preprocess(gray).pixels.astype(np.int16))
    assert float(difference.mean()) < 1.0


def test_coefficient_budget_admits_about_twenty_megapixels_of_rgb() -> None:
    """The coefficient budget holds a 4,300 px square RGB 4:4:4 progressive JPEG and refuses a 5,000 px one."""

    def cost(side: int) -> decode_budget.JpegCost:
        layout = decode_budget.JpegLayout(side, side, ((1, 1),) * 3, progressive=True, scans=10)
        return decode_budget.jpeg_cost(layout, 0, 0)

    decode_budget.check_jpeg(cost(4300), scans=10)
    assert cost(4300).coefficient_bytes > decode_budget.MAX_DECODED_BYTES  # The old single budget refused it.
    with pytest.raises(InvalidImageError) as raised:
        decode_budget.check_jpeg(cost(5000), scans=10)
    assert raised.value.detail == decode_budget.OVER_COEFFICIENT_BYTES
    assert cost(5000).coefficient_bytes > MAX_JPEG_COEFFICIENT_BYTES
