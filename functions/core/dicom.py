"""DICOM decoding with pydicom, to 8-bit grayscale: uncompressed, RLE and JPEG 2000 natively (JPEG 2000 through
Pillow), and with pylibjpeg-libjpeg the JPEG syntaxes of clinical archives: baseline, Extended (12-bit), Lossless
(process 14, SV1 included) and JPEG-LS. A syntax no installed decoder handles is ``UNSUPPORTED_FORMAT`` naming it,
never a corrupt file. Files without the 128-byte preamble (starting ``DICM``) are read too.

Decoding cost is bounded before anything is decoded: the file's structure (elements, inflated size) by
``core.dicom_structure``; the pixels by ``MAX_DECODED_BYTES``, counted for the one frame that is decoded (the
first: a chest radiograph is one frame, and the others of a multi-frame file are never touched) with the
conversion's own arrays; an encapsulated frame's codestream must declare the image the data set states
(``core.dicom_codestream``), since its decoder decodes it at its own size; and the conversion to 8 bits works in
stripes, so no float copy of the whole image exists.

The conversion is the standard's display pipeline (``_to_grayscale``): the modality LUT, then the file's VOI LUT
or first window; a file without either is shown through a robust window that makes it look like the training
films, which a burned-in marker does not move. The file's ``PatientAge`` is read as a number of years for the
validated-population check (``core.population``), never as text that could travel further.

A DICOM file carries patient data in its elements (names, IDs, dates). Nothing read from the file reaches an
error, a warning or a log line: every rejection has a fixed text chosen here, and pydicom's own warnings and log
records, which quote element values, are silenced while a file is decoded.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.uid import UID, AllTransferSyntaxes

from core.dicom_codestream import StatedImage, check_first_frame
from core.dicom_structure import check_structure
from core.population import age_in_years
from core.rejections import MAX_DECODED_BYTES, MAX_PIXELS, InvalidImageError, RejectionReason

UNREADABLE_HEADER = "the DICOM header could not be read"
UNREADABLE_PIXELS = "the DICOM pixel data could not be decoded"
TOO_MANY_PIXELS = f"the DICOM image has more than {MAX_PIXELS:,} pixels"
UNKNOWN_SYNTAX = "the DICOM transfer syntax is not a recognised one"
OVER_BUDGET = f"the DICOM frame and its conversion need more than {MAX_DECODED_BYTES:,} bytes"
PREAMBLE_BYTES = 128
STRIPE_PIXELS = 1 << 18
"""Pixels converted at a time: the float64 arrays of the windowing are a few megabytes, whatever the image."""
WINDOW_SAMPLE_PIXELS = STRIPE_PIXELS
"""The robust window is estimated on a regular grid of at most about this many of the frame's pixels."""
_STRIPE_BYTES = 4 * 8 * max(STRIPE_PIXELS, WINDOW_SAMPLE_PIXELS)
"""What the conversion holds at most: four float64 arrays of one stripe's pixels, or of the window's sample."""


@dataclass(frozen=True)
class DicomFilm:
    """The first frame of a DICOM file as it is displayed, and the patient age the file states."""

    grayscale: Image.Image
    stated_age_years: float | None
    """``PatientAge`` in years; None when the file states none or its value cannot be read as an age."""


def decode_dicom(data: bytes) -> DicomFilm:
    """The first frame of a DICOM file as 8-bit grayscale, displayed as the standard says (``_to_grayscale``), and
    the patient age it states."""
    with _silenced_pydicom():
        dataset = _read_header(data)
        budgeted = _check_budget(dataset)
        stated_age = _stated_age(dataset)
        pixels = _read_pixels(dataset, budgeted)
        try:
            return DicomFilm(_to_grayscale(dataset, pixels), stated_age)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001  # Malformed LUT or rescale elements raise many types; all are corrupt.
            raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_PIXELS) from None


def _stated_age(dataset: Dataset) -> float | None:
    """The file's ``PatientAge`` in years (AS ``nnnD/W/M/Y``, or a plain number of years); a missing, empty or
    unreadable value states no age."""
    try:
        return age_in_years(dataset.get("PatientAge"))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # A malformed value raises many types in pydicom; it states no age.
        return None


def transfer_syntax_name(dataset: Dataset) -> str | None:
    """The standard name of the file's transfer syntax when pydicom knows it: never the UID as the file spells it,
    which may be anything."""
    uid = _transfer_syntax_uid(dataset)
    return next((syntax.name for syntax in AllTransferSyntaxes if syntax == uid), None)


def _transfer_syntax_uid(dataset: Dataset) -> str | None:
    """The transfer syntax UID of the file meta, as the file spells it; None without one."""
    uid = dataset.get("file_meta", Dataset()).get("TransferSyntaxUID")
    return None if uid is None else str(uid)


@contextmanager
def _silenced_pydicom() -> Iterator[None]:
    """pydicom warns and logs about malformed elements quoting their values (patient names, IDs): while a file is
    decoded neither reaches stderr or the logs (Lambda sends both to CloudWatch)."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled, propagated = pydicom_logger.disabled, pydicom_logger.propagate
    # Disabling the logger silences its own records; its children's (pydicom.pixels.decoders.base logs a failed
    # decode with its traceback) still reach the root's handlers unless the parent stops propagating them.
    pydicom_logger.disabled, pydicom_logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled, pydicom_logger.propagate = was_disabled, propagated


def _read_header(data: bytes) -> Dataset:
    # `from None` throughout: the chained exception's message quotes element values.
    if data.startswith(b"DICM"):
        data = bytes(PREAMBLE_BYTES) + data  # The preamble is optional in practice; pydicom expects one.
    check_structure(data)  # Elements and inflated size, counted before pydicom holds any of them.
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # pydicom raises many types for a malformed header; each is a corrupt file.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_HEADER) from None
    if rows * columns > MAX_PIXELS:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, TOO_MANY_PIXELS)
    return dataset


def _check_budget(dataset: Dataset) -> int:
    """Reject a file whose first frame, decoded, and the conversion's arrays would exceed ``MAX_DECODED_BYTES``:
    the frame (rows x columns x samples x whole bytes per sample), one byte per pixel of output (and per sample of
    a colour frame's 8-bit copy) and one stripe's float arrays; return those bytes. Other frames are not decoded
    and not counted. That the frame's codestream declares this image is checked next (``_check_codestream``)."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples = int(dataset.get("SamplesPerPixel", 1))
        bits = int(dataset.BitsAllocated)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # A missing or malformed element raises many types; each is a corrupt file.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_HEADER) from None
    if rows < 1 or columns < 1 or samples < 1 or bits < 1:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_HEADER)
    frame = rows * columns * samples * -(-bits // 8)
    output = rows * columns * (samples + 1 if samples > 1 else 1)
    if frame + output + _STRIPE_BYTES > MAX_DECODED_BYTES:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, OVER_BUDGET)
    return frame + output + _STRIPE_BYTES


def _check_codestream(dataset: Dataset, budgeted: int) -> None:
    """Refuse an encapsulated first frame whose codestream declares another image than the data set, or whose
    decoder would take the ``budgeted`` decode past the budget (``core.dicom_codestream``)."""
    uid = _transfer_syntax_uid(dataset)
    if uid is None or not UID(uid).is_encapsulated:
        return
    try:
        stated = StatedImage(
            rows=int(dataset.Rows),
            columns=int(dataset.Columns),
            samples=int(dataset.get("SamplesPerPixel", 1)),
            bits_allocated=int(dataset.BitsAllocated),
        )
        frames = int(dataset.get("NumberOfFrames") or 1)
        pixel_data = dataset.PixelData
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # A missing or malformed element raises many types; each is a corrupt file.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_PIXELS) from None
    check_first_frame(pixel_data, uid, stated, max(frames, 1), budgeted)


def _read_pixels(dataset: Dataset, budgeted: int) -> np.ndarray:
    if not _decodable(dataset):
        name = transfer_syntax_name(dataset)
        detail = f"DICOM transfer syntax {name} cannot be decoded" if name else UNKNOWN_SYNTAX
        raise InvalidImageError(RejectionReason.UNSUPPORTED_FORMAT, detail)
    _check_codestream(dataset, budgeted)
    try:
        dataset.pixel_array_options(index=0)  # The first frame only: the others are never decoded.
        pixels: np.ndarray = dataset.pixel_array
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # pydicom raises many types for missing or truncated pixel data.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_PIXELS) from None
    return pixels


def _decodable(dataset: Dataset) -> bool:
    """Whether an installed decoder handles the file's transfer syntax (pydicom raises RuntimeError, like a
    corrupt file, when the decoder's plugins are missing; that is checked here first). A file without a transfer
    syntax is left to pydicom."""
    uid = _transfer_syntax_uid(dataset)
    if uid is None:
        return True
    try:
        return bool(get_decoder(UID(uid)).is_available)
    except NotImplementedError:
        return False


def _to_grayscale(dataset: Dataset, pixels: np.ndarray) -> Image.Image:
    """The frame as 8-bit grayscale, as a viewer following the standard shows it: colour through Pillow's luminance;
    monochrome through the modality LUT (rescale slope and intercept, or a Modality LUT Sequence), then the first
    VOI LUT or else the first window when the file has one, its output range spanning black to white; a file with
    neither gets ``_RobustWindow``. MONOCHROME1 is inverted. Every step acts on each pixel alone, so the output is
    written a stripe of rows at a time: a few megabytes of floats, whatever the image."""
    if pixels.ndim == 3:
        return Image.fromarray(pixels.astype(np.uint8)).convert("L")
    inverted = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
    display = _voi_lut(dataset) or _window(dataset) or _RobustWindow.of(dataset, pixels)
    output = np.zeros(pixels.shape, dtype=np.uint8)
    if display is None:  # A constant image: black, or white for MONOCHROME1.
        output[:] = 255 if inverted else 0
        return Image.fromarray(output, mode="L")
    rows = max(1, STRIPE_PIXELS // max(1, pixels.shape[1]))
    for start in range(0, pixels.shape[0], rows):
        stripe = slice(start, start + rows)
        levels = display.levels(_modality_values(dataset, pixels[stripe]), inverted=inverted)
        output[stripe] = np.clip(np.round(np.nan_to_num(levels, nan=0.0)), 0, 255)
    return Image.fromarray(output, mode="L")


def _modality_values(dataset: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values through the modality LUT, as float64."""
    values: np.ndarray = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    return values


class _Display(Protocol):
    """Modality values to display levels (0 black to 255 white, not yet rounded or clipped)."""

    def levels(self, values: np.ndarray, *, inverted: bool) -> np.ndarray: ...


@dataclass(frozen=True)
class _VoiLut:
    """The first item of the VOI LUT Sequence: its output, 0 to 2^bits - 1 (the LUT Descriptor's third value),
    spans black to white."""

    dataset: Dataset
    first_mapped: int
    entries: int
    bits: int

    def levels(self, values: np.ndarray, *, inverted: bool) -> np.ndarray:
        # Input values are integers; those outside the LUT take its first or last entry (PS3.3 C.11.2.1.1).
        indices = np.clip(np.rint(values), self.first_mapped, self.first_mapped + self.entries - 1).astype(np.int64)
        fraction = np.asarray(apply_voi(indices, self.dataset, 0), dtype=np.float64) / ((1 << self.bits) - 1)
        return 255.0 * (1.0 - fraction if inverted else fraction)


def _voi_lut(dataset: Dataset) -> _VoiLut | None:
    """The file's VOI LUT, when its first item has a usable descriptor and data; None otherwise."""
    try:
        item = dataset["VOILUTSequence"].value[0]
        entries, first_mapped, bits = (int(value) for value in item.LUTDescriptor)
        if "LUTData" not in item or not (bits == 8 or 10 <= bits <= 16):
            return None
    except (KeyError, IndexError, AttributeError, TypeError, ValueError):
        return None
    # A descriptor's first value of 0 means 65,536 entries; the second is signed when the pixels are.
    return _VoiLut(dataset, first_mapped, entries or 2**16, bits)


@dataclass(frozen=True)
class _Window:
    """The first window (Window Center and Width) with its VOI LUT Function, as PS3.3 C.11.2.1.2 defines them; its
    output range spans black to white."""

    center: float
    width: float
    function: str

    def levels(self, values: np.ndarray, *, inverted: bool) -> np.ndarray:
        if self.function == "SIGMOID":
            # 1 / (1 + exp(-4 (x - c) / w)), written with tanh so that no value overflows.
            fraction = 0.5 * (1.0 + np.tanh(2.0 * (values - self.center) / self.width))
        elif self.function == "LINEAR_EXACT":
            fraction = np.clip((values - self.center) / self.width + 0.5, 0.0, 1.0)
        elif self.width > 1:
            fraction = np.clip((values - (self.center - 0.5)) / (self.width - 1) + 0.5, 0.0, 1.0)
        else:  # LINEAR with width 1: a step at the centre.
            fraction = (values > self.center - 0.5).astype(np.float64)
        return 255.0 * (1.0 - fraction if inverted else fraction)


_WINDOW_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


def _window(dataset: Dataset) -> _Window | None:
    """The file's first window, or None when it has none or its values cannot be used (the standard's minimum
    widths: at least 1 for LINEAR, above 0 otherwise)."""
    try:
        center, width = (_first(dataset["WindowCenter"].value), _first(dataset["WindowWidth"].value))
        function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if function not in _WINDOW_FUNCTIONS:
        function = "LINEAR"  # The standard's default, for a function it does not define.
    wide_enough = width >= 1 if function == "LINEAR" else width > 0
    if not (math.isfinite(center) and wide_enough):
        return None
    return _Window(center, width, function)


def _first(value: object) -> float:
    """The first of a multi-valued element's values (or its one value) as a number."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(cast(float, value))


ROBUST_PERCENTILES = (1.0, 99.0)
"""Where the window of a file without a VOI LUT or window is anchored, as percentiles of its modality values."""
TRAINING_FILM_LEVELS = (2.5, 210.5)
"""The 8-bit levels the training films have at ``ROBUST_PERCENTILES`` (their extreme values left out, as below):
the mean of the two classes' medians over the fit split of train, NORMAL (1, 221) and PNEUMONIA (4, 200), so neither
class's brightness is favoured. ``bench/bench_dicom_display.py`` recomputes them."""


@dataclass(frozen=True)
class _RobustWindow:
    """The display of a file that carries no VOI LUT or window: a straight line through its modality values that
    puts their 1st and 99th percentiles where the training films have theirs, so the film looks like the films the
    model learned from (a min-max stretch would not: one full-scale burned-in marker darkens the whole film).

    The percentiles leave out the values equal to the image's lowest and highest (a burned-in marker or annotation
    at full scale, saturated detector pixels, a flat collimation border at an extreme), however many pixels hold
    them; values beyond the line's 0-255 are clipped. They are taken on a regular grid of at most about
    ``WINDOW_SAMPLE_PIXELS`` pixels, so their cost is one stripe's whatever the image."""

    low: float
    high: float

    @classmethod
    def of(cls, dataset: Dataset, pixels: np.ndarray) -> _RobustWindow | None:
        """The window of a frame; None for a constant frame."""
        step = max(1, math.ceil(math.sqrt(pixels.size / WINDOW_SAMPLE_PIXELS)))
        sample = _modality_values(dataset, pixels[::step, ::step]).ravel()
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return None
        lowest, highest = float(sample.min()), float(sample.max())
        inner = sample[(sample > lowest) & (sample < highest)]
        low, high = lowest, highest  # Too few distinct values to anchor on: the full range.
        if inner.size:
            low, high = (float(value) for value in np.percentile(inner, ROBUST_PERCENTILES))
            if high <= low:
                low, high = lowest, highest
        return cls(low, high) if high > low else None

    def levels(self, values: np.ndarray, *, inverted: bool) -> np.ndarray:
        dark, bright = TRAINING_FILM_LEVELS
        fraction = (self.high - values if inverted else values - self.low) / (self.high - self.low)
        return dark + fraction * (bright - dark)
