"""A generated corpus of hostile files and unusual-but-valid X-rays, for the soak test and the test suite.

Every hostile file names the rejection reason it must get; every valid variant is made from a real X-ray and must
be scored. Nothing here is downloaded: the files are built from the repository's samples.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from core.rejections import RejectionReason
from core.results import Status
from infra.dicom_bombs import (
    deep_pixel_bomb,
    deflate_bomb,
    header_element_bomb,
    jpeg_film_at_pixel_limit,
    with_private_elements,
)
from infra.non_radiographs import NonRadiograph, non_radiographs

CLINICAL_DICOM = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dicom" / "jpeg-lossless-sv1.dcm"
"""A real film in JPEG Lossless SV1, 12 bits: the clinical archives' syntax (written by tests/dicom_fixtures.py)."""


@dataclass(frozen=True)
class CorpusFile:
    """One file to upload, with the outcome it must end in."""

    name: str
    body: bytes
    expected_status: Status
    expected_reason: RejectionReason | None = None


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def dicom_bytes(image: Image.Image, *, jpeg: bool = False, bits: int = 16, monochrome1: bool = False) -> bytes:
    """A single-frame grayscale DICOM of ``image``: uncompressed (12 of 16 bits, or 8 bits) or baseline JPEG."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = image.height, image.width
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.PixelRepresentation = 0
    gray = np.asarray(image.convert("L"))
    if monochrome1:
        gray = 255 - gray
    if jpeg:
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        dataset.PixelData = encapsulate([encode(Image.fromarray(gray), "JPEG", quality=95)])
        dataset["PixelData"].is_undefined_length = True
    elif bits == 8:
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        dataset.PixelData = gray.tobytes()
    else:
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.PixelData = (gray.astype(np.uint16) * 16).tobytes()
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


PATIENT_MARKERS = ("MRN-0012345", "Quarrington", "Zelphine")
"""Patient-like strings planted in files; none may ever appear in a result, a log line or an event."""
PLANTED = b"Quarrington^Zelphine MRN-0012345"
"""What is planted: a patient name and a record number (an even number of bytes, as DICOM values are)."""
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_TEXT_ELEMENTS = {
    "SpecificCharacterSet": "ISO_IR 100",
    "PatientName": "Doe^Jane",
    "PatientID": "ID",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "PatientAge": "005Y",
    "PatientComments": "comment",
    "AccessionNumber": "A1",
    "StudyID": "S1",
    "StudyDate": "20240101",
    "StudyTime": "120000",
    "StudyDescription": "chest",
    "SeriesDescription": "PA",
    "ImageComments": "comment",
    "InstitutionName": "hospital",
    "InstitutionAddress": "street",
    "ReferringPhysicianName": "Roe^John",
    "OperatorsName": "Poe^Jim",
    "StationName": "station",
    "Manufacturer": "maker",
    "BodyPartExamined": "CHEST",
    "PixelSpacing": [0.1, 0.1],
    "NumberOfFrames": "1",
    "WindowCenter": "2048",  # The window of dicom_bytes' 12-bit values: the film shows as it is.
    "WindowWidth": "4096",
    "RescaleIntercept": "0",
    "RescaleSlope": "1",
}


def patient_data_files(film: Image.Image) -> dict[str, bytes]:
    """Files holding patient-like text (``PLANTED``) where a malicious or careless sender could put it: an
    identified DICOM with a patient name and record number in every free-text element; one DICOM per text
    element (file meta included) with ``PLANTED`` as that element's raw, possibly malformed, value; and corrupt
    JPEG, PNG and DICOM files that carry it."""
    small = film.resize((256, 256))
    dataset = dcmread(io.BytesIO(dicom_bytes(small)))
    for keyword, value in _TEXT_ELEMENTS.items():
        setattr(dataset, keyword, value)
    files: dict[str, bytes] = {}
    for element in [*dataset.file_meta, *dataset]:
        if element.VR in _TEXT_VRS:
            planted = dcmread(io.BytesIO(_saved(dataset)))
            group = planted.file_meta if element.tag.group == 2 else planted
            group[element.tag] = RawDataElement(element.tag, element.VR, len(PLANTED), PLANTED, 0, False, True)
            files[f"planted-{element.keyword}.dcm"] = _saved(planted)
    identified = dcmread(io.BytesIO(_saved(dataset)))
    for element in identified:
        if element.VR in {"PN", "LO", "SH", "LT", "ST", "UT", "UC"}:
            element.value = PLANTED.decode()[:16] if element.VR in {"SH"} else PLANTED.decode()
    files["identified.dcm"] = _saved(identified)
    files["identified-truncated.dcm"] = files["identified.dcm"][: len(files["identified.dcm"]) * 2 // 3]
    # The decode budgets' paths: too many elements (rejected before parsing) and a deflated data set (inflated and
    # counted first).
    files["identified-too-many-elements.dcm"] = with_private_elements(files["identified.dcm"], 20_001)
    identified.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    files["identified-deflated.dcm"] = _saved(identified)
    jpeg = encode(small, "JPEG")
    files["commented-truncated.jpeg"] = with_jpeg_segment(jpeg, JPEG_COMMENT, PLANTED)[: len(jpeg) // 2]
    text = PngInfo()
    text.add_text("Patient", PLANTED.decode())
    png = encode(small, "PNG", pnginfo=text)
    files["text-chunk-truncated.png"] = png[: len(png) // 2]
    files["record.txt.jpeg"] = PLANTED * 10
    return files


def _saved(dataset: Dataset) -> bytes:
    output = io.BytesIO()
    dataset.save_as(output)
    return output.getvalue()


def decompression_bomb() -> bytes:
    """A PNG of about 30 kB that claims a 12,000 x 12,000 canvas (144 megapixels)."""
    return encode(Image.new("1", (12_000, 12_000)), "PNG", optimize=True)


def hostile_files(film: Image.Image, max_image_bytes: int) -> list[CorpusFile]:
    """Files that must each be REJECTED with a specific reason."""
    jpeg = encode(film, "JPEG", quality=90)
    noise = Image.fromarray(np.random.default_rng(7).integers(0, 256, (300, 300), dtype=np.uint8))
    oversized = b"\xff\xd8\xff\xe0" + np.random.default_rng(8).bytes(max_image_bytes + 1024)
    return [
        CorpusFile("zero-bytes.jpeg", b"", Status.REJECTED, RejectionReason.EMPTY),
        CorpusFile("truncated.jpeg", jpeg[: len(jpeg) // 2], Status.REJECTED, RejectionReason.CORRUPT),
        CorpusFile(
            "random-bytes.jpeg",
            np.random.default_rng(9).bytes(20_000),
            Status.REJECTED,
            RejectionReason.UNSUPPORTED_FORMAT,
        ),
        CorpusFile(
            "notes.jpeg", b"patient notes, not an image\n" * 20, Status.REJECTED, RejectionReason.UNSUPPORTED_FORMAT
        ),
        CorpusFile(
            "page.jpeg",
            b"<!DOCTYPE html><html><body><h1>Login</h1></body></html>",
            Status.REJECTED,
            RejectionReason.UNSUPPORTED_FORMAT,
        ),
        CorpusFile("one-pixel.png", encode(Image.new("L", (1, 1)), "PNG"), Status.REJECTED, RejectionReason.TOO_SMALL),
        CorpusFile("bomb.png", decompression_bomb(), Status.REJECTED, RejectionReason.DECOMPRESSION_BOMB),
        CorpusFile("oversized.jpeg", oversized, Status.REJECTED, RejectionReason.TOO_LARGE),
        CorpusFile("animation.gif", encode(noise, "GIF"), Status.REJECTED, RejectionReason.UNSUPPORTED_FORMAT),
        CorpusFile("scan.tiff", encode(film, "TIFF"), Status.REJECTED, RejectionReason.UNSUPPORTED_FORMAT),
        CorpusFile("scan.bmp", encode(film, "BMP"), Status.REJECTED, RejectionReason.UNSUPPORTED_FORMAT),
        *dicom_bombs(film),
        *decode_cost_files(film),
    ]


def dicom_bombs(film: Image.Image) -> list[CorpusFile]:
    """DICOM files over the decode budgets (infra/dicom_bombs.py), each under 2 MB: 200,000 header elements, a
    32-bit film at the pixel limit, a deflated data set that inflates to 200 MB."""
    bomb = RejectionReason.DECOMPRESSION_BOMB
    return [
        CorpusFile("header-elements.dcm", header_element_bomb(film, 200_000), Status.REJECTED, bomb),
        CorpusFile("deep-pixels.dcm", deep_pixel_bomb(), Status.REJECTED, bomb),
        CorpusFile("deflate-bomb.dcm", deflate_bomb(), Status.REJECTED, bomb),
    ]


def decode_cost_files(film: Image.Image) -> list[CorpusFile]:
    """Files within the pixel limit that are over a decode budget (bytes or scans) or beyond the pixel limit in a
    few hundred bytes, and films cut short that libjpeg and zlib would decode with a warning or partly."""
    bombs = decode_cost_bombs()
    bomb = Status.REJECTED, RejectionReason.DECOMPRESSION_BOMB
    corrupt = Status.REJECTED, RejectionReason.CORRUPT
    large = encode(film.resize((2000, 1800), Image.Resampling.BICUBIC), "JPEG", quality=90)
    png = encode(film, "PNG")
    return [
        *(CorpusFile(name, bombs[name], *bomb) for name in BUDGET_BOMBS),
        # Within the budget, these decode to a blank frame, which the model's input gate refuses.
        *(CorpusFile(name, bombs[name], Status.REJECTED, RejectionReason.NOT_A_CHEST_XRAY) for name in BLANK_BOMBS),
        CorpusFile("declares-4000.jpeg", declared_size_jpeg(4_000, 4_000), *corrupt),
        CorpusFile("truncated-5pct-with-end.jpeg", truncated_with_end_marker(large), *corrupt),
        CorpusFile("truncated-with-end.png", png[: len(png) // 20] + png[-12:], *corrupt),
    ]


def valid_variants(film: Image.Image) -> list[CorpusFile]:
    """Unusual but valid encodings of a real X-ray that must each be SCORED."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Stored rotated; the viewer turns it 90 degrees clockwise.
    large = film.resize((1800, 1600), Image.Resampling.BICUBIC)
    variants: list[tuple[str, Callable[[], bytes]]] = [
        ("sixteen-bit.png", lambda: encode(Image.fromarray(np.asarray(film, dtype=np.uint16) * 257), "PNG")),
        ("cmyk.jpeg", lambda: encode(film.convert("CMYK"), "JPEG", quality=92)),
        ("palette.png", lambda: encode(film.convert("P"), "PNG")),
        ("rgba.png", lambda: encode(film.convert("RGBA"), "PNG")),
        ("progressive.jpeg", lambda: encode(film, "JPEG", quality=92, progressive=True)),
        ("exif-rotated.jpeg", lambda: encode(film.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())),
        ("full-resolution.jpeg", lambda: encode(large, "JPEG", quality=90)),
        ("uncompressed.dcm", lambda: dicom_bytes(film)),
        ("baseline-jpeg.dcm", lambda: dicom_bytes(film, jpeg=True)),
        # A 5,000 x 5,000 film in three frames (1.3 MB; only the first is decoded) and a clinical-syntax film.
        ("pixel-limit-frames.dcm", lambda: jpeg_film_at_pixel_limit(film, frames=3, quality=50)),
        ("jpeg-lossless-sv1.dcm", CLINICAL_DICOM.read_bytes),
        ("with space.jpeg", lambda: encode(film, "JPEG", quality=92)),
        ("plus+sign.jpeg", lambda: encode(film, "JPEG", quality=92)),
        ("ünïcødé 肺.jpeg", lambda: encode(film, "JPEG", quality=92)),
    ]
    return [CorpusFile(name, make(), Status.SCORED) for name, make in variants]


def non_radiograph_files() -> list[CorpusFile]:
    """The first file of each kind in the non-radiograph set, each to be REJECTED as NOT_A_CHEST_XRAY by the model's
    input gate."""
    first_of_each: dict[str, NonRadiograph] = {}
    for item in non_radiographs():
        first_of_each.setdefault(item.category, item)
    return [
        CorpusFile(
            f"not-an-x-ray-{category.replace(' ', '-')}-{item.name}",
            item.data,
            Status.REJECTED,
            RejectionReason.NOT_A_CHEST_XRAY,
        )
        for category, item in first_of_each.items()
    ]


def build_corpus(sample: Path, max_image_bytes: int) -> list[CorpusFile]:
    """The whole corpus, from one real X-ray, and the non-radiographs."""
    film = Image.open(sample).convert("L")
    return hostile_files(film, max_image_bytes) + valid_variants(film) + non_radiograph_files()


MEMORY_HOG_MARKER = b"pneumoscan soak: this decode exhausts memory"
"""Carried in a comment segment of ``memory_hog``; the soak's fault plan makes decoding such a file allocate until
its process is killed (``FaultPlan.decoder_memory_hog``)."""


MEMORY_HOG_NAME = "memory-hog.jpeg"
"""The memory hog's file name: the soak uploads it first, and its fault plan never fails reading it."""


def memory_hog(film: Image.Image) -> CorpusFile:
    """A valid JPEG carrying ``MEMORY_HOG_MARKER``: with the fault plan's hog, a file whose decoding exceeds
    Lambda's memory, the kind of file no budget foresaw. It kills its invocation the first time, and is rejected as
    a decompression bomb once its record is decoded in isolation."""
    jpeg = with_jpeg_segment(encode(film, "JPEG", quality=90), JPEG_COMMENT, MEMORY_HOG_MARKER)
    return CorpusFile(MEMORY_HOG_NAME, jpeg, Status.REJECTED, RejectionReason.DECOMPRESSION_BOMB)


JPEG_COMMENT = 0xFE
"""The marker of a JPEG comment segment (COM)."""


def with_jpeg_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """The JPEG with a marker segment holding ``payload`` inserted right after its start-of-image marker."""
    segment = bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


BOMB_SIDE = 5_000
"""Side of the decode-cost bombs: exactly the pixel limit (25 megapixels), so only their cost per pixel is hostile."""


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """The marker, start and end of each segment of a JPEG from its first marker after SOI to EOI; a scan's segment
    runs to the end of its entropy-coded data (to the next marker that is neither stuffing nor a restart)."""
    segments: list[tuple[int, int, int]] = []
    position = 2
    while position + 1 < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append((marker, position, end))
        position = end
    return segments


def many_scans_jpeg(side: int = BOMB_SIDE, scans: int = 1_000) -> bytes:
    """A progressive gray JPEG of ``side`` x ``side`` with ``scans`` scans (its last refinement scan repeated): a
    few hundred kilobytes whose every scan makes libjpeg walk every block of the image again."""
    progressive = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    segments = _jpeg_segments(progressive)
    last_scan = max(index for index, (marker, _, _) in enumerate(segments) if marker == 0xDA)
    _, start, end = segments[last_scan]
    # The last scan keeps the Huffman table that precedes it, so each copy decodes with the right table.
    table_start = segments[last_scan - 1][1] if segments[last_scan - 1][0] == 0xC4 else start
    repeated = progressive[table_start:end] * (scans - sum(marker == 0xDA for marker, _, _ in segments))
    return progressive[:end] + repeated + progressive[end:]


def declared_size_jpeg(width: int, height: int) -> bytes:
    """A JPEG of a few hundred bytes whose header declares ``width`` x ``height``: the start of a tiny film's scan,
    then the end marker. libjpeg fills the missing data with gray and only warns."""
    tiny = encode(Image.new("L", (64, 64), 100), "JPEG", quality=50)
    segments = _jpeg_segments(tiny)
    frame = next(start for marker, start, _ in segments if marker in {0xC0, 0xC1, 0xC2})
    scan_start, scan_end = next((start, end) for marker, start, end in segments if marker == 0xDA)
    header_length = int.from_bytes(tiny[scan_start + 2 : scan_start + 4], "big") + 2
    patched = bytearray(tiny[: min(scan_end, scan_start + header_length + 8)])
    patched[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched) + b"\xff\xd9"


def truncated_with_end_marker(data: bytes, share: float = 0.05) -> bytes:
    """The first ``share`` of a JPEG, then its end marker: a film cut short that libjpeg decodes with a warning."""
    return data[: int(len(data) * share)] + b"\xff\xd9"


BUDGET_BOMBS = ("gray-alpha-5000.png", "cmyk-5000.jpeg", "scans-1000.jpeg", "declares-8900.jpeg")
"""The decode-cost bombs that are over a budget; the palette and 16-bit ones decode within it."""

BLANK_BOMBS = ("palette-5000.png", "sixteen-bit-5000.png")
"""The decode-cost bombs that decode within the budget, to blank frames."""


def decode_cost_bombs() -> dict[str, bytes]:
    """Small files within the pixel limit whose decoding costs many bytes per pixel or many passes, by name."""
    side = (BOMB_SIDE, BOMB_SIDE)
    sixteen_bit = np.zeros(side, dtype=np.uint16)
    sixteen_bit[0, 0] = 65_535
    return {
        "palette-5000.png": encode(Image.new("P", side), "PNG", optimize=True),
        "sixteen-bit-5000.png": encode(Image.fromarray(sixteen_bit), "PNG", optimize=True),
        "gray-alpha-5000.png": encode(Image.new("LA", side), "PNG", optimize=True),
        "cmyk-5000.jpeg": encode(Image.new("CMYK", side), "JPEG", quality=50),
        "scans-1000.jpeg": many_scans_jpeg(),
        "declares-8900.jpeg": declared_size_jpeg(8_900, 8_900),
    }
