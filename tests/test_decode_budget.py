"""The decode budget: files whose decoding costs too many bytes or scans are bombs before they are decoded, valid
files decode to the same pixels at a bounded memory cost, and truncated data is corrupt, never scored."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from core import decode_budget
from core.preprocessing import preprocess
from core.rejections import MAX_JPEG_SCANS, InvalidImageError, RejectionReason
from infra.corpus import (
    declared_size_jpeg,
    decode_cost_bombs,
    many_scans_jpeg,
    truncated_with_end_marker,
    with_jpeg_segment,
)
from infra.corpus import (
    encode as encode_file,
)
from tests.conftest import REPOSITORY_ROOT

Encoder = Callable[..., bytes]


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return decode_cost_bombs()


def _rejection(data: bytes) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as raised:
        preprocess(data)
    return raised.value


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("gray-alpha-5000.png", decode_budget.OVER_BYTES),
        ("cmyk-5000.jpeg", decode_budget.OVER_BYTES),
        ("scans-1000.jpeg", decode_budget.TOO_MANY_SCANS),
    ],
)
def test_decode_cost_bombs_are_rejected_before_decoding(bombs: dict[str, bytes], name: str, detail: str) -> None:
    """A small file within the pixel limit whose decoding costs more bytes or scans than the budget is a
    decompression bomb, with the fixed detail naming the budget it exceeds."""
    rejected = _rejection(bombs[name])
    assert rejected.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejected.detail == detail


def test_scan_limit_allows_ordinary_progressive_files(sample_xray: Image.Image, encode: Encoder) -> None:
    """libjpeg's own progressive files (about ten scans) decode; one scan more than the limit does not."""
    assert preprocess(encode(sample_xray.convert("RGB"), "JPEG", progressive=True)).pixels.shape == (224, 224, 1)
    assert decode_budget.count_scans(many_scans_jpeg(side=512, scans=MAX_JPEG_SCANS)) == MAX_JPEG_SCANS
    assert _rejection(many_scans_jpeg(side=512, scans=MAX_JPEG_SCANS + 1)).detail == decode_budget.TOO_MANY_SCANS


def test_scan_count_skips_a_thumbnail_in_the_header(sample_xray: Image.Image, encode: Encoder) -> None:
    """The scans of a JPEG embedded before the image (an EXIF thumbnail) are not the image's scans."""
    thumbnail = encode(sample_xray.resize((64, 64)), "JPEG", progressive=True)
    image = encode(sample_xray, "JPEG")
    with_thumbnail = with_jpeg_segment(image, 0xE1, thumbnail)  # In an APP1 (EXIF) segment.
    assert decode_budget.count_scans(with_thumbnail) == decode_budget.count_scans(image) == 1


_PEAK = """
import sys
from core.preprocessing import preprocess
from scoring.isolated_decode import process_status_bytes
def high_water_mb():
    return process_status_bytes("VmHWM") / 2**20
data = sys.stdin.buffer.read()
at_rest = high_water_mb()
preprocess(data)
print(high_water_mb() - at_rest)
"""


@pytest.mark.parametrize("name", ["palette-5000.png", "sixteen-bit-5000.png"])
def test_costly_modes_decode_within_the_budget(bombs: dict[str, bytes], name: str) -> None:
    """A 25-megapixel palette or 16-bit PNG is decoded holding at most the budget's bytes (it used to take several
    hundred megabytes through full-size RGBA and float64 copies)."""
    completed = subprocess.run(
        [sys.executable, "-c", _PEAK],
        input=bombs[name],
        capture_output=True,
        check=True,
        cwd=REPOSITORY_ROOT,
        env={"PYTHONPATH": f"{REPOSITORY_ROOT}:{REPOSITORY_ROOT / 'functions'}", "PATH": "/usr/bin:/bin"},
    )
    growth_mb = json.loads(completed.stdout.decode().strip())
    assert growth_mb * 2**20 <= decode_budget.MAX_DECODED_BYTES + 20 * 2**20


def _whole_image_grayscale(image: Image.Image) -> np.ndarray:
    """The conversion as it was before strips: every mode through full-size intermediates."""
    image = ImageOps.exif_transpose(image)
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.round((values - low) * scale).astype(np.uint8)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    if image.mode == "CMYK":
        image = image.convert("RGB")
    return np.asarray(image.convert("L"))


def _rotated(image: Image.Image) -> dict[str, object]:
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"exif": exif.tobytes()}


@pytest.mark.parametrize(
    ("variant", "image_format"),
    [
        (lambda film: Image.fromarray(np.asarray(film, dtype=np.uint16) * 257 + 3), "PNG"),
        (lambda film: film.convert("P"), "PNG"),
        (lambda film: film.convert("RGBA"), "PNG"),
        (lambda film: film.convert("LA"), "PNG"),
        (lambda film: film.convert("1"), "PNG"),
        (lambda film: film.convert("CMYK"), "JPEG"),
    ],
    ids=["sixteen-bit", "palette", "rgba", "gray-alpha", "bilevel", "cmyk"],
)
@pytest.mark.parametrize("rotated", [False, True], ids=["upright", "exif-rotated"])
def test_strip_conversion_gives_the_whole_image_pixels(
    sample_xray: Image.Image, variant: Callable[[Image.Image], Image.Image], image_format: str, rotated: bool
) -> None:
    """Converting strip by strip gives exactly the pixels of converting the whole image at once, so the model's
    inputs do not move."""
    film = sample_xray.resize((700, 650))  # More rows than one strip, and not a multiple of it.
    data = encode_file(variant(film), image_format, **(_rotated(film) if rotated else {}))
    expected = _whole_image_grayscale(Image.open(io.BytesIO(data)))
    decoded = preprocess(data, size=700)
    resized = Image.fromarray(expected).resize((700, 700), Image.Resampling.BILINEAR, reducing_gap=3.0)
    assert np.array_equal(decoded.pixels[:, :, 0], np.asarray(resized))


@pytest.mark.parametrize("size", [160, 192, 224])
@pytest.mark.parametrize("options", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_jpeg_decodes_to_pillows_draft_pixels(sample_xray: Image.Image, size: int, options: dict[str, object]) -> None:
    """A full-resolution JPEG decodes to exactly the pixels of Pillow's draft mode, the decoder training used."""
    for shape in [(2000, 1800), (1531, 1999), (224, 224), (700, 401)]:
        data = encode_file(sample_xray.convert("RGB").resize(shape, Image.Resampling.BICUBIC), "JPEG", **options)
        reference = Image.open(io.BytesIO(data))
        reference.draft("L", (size, size))
        expected = reference.convert("L").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        assert np.array_equal(preprocess(data, size).pixels[:, :, 0], np.asarray(expected))


def test_film_truncated_with_an_end_marker_is_corrupt(sample_xray: Image.Image, encode: Encoder) -> None:
    """A 2,000 px film cut to 5% with its end marker appended (libjpeg only warns and fills gray) is corrupt."""
    film = encode(sample_xray.resize((2000, 1800), Image.Resampling.BICUBIC), "JPEG", quality=90)
    for data in [truncated_with_end_marker(film), truncated_with_end_marker(film, 0.9)]:
        assert _rejection(data).reason is RejectionReason.CORRUPT


def test_tiny_jpeg_declaring_a_large_film_is_corrupt() -> None:
    """A few hundred bytes declaring 4,000 x 4,000 pixels are corrupt; declaring 8,900 x 8,900 is a bomb."""
    small = declared_size_jpeg(4_000, 4_000)
    assert len(small) < 400
    assert _rejection(small).reason is RejectionReason.CORRUPT
    assert _rejection(declared_size_jpeg(8_900, 8_900)).reason is RejectionReason.DECOMPRESSION_BOMB


def _chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def test_truncated_png_is_corrupt(sample_xray: Image.Image, encode: Encoder) -> None:
    """A PNG whose pixel data is cut short is corrupt: cut anywhere, cut with its end chunk appended, or with a
    well-formed IDAT chunk (valid CRC) that holds only part of the compressed pixels."""
    png = encode(sample_xray.resize((800, 700)), "PNG")
    end = _chunk(b"IEND", b"")
    header_end = png.index(b"IDAT") - 4
    rows = np.asarray(sample_xray.resize((800, 700)))
    pixels = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows))  # Filter type 0 before each row.
    assert preprocess(png[:header_end] + _chunk(b"IDAT", pixels) + end).pixels.shape == (224, 224, 1)
    rechunked = png[:header_end] + _chunk(b"IDAT", pixels[: len(pixels) // 3]) + end
    for data in [png[: len(png) // 2], png[: len(png) // 20] + end, rechunked]:
        assert _rejection(data).reason is RejectionReason.CORRUPT


@pytest.mark.parametrize("bomb", ["text", "icc-profile"])
def test_png_metadata_bombs_stay_bounded(sample_xray: Image.Image, encode: Encoder, bomb: str) -> None:
    """Compressed PNG metadata that would inflate far beyond its size (300 zTXt chunks of 1 MB each, or an ICC
    profile of 50 MB) is refused by Pillow's own limits (1 MB a chunk, 64 MB of text in all) and is corrupt."""
    png = encode(sample_xray, "PNG")
    if bomb == "text":
        text = zlib.compress(b"A" * 1_000_000, 9)
        metadata = b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % index + text) for index in range(300))
    else:
        metadata = _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * 50_000_000, 9))
    header_end = 8 + 25  # The signature, then the IHDR chunk.
    assert _rejection(png[:header_end] + metadata + png[header_end:]).reason is RejectionReason.CORRUPT
