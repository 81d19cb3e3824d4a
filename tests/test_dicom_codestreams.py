"""A DICOM frame's codestream is read from its own header before it is decoded: one declaring a larger image than
the data set (JPEG, RGB JPEG, JPEG-LS, JPEG 2000, an RLE segment), or repeating a scan past the scan limit, is
refused without being decoded; one that differs otherwise is corrupt; the clinical films of every syntax pass."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from core.decode_budget import TOO_MANY_SCANS as BARE_TOO_MANY_SCANS
from core.dicom_codestream import DIFFERS_FROM_STATED, LARGER_THAN_STATED, TOO_MANY_SCANS, UNREADABLE_CODESTREAM
from core.preprocessing import decode, preprocess
from core.rejections import InvalidImageError, RejectionReason
from infra.corpus import many_scans_jpeg
from infra.dicom_bombs import STATED_SIDE, codestream_larger_than_header, repeated_scan_frame, rle_segment_bomb
from tests.conftest import RELEASE_MODEL
from tests.dicom_fixtures import FIXTURES, film_in_syntax, saved

ROOT = Path(__file__).resolve().parent.parent


def _never_decoded(dataset: Dataset) -> None:
    raise AssertionError("a frame was decoded that its codestream header should have refused")


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any decode of DICOM pixel data fails the test."""
    monkeypatch.setattr(Dataset, "pixel_array", property(_never_decoded))


def _rejection(data: bytes) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as raised:
        preprocess(data)
    return raised.value


@cache
def _large(syntax: str, samples: int = 1) -> bytes:
    return codestream_larger_than_header(syntax, 20_000 if syntax == "JPEG-LS" else 2_048, samples=samples)


@pytest.mark.usefixtures("no_decoding")
@pytest.mark.parametrize(
    ("syntax", "samples"),
    [("JPEG", 1), ("JPEG", 3), ("JPEG-LS", 1), ("JPEG 2000", 1)],
    ids=["jpeg", "rgb-jpeg", "jpeg-ls", "jpeg-2000"],
)
def test_codestream_larger_than_its_header_is_refused_before_decoding(syntax: str, samples: int) -> None:
    """A data set stating 512 x 512 whose frame's codestream declares a larger image (20,000 px of JPEG-LS in
    3 KB; 2,048 px of gray or RGB JPEG, of JPEG 2000) is DECOMPRESSION_BOMB with a fixed text, never decoded."""
    rejection = _rejection(_large(syntax, samples))
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == LARGER_THAN_STATED


@pytest.mark.usefixtures("no_decoding")
def test_jpeg_2000_inside_a_jp2_file_is_read_from_its_codestream_box() -> None:
    """A JPEG 2000 frame wrapped in a JP2 file (signature, header boxes, then the codestream box) is read from its
    codestream's SIZ like a bare codestream."""
    jp2 = imagecodecs.jpeg2k_encode(np.zeros((1_024, 1_024), np.uint8), codecformat="jp2", level=0, reversible=True)
    dataset = dcmread(io.BytesIO(_large("JPEG 2000")))
    dataset.PixelData = encapsulate([bytes(jp2)])
    assert _rejection(saved(dataset)).detail == LARGER_THAN_STATED


def _with_frame(template: bytes, frame: bytes, **elements: int) -> bytes:
    dataset = dcmread(io.BytesIO(template))
    dataset.PixelData = encapsulate([frame])
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return saved(dataset)


@pytest.mark.usefixtures("no_decoding")
def test_codestream_smaller_than_its_header_is_corrupt() -> None:
    """A frame declaring fewer rows than the data set states is CORRUPT_IMAGE, not decoded."""
    frame = imagecodecs.jpegls_encode(np.zeros((STATED_SIDE // 2, STATED_SIDE), np.uint8))
    rejection = _rejection(_with_frame(_large("JPEG-LS"), bytes(frame)))
    assert rejection.reason is RejectionReason.CORRUPT
    assert rejection.detail == DIFFERS_FROM_STATED


@pytest.mark.usefixtures("no_decoding")
def test_codestream_precision_above_the_bits_allocated_is_refused() -> None:
    """A 16-bit JPEG-LS frame in a data set allocating 8 bits a sample is refused: its decode is twice the
    budgeted frame."""
    frame = imagecodecs.jpegls_encode(np.full((STATED_SIDE, STATED_SIDE), 40_000, np.uint16))
    rejection = _rejection(_with_frame(_large("JPEG-LS"), bytes(frame)))
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == LARGER_THAN_STATED


@pytest.mark.usefixtures("no_decoding")
def test_unreadable_codestream_header_is_corrupt() -> None:
    """A frame with no frame header where its syntax needs one is CORRUPT_IMAGE with a fixed text."""
    rejection = _rejection(_with_frame(_large("JPEG-LS"), b"\xff\xd8" + b"\x00" * 64))
    assert rejection.reason is RejectionReason.CORRUPT
    assert rejection.detail == UNREADABLE_CODESTREAM


def test_repeated_scan_frame_is_refused_like_the_bare_jpeg(no_decoding: None) -> None:
    """A JPEG frame repeating one progressive scan 1,000 times, its size stated truly, is refused for its scans
    inside DICOM as the same JPEG is refused bare."""
    jpeg = many_scans_jpeg(1_000)
    rejection = _rejection(repeated_scan_frame(jpeg))
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == TOO_MANY_SCANS
    assert _rejection(jpeg).detail == BARE_TOO_MANY_SCANS


@pytest.mark.usefixtures("no_decoding")
def test_rle_segment_decoding_past_its_plane_is_refused() -> None:
    """An RLE segment of 8 KB runs that decodes to 64 planes of the stated 512 x 512 is refused before pydicom
    decodes it whole."""
    rejection = _rejection(rle_segment_bomb())
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == LARGER_THAN_STATED


@pytest.mark.usefixtures("no_decoding")
def test_rle_segments_that_disagree_with_the_samples_are_corrupt() -> None:
    """An RLE frame with two segments for an 8-bit gray film is CORRUPT_IMAGE."""
    header = np.zeros(16, dtype="<u4")
    header[0], header[1], header[2] = 2, 64, 66
    frame = header.tobytes() + b"\x81\x00" * 2
    rejection = _rejection(_with_frame(rle_segment_bomb(), frame))
    assert rejection.reason is RejectionReason.CORRUPT
    assert rejection.detail == DIFFERS_FROM_STATED


@pytest.mark.parametrize("name", sorted(path.stem for path in FIXTURES.glob("*.dcm") if "htj2k" not in path.stem))
def test_clinical_films_pass_the_codestream_check(name: str) -> None:
    """The real 12-bit film in every committed clinical syntax (JPEG baseline, extended, lossless, JPEG-LS,
    JPEG 2000) decodes: no false refusal."""
    assert decode((FIXTURES / f"{name}.dcm").read_bytes()).original_width > 0


def test_rle_film_passes_the_codestream_check() -> None:
    """The 12-bit film in RLE Lossless (two segments, each exactly its plane) decodes."""
    assert dcmread(io.BytesIO(film_in_syntax(RLELossless))).file_meta.TransferSyntaxUID == RLELossless
    assert decode(film_in_syntax(RLELossless)).original_width > 0


def test_score_refuses_every_crafted_file_within_512_mb(tmp_path: Path) -> None:
    """``pneumoscan score`` of the crafted files (20,000 px JPEG-LS and 2,048 px JPEG, RGB JPEG and JPEG 2000
    codestreams in 512 px data sets, a repeated-scan frame, an RLE segment bomb), all in one process, refuses each
    as a decompression bomb and peaks under 512 MB of resident memory."""
    files = {
        "jpeg-ls.dcm": _large("JPEG-LS"),
        "jpeg.dcm": _large("JPEG"),
        "rgb-jpeg.dcm": _large("JPEG", 3),
        "jpeg-2000.dcm": _large("JPEG 2000"),
        "scans.dcm": repeated_scan_frame(many_scans_jpeg(1_000)),
        "rle.dcm": rle_segment_bomb(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    command = [sys.executable, "-m", "pneumoscan.cli", "score", "--model", str(RELEASE_MODEL), *sorted(files)]
    completed = subprocess.run(  # The interpreter running the tests, on arguments built here.
        [sys.executable, "-c", PEAK_OF_CHILD, *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'functions'}"},
        check=False,
    )
    *lines, peak_kb = completed.stdout.splitlines()
    reasons = [line for line in lines if '"reason": "DECOMPRESSION_BOMB"' in line]
    assert len(reasons) == len(files), completed.stdout + completed.stderr
    assert int(peak_kb) < 512 * 1024


PEAK_OF_CHILD = """
import resource, subprocess, sys
print(subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False).stdout, end="")
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
"""Runs its arguments, prints their output and then the peak resident kilobytes of that one child."""
