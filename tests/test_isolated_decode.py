"""Decoding in a forked child: the same pixels as in-process, the file's own rejection, and a child that runs out
of memory or dies costs only its own file (DECOMPRESSION_BOMB with a fixed detail), one that runs out of time is a
transient fault."""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from core.preprocessing import decode, resize_for_model
from core.rejections import InvalidImageError, RejectionReason
from infra.corpus import decode_cost_bombs, dicom_bytes
from infra.dicom_films import with_patient_age
from scoring import isolated_decode
from scoring.isolated_decode import (
    DECODE_SECONDS,
    MALLOC_TRIM,
    OVER_BUDGET_DETAIL,
    SLOWEST_FILM_SECONDS,
    DecodeTimeoutError,
    IsolationLimits,
    decode_isolated,
)
from tests.conftest import REPOSITORY_ROOT

Encoder = Callable[..., bytes]


def test_isolated_decode_gives_the_in_process_pixels(sample_xray: Image.Image, encode: Encoder) -> None:
    """A valid film decodes in the child to exactly the image and model input of decoding it in-process."""
    data = encode(sample_xray.resize((2000, 1800)), "JPEG", quality=90)
    decoded, pixels = decode_isolated(data, 192)
    expected = decode(data, 192)
    assert decoded.original_width == 2000
    assert decoded.image_format is expected.image_format
    assert np.array_equal(np.asarray(decoded.grayscale), np.asarray(expected.grayscale))
    assert np.array_equal(pixels, resize_for_model(expected, 192).pixels)


@pytest.mark.parametrize("name", ["palette-5000.png", "sixteen-bit-5000.png"])
def test_costliest_files_within_the_budget_decode_under_the_default_limits(name: str) -> None:
    """The 25-megapixel palette and 16-bit PNGs, as costly as the decode budget allows, decode in the child within
    its default memory and time."""
    decoded, pixels = decode_isolated(decode_cost_bombs()[name], 192)
    assert decoded.original_width == 5_000
    assert pixels.shape == (192, 192, 1)


def test_file_keeps_its_own_rejection(sample_xray: Image.Image, encode: Encoder) -> None:
    """A corrupt file decoded in the child is rejected for what it is, not as a bomb."""
    data = encode(sample_xray, "JPEG")
    with pytest.raises(InvalidImageError) as raised:
        decode_isolated(data[: len(data) // 2], 192)
    assert raised.value.reason is RejectionReason.CORRUPT


def test_child_over_its_memory_is_a_bomb() -> None:
    """A 25-megapixel 16-bit PNG (about 80 MB to decode) under a smaller memory limit is rejected as a
    decompression bomb with the fixed detail."""
    with pytest.raises(InvalidImageError) as raised:
        decode_isolated(decode_cost_bombs()["sixteen-bit-5000.png"], 192, IsolationLimits(memory_bytes=24 * 2**20))
    assert raised.value.reason is RejectionReason.DECOMPRESSION_BOMB
    assert raised.value.detail == OVER_BUDGET_DETAIL


@pytest.fixture
def heap_with_freed_memory() -> Iterator[None]:
    """The C heap holding about 190 MB it has freed but kept, resident, as a long-running process's heap may: a
    30 MB block freed first raises glibc's threshold for mapping large blocks on their own, so twelve 16 MB blocks
    come from the heap, and a block allocated after them keeps the heap from shrinking when they are freed."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def touched(size: int) -> int:
        block = libc.malloc(size)
        assert block
        libc.memset(block, 1, size)
        return int(block)

    libc.free(touched(30 * 2**20))
    blocks = [touched(16 * 2**20) for _ in range(12)]
    guard = touched(256 * 2**10)
    for block in blocks:
        libc.free(block)
    yield
    libc.free(guard)


@pytest.mark.skipif(MALLOC_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
@pytest.mark.usefixtures("heap_with_freed_memory")
def test_child_reusing_heap_its_parent_freed_is_still_a_bomb() -> None:
    """A parent whose heap keeps memory it freed still sees a child that decodes into it: the 25-megapixel 16-bit
    PNG under a smaller memory limit is rejected as a decompression bomb."""
    with pytest.raises(InvalidImageError) as raised:
        decode_isolated(decode_cost_bombs()["sixteen-bit-5000.png"], 192, IsolationLimits(memory_bytes=24 * 2**20))
    assert raised.value.reason is RejectionReason.DECOMPRESSION_BOMB


def test_child_over_its_time_is_a_transient_timeout(
    monkeypatch: pytest.MonkeyPatch, sample_xray: Image.Image, encode: Encoder
) -> None:
    """A child still decoding when its time runs out is killed (no zombie left) and raises DecodeTimeoutError, a
    transient fault, never a verdict on the file."""

    def stalled(data: bytes, size: int) -> None:
        signal.pause()  # Never returns: the decode outlives any time limit.

    monkeypatch.setattr(isolated_decode, "decode", stalled)
    with pytest.raises(DecodeTimeoutError):
        decode_isolated(encode(sample_xray, "JPEG"), 192, IsolationLimits(seconds=0.2))
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_time_budget_has_room_for_the_slowest_film() -> None:
    """The default time of one decode is at least three times the slowest legitimate film measured beside a busy
    CPU, and the README states both figures."""
    assert IsolationLimits().seconds == DECODE_SECONDS >= 3 * SLOWEST_FILM_SECONDS
    readme = (REPOSITORY_ROOT / "README.md").read_text()
    assert f"{DECODE_SECONDS:.0f} s" in readme and f"{SLOWEST_FILM_SECONDS} s" in readme


def test_killed_child_is_a_bomb(monkeypatch: pytest.MonkeyPatch, sample_xray: Image.Image, encode: Encoder) -> None:
    """A child killed while decoding (as the out-of-memory killer would) rejects only its file, and leaves no
    zombie."""

    def killed(data: bytes, size: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(isolated_decode, "decode", killed)
    with pytest.raises(InvalidImageError) as raised:
        decode_isolated(encode(sample_xray, "JPEG"), 192)
    assert raised.value.detail == OVER_BUDGET_DETAIL
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def _well_formed_but(age: str) -> bytes:
    """A 4 x 4 film's message, complete but for its age field (the model's pixels for size 192)."""
    header = f'{{"format": "DICOM", "original": [4, 4], "grayscale": [4, 4], "age": {age}}}\n'
    return header.encode() + b"\0" * (16 + 192 * 192)


@pytest.mark.parametrize(
    "message",
    [
        pickle.dumps({"format": "JPEG"}),
        b'{"format": "JPEG", "original": [1, 1], "grayscale": [4, 4], "age": null}\n' + b"\0" * 3,
        _well_formed_but('"062Y"'),
        _well_formed_but("true"),
        _well_formed_but("NaN"),
    ],
    ids=["pickle", "short", "age-as-text", "age-as-boolean", "age-not-finite"],
)
def test_child_message_is_read_as_data(
    monkeypatch: pytest.MonkeyPatch, sample_xray: Image.Image, encode: Encoder, message: bytes
) -> None:
    """What the child sends back is parsed, never unpickled: a pickle, a header whose lengths the bytes do not
    match, or an age that is not a number of years, is a failed child."""
    monkeypatch.setattr(isolated_decode, "_write_outcome", lambda decoded, pixels: message)
    with pytest.raises(InvalidImageError) as raised:
        decode_isolated(encode(sample_xray, "JPEG"), 192)
    assert raised.value.detail == OVER_BUDGET_DETAIL


def test_stated_age_comes_back_from_the_child(sample_xray: Image.Image) -> None:
    """A DICOM's stated patient age travels back from the child as years (for the validated-population check);
    a file that states none comes back with none."""
    film = dicom_bytes(sample_xray)
    decoded, _ = decode_isolated(with_patient_age(film, "030M"), 192)
    assert decoded.stated_age_years == 2.5
    decoded, _ = decode_isolated(with_patient_age(film, None), 192)
    assert decoded.stated_age_years is None
