"""The shared preprocessing: every real-world variant decodes the same way, every bad file gets a reason."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

from core.preprocessing import INPUT_SIZE, ImageFormat, decode, detect_format, preprocess
from core.rejections import MAX_PIXELS, InvalidImageError, RejectionReason
from infra.corpus import dicom_bytes
from tests.conftest import REPOSITORY_ROOT, noise_image

Encoder = Callable[..., bytes]


def _mean_absolute_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.mean(np.abs(first.astype(np.int16) - second.astype(np.int16))))


def test_sample_jpeg_becomes_square_grayscale_uint8(sample_paths: list) -> None:
    """A data-set JPEG becomes a (224, 224, 1) uint8 array."""
    result = preprocess(sample_paths[0].read_bytes())
    assert result.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 1)
    assert result.pixels.dtype == np.uint8
    assert result.image_format is ImageFormat.JPEG


def test_size_argument_sets_output_side(sample_paths: list) -> None:
    """The model's input size, read from its card, decides the output side."""
    assert preprocess(sample_paths[0].read_bytes(), size=96).pixels.shape == (96, 96, 1)


def test_full_resolution_film_matches_its_small_copy(sample_xray: Image.Image, encode: Encoder) -> None:
    """A ~2000 px upload (decoded in draft mode) gives nearly the pixels of the 224 px copy."""
    large = sample_xray.resize((2000, 1800), Image.Resampling.BICUBIC)
    small = preprocess(encode(sample_xray, "JPEG", quality=95)).pixels
    from_large = preprocess(encode(large, "JPEG", quality=95)).pixels
    assert _mean_absolute_difference(small, from_large) < 4.0


@pytest.mark.parametrize(
    "convert",
    [
        lambda image: image.convert("RGB"),
        lambda image: image.convert("P"),
        lambda image: image.convert("RGBA"),
        lambda image: image.convert("LA"),
    ],
    ids=["rgb", "palette", "rgba", "gray-alpha"],
)
def test_png_modes_decode_to_the_same_grayscale(sample_xray: Image.Image, encode: Encoder, convert: Callable) -> None:
    """RGB, palette and alpha PNGs all give the grayscale pixels of the plain grayscale PNG."""
    reference = preprocess(encode(sample_xray, "PNG")).pixels
    variant = preprocess(encode(convert(sample_xray), "PNG")).pixels
    assert _mean_absolute_difference(reference, variant) < 3.0


def test_sixteen_bit_png_is_stretched_to_eight_bits(sample_xray: Image.Image, encode: Encoder) -> None:
    """A 12-bit-range 16-bit PNG uses the full 0-255 range and keeps the image's structure."""
    values = np.asarray(sample_xray, dtype=np.uint16) * 16
    sixteen_bit = Image.fromarray(values)
    assert sixteen_bit.mode == "I;16"
    result = preprocess(encode(sixteen_bit, "PNG")).pixels
    reference = preprocess(encode(sample_xray, "PNG")).pixels
    assert result.max() == 255
    assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.99


def test_cmyk_and_progressive_jpegs_decode(sample_xray: Image.Image, encode: Encoder) -> None:
    """CMYK and progressive JPEGs decode to the X-ray's pixels."""
    reference = preprocess(encode(sample_xray, "JPEG", quality=95)).pixels
    cmyk = preprocess(encode(sample_xray.convert("CMYK"), "JPEG", quality=95)).pixels
    progressive = preprocess(encode(sample_xray, "JPEG", quality=95, progressive=True)).pixels
    assert _mean_absolute_difference(reference, cmyk) < 6.0
    assert _mean_absolute_difference(reference, progressive) < 2.0


def test_exif_orientation_is_applied(sample_xray: Image.Image, encode: Encoder) -> None:
    """A film stored rotated with an EXIF orientation tag is scored upright."""
    stored_rotated = sample_xray.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the viewer must rotate 90 degrees clockwise to display it.
    upright = preprocess(encode(sample_xray, "JPEG", quality=95)).pixels
    restored = preprocess(encode(stored_rotated, "JPEG", quality=95, exif=exif.tobytes())).pixels
    assert _mean_absolute_difference(upright, restored) < 3.0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", RejectionReason.EMPTY),
        (b"hello, this is plain text named scan.jpeg", RejectionReason.UNSUPPORTED_FORMAT),
        (b"<!DOCTYPE html><html><body>not an x-ray</body></html>", RejectionReason.UNSUPPORTED_FORMAT),
        (np.random.default_rng(1).bytes(5000), RejectionReason.UNSUPPORTED_FORMAT),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, RejectionReason.CORRUPT),
    ],
    ids=["empty", "text", "html", "random", "jpeg-signature-only"],
)
def test_non_images_are_rejected_with_a_reason(payload: bytes, reason: RejectionReason) -> None:
    """Files that are not images get a specific rejection reason."""
    with pytest.raises(InvalidImageError) as raised:
        preprocess(payload)
    assert raised.value.reason is reason


def test_truncated_jpeg_is_corrupt(sample_xray: Image.Image, encode: Encoder) -> None:
    """A JPEG cut off half-way is rejected as corrupt, not scored on a partial image."""
    data = encode(sample_xray, "JPEG")
    with pytest.raises(InvalidImageError) as raised:
        preprocess(data[: len(data) // 2])
    assert raised.value.reason is RejectionReason.CORRUPT


@pytest.mark.parametrize("image_format", ["GIF", "TIFF", "BMP", "WEBP"])
def test_other_image_formats_are_unsupported(sample_xray: Image.Image, encode: Encoder, image_format: str) -> None:
    """Valid images in formats the scorer does not accept are rejected as unsupported."""
    with pytest.raises(InvalidImageError) as raised:
        preprocess(encode(sample_xray, image_format))
    assert raised.value.reason is RejectionReason.UNSUPPORTED_FORMAT


def test_tiny_image_is_rejected(encode: Encoder) -> None:
    """A 1x1 image cannot be an X-ray."""
    with pytest.raises(InvalidImageError) as raised:
        preprocess(encode(noise_image(1, 1), "PNG"))
    assert raised.value.reason is RejectionReason.TOO_SMALL


def test_decompression_bomb_is_an_error() -> None:
    """A small PNG that claims a huge canvas is rejected before it is decoded."""
    side = int(MAX_PIXELS**0.5) + 100
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 2_000_000
    with pytest.raises(InvalidImageError) as raised:
        preprocess(buffer.getvalue())
    assert raised.value.reason is RejectionReason.DECOMPRESSION_BOMB


def test_pixel_limit_is_the_one_the_readme_states(sample_xray: Image.Image, encode: Encoder) -> None:
    """The README's pixel limit is the code's: the largest detector it names (a 16-bit PNG and DICOM) and an image
    of exactly the limit are scored, one row more is a decompression bomb."""
    readme = (REPOSITORY_ROOT / "README.md").read_text()
    stated = re.search(
        r"accepted up to (\d+) megapixels \(([\d,]+) x ([\d,]+)\s+pixels\), room for the largest "
        r"flat-panel detectors \(about ([\d,]+) x ([\d,]+) at 16 bits\)",
        readme,
    )
    assert stated is not None, "the README states no pixel limit"
    megapixels, width, height, detector_width, detector_height = (int(g.replace(",", "")) for g in stated.groups())
    assert megapixels * 1_000_000 == width * height == MAX_PIXELS
    detector = sample_xray.resize((detector_width, detector_height))
    sixteen_bit = Image.fromarray(np.asarray(detector, dtype=np.uint16) * 257)
    assert preprocess(encode(sixteen_bit, "PNG")).original_width == detector_width
    assert preprocess(dicom_bytes(detector, bits=16)).original_height == detector_height
    assert preprocess(encode(Image.new("L", (width, height), 128), "PNG")).original_width == width
    with pytest.raises(InvalidImageError) as raised:
        preprocess(encode(Image.new("L", (width, height + 1), 128), "PNG"))
    assert raised.value.reason is RejectionReason.DECOMPRESSION_BOMB


def test_format_comes_from_magic_bytes_not_name(sample_xray: Image.Image, encode: Encoder) -> None:
    """A PNG is recognised as PNG whatever it is called; the name never enters the decision."""
    assert detect_format(encode(sample_xray, "PNG")) is ImageFormat.PNG
    assert detect_format(encode(sample_xray, "JPEG")) is ImageFormat.JPEG


@pytest.mark.parametrize(
    "options",
    [{"bits": 16}, {"bits": 8}, {"jpeg": True}, {"bits": 16, "monochrome1": True}],
    ids=["uncompressed-16bit", "uncompressed-8bit", "baseline-jpeg", "monochrome1"],
)
def test_dicom_decodes_like_the_jpeg(sample_xray: Image.Image, encode: Encoder, options: dict) -> None:
    """DICOM files (uncompressed, baseline JPEG, inverted MONOCHROME1) give the pixels of the same film."""
    reference = preprocess(encode(sample_xray, "PNG")).pixels.astype(np.float64)
    result = preprocess(dicom_bytes(sample_xray, **options))
    assert result.image_format is ImageFormat.DICOM
    assert np.corrcoef(result.pixels.ravel(), reference.ravel())[0, 1] > 0.98


def _testdata(name: str) -> bytes:
    """A DICOM file that ships inside pydicom (its test data), read without the network."""
    return Path(get_testdata_file(name, download=False)).read_bytes()


def test_clinical_jpeg_syntaxes_decode() -> None:
    """JPEG-LS lossless gives exactly the pixels of the same image uncompressed, and 12-bit JPEG Extended decodes:
    neither is read as corrupt."""
    reference = np.asarray(decode(_testdata("MR_small.dcm")).grayscale)
    jpeg_ls = decode(_testdata("MR_small_jpeg_ls_lossless.dcm"))
    assert np.array_equal(np.asarray(jpeg_ls.grayscale), reference)
    extended = decode(_testdata("JPGExtended.dcm"))
    assert (extended.original_width, extended.original_height) == (256, 1024)
    assert np.asarray(extended.grayscale).std() > 10


def test_undecodable_transfer_syntax_is_unsupported_and_named(sample_xray: Image.Image) -> None:
    """A transfer syntax no installed decoder handles (HTJ2K) is UNSUPPORTED_FORMAT naming it, never corrupt."""
    dataset = dcmread(io.BytesIO(dicom_bytes(sample_xray.resize((128, 128)))))
    dataset.file_meta.TransferSyntaxUID = HTJ2KLossless
    dataset.PixelData = encapsulate([bytes(100)])
    dataset["PixelData"].is_undefined_length = True
    output = io.BytesIO()
    dataset.save_as(output)
    with pytest.raises(InvalidImageError) as raised:
        preprocess(output.getvalue())
    assert raised.value.reason is RejectionReason.UNSUPPORTED_FORMAT
    assert "High-Throughput JPEG 2000" in raised.value.detail


def test_dicom_without_preamble_is_read(sample_xray: Image.Image) -> None:
    """A DICOM file that starts at its 'DICM' prefix, without the 128-byte preamble, decodes like the full file."""
    data = dicom_bytes(sample_xray)
    assert np.array_equal(preprocess(data[128:]).pixels, preprocess(data).pixels)


def test_dicom_without_pixels_is_corrupt(sample_xray: Image.Image) -> None:
    """A DICOM file cut off inside its pixel data is rejected as corrupt."""
    data = dicom_bytes(sample_xray)
    with pytest.raises(InvalidImageError) as raised:
        preprocess(data[: len(data) // 2])
    assert raised.value.reason is RejectionReason.CORRUPT


def test_undecodable_dicom_pixels_log_nothing(sample_xray: Image.Image, caplog: pytest.LogCaptureFixture) -> None:
    """A DICOM whose JPEG frame no decoder can read is corrupt, and pydicom's loggers (its decoders log the failure
    with a traceback) write nothing while it is decoded."""
    dataset = dcmread(io.BytesIO(dicom_bytes(sample_xray, jpeg=True)))
    dataset.PixelData = encapsulate([b"\xff\xd8 not the rest of a JPEG"])
    dataset["PixelData"].is_undefined_length = True
    output = io.BytesIO()
    dataset.save_as(output)
    with caplog.at_level("DEBUG"), pytest.raises(InvalidImageError) as raised:
        preprocess(output.getvalue())
    assert raised.value.reason is RejectionReason.CORRUPT
    assert caplog.records == []
