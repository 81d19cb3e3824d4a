"""Decoding one file in a forked child process under memory and time limits.

A file that makes the decoder exceed Lambda's memory or time kills the whole invocation, and with it every other
record of the batch. The pipeline decodes a record whose batch already failed once (SQS's
``ApproximateReceiveCount`` above 1) here: the child sets an address-space limit (``RLIMIT_AS``) on top of what it
inherited, decodes, and sends the result back through a pipe; the parent kills it when the anonymous memory it has
added since the fork passes the limit or the time limit passes. Neither figure would see the child reuse heap
the parent had freed but kept (the pages are already mapped and resident), so the parent first gives such pages
back to the kernel (glibc's ``malloc_trim``): a child that reuses them faults in new pages, which its resident
memory counts. A
child that runs out of memory or dies costs only its own record: it is rejected as ``DECOMPRESSION_BOMB``. A child
that runs out of time raises ``DecodeTimeoutError``, a transient fault: a slow decode on a busy machine is not a
verdict on the file, so the pipeline retries it a bounded number of times before ``DECODE_TIMEOUT``.
The pipe is a plain ``os.pipe``: Lambda has no ``/dev/shm`` for multiprocessing's queues.

First deliveries are not decoded here: a fork costs about 13 ms an image with the model loaded, 80% of the
per-image time (``bench/bench_isolation.py``); the checks before decoding (``core.decode_budget``,
``core.dicom_structure``, ``core.dicom_codestream``) bound what every shipped decoder is given instead.

The child decodes a hostile file, so what it sends back is read as data, never unpickled: a JSON header line (with
the patient age the file states, a number or null, for the validated-population check), then the raw bytes of the
grayscale image and of the model's pixels, whose lengths the header must account for exactly.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import select
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.preprocessing import DecodedImage, ImageFormat, decode, resize_for_model
from core.rejections import InvalidImageError, RejectionReason

OVER_BUDGET_DETAIL = "decoding exceeded the memory budget"
TIMEOUT_DETAIL = "decoding ran past its time budget on every allowed delivery"


class DecodeTimeoutError(RuntimeError):
    """The isolated decode ran past its wall time and was killed: transient, the record is retried."""


POLL_SECONDS = 0.01
"""How often the parent reads the child's memory while it waits."""


SLOWEST_FILM_SECONDS = 4.1
"""The slowest legitimate film the README admits, decoded alone in a child beside a training job that kept both
cores of a 2-core machine busy (median of 3): a 25-megapixel 12-bit JPEG 2000 lossless DICOM of 15.5 MB."""

DECODE_SECONDS = 15.0
"""Wall time of one isolated decode: more than three times ``SLOWEST_FILM_SECONDS``."""


@dataclass(frozen=True)
class IsolationLimits:
    """What one isolated decode may use."""

    memory_bytes: int = 384 * 2**20
    """Memory the child may add to what it inherited. The scoring function has 1,024 MB: about 250 MB at rest and
    the decoded films of the batch beside it leave room for this; a decode within the budget
    (``MAX_DECODED_BYTES``, 100 MB) needs well under it."""
    seconds: float = DECODE_SECONDS
    """Wall time of one decode before it is killed and retried (``DecodeTimeoutError``)."""


def decode_isolated(data: bytes, size: int, limits: IsolationLimits | None = None) -> tuple[DecodedImage, np.ndarray]:
    """``decode`` and ``resize_for_model`` of ``data`` in a child process: the decoded image and the model's
    pixels, or ``InvalidImageError`` (the file's own rejection, or ``DECOMPRESSION_BOMB`` when the child ran out
    of memory or died); ``DecodeTimeoutError`` when it ran out of time."""
    limits = limits or IsolationLimits()
    read_end, write_end = os.pipe()
    release_freed_heap()
    inherited = anonymous_bytes(os.getpid())
    # A garbage collection in the child would write to every object it inherited and so copy every page of the
    # parent's heap into the child's own memory; frozen objects are left alone.
    gc.freeze()
    try:
        with warnings.catch_warnings():
            # Python warns that forking a process with threads may deadlock the child if it takes a lock another
            # thread held. The child only decodes (Pillow, numpy, libjpeg-turbo), writes to its pipe and exits.
            warnings.filterwarnings("ignore", message=".*fork", category=DeprecationWarning)
            pid = os.fork()
    except OSError:  # No process could be started: a transient fault, the record is retried.
        gc.unfreeze()
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # pragma: no cover  # The child; coverage of it is not collected.
        os.close(read_end)
        _run_child(data, size, limits, write_end)
    gc.unfreeze()
    os.close(write_end)
    payload: bytes | None = None
    try:
        payload = _read_until(read_end, pid, inherited + limits.memory_bytes, limits.seconds)
    finally:
        os.close(read_end)
        completed = _reap(pid, kill=payload is None)
    # Only a child that wrote everything and exited cleanly has an outcome.
    decoded = _read_outcome(payload, size) if completed and payload else None
    if decoded is None:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, OVER_BUDGET_DETAIL)
    return decoded


def _write_outcome(decoded: DecodedImage, pixels: np.ndarray) -> bytes:
    """The child's message for a decoded file: a JSON header line, the grayscale image's bytes, the pixels."""
    header = {
        "format": decoded.image_format.value,
        "original": [decoded.original_width, decoded.original_height],
        "grayscale": list(decoded.grayscale.size),
        "age": decoded.stated_age_years,
    }
    return json.dumps(header).encode() + b"\n" + decoded.grayscale.tobytes() + np.ascontiguousarray(pixels).tobytes()


def _write_rejection(rejected: InvalidImageError) -> bytes:
    """The child's message for a file it rejected: its reason and fixed detail."""
    return json.dumps({"reason": rejected.reason.value, "detail": rejected.detail}).encode() + b"\n"


def _read_outcome(payload: bytes, size: int) -> tuple[DecodedImage, np.ndarray] | None:
    """The decoded image and pixels the child sent, raising the file's own rejection; None for a malformed message
    (treated as a child that failed)."""
    header_bytes, _, body = payload.partition(b"\n")
    try:
        header = json.loads(header_bytes)
        rejection = (RejectionReason(header["reason"]), str(header["detail"])) if "reason" in header else None
    except (ValueError, KeyError, TypeError):
        return None
    if rejection is not None:
        raise InvalidImageError(*rejection)
    try:
        width, height = (int(side) for side in header["grayscale"])
        original_width, original_height = (int(side) for side in header["original"])
        image_format = ImageFormat(header["format"])
        age = header["age"]
    except (ValueError, KeyError, TypeError):
        return None
    if width <= 0 or height <= 0 or len(body) != width * height + size * size:
        return None
    if age is not None and (isinstance(age, bool) or not isinstance(age, int | float) or not math.isfinite(age)):
        return None
    grayscale = Image.frombytes("L", (width, height), body[: width * height])
    pixels = np.frombuffer(body[width * height :], dtype=np.uint8).reshape(size, size, 1).copy()
    stated_age = None if age is None else float(age)
    return DecodedImage(grayscale, image_format, original_width, original_height, stated_age), pixels


def _run_child(data: bytes, size: int, limits: IsolationLimits, write_end: int) -> None:
    """Decode under the limits, write the outcome (nothing when it ran out of memory), and exit."""
    try:
        limit = process_status_bytes("VmSize") + limits.memory_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)  # A limit set above this process (a test harness's) can only be lowered.
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            decoded = decode(data, size)
            payload = _write_outcome(decoded, resize_for_model(decoded, size).pixels)
        except InvalidImageError as rejected:
            payload = _write_rejection(rejected)
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
    except BaseException:  # noqa: BLE001  # Out of memory or anything else: the parent sees no outcome.
        os._exit(1)
    os._exit(0)


def _read_until(read_end: int, pid: int, most_anonymous_bytes: int, seconds: float) -> bytes | None:
    """Everything the child writes before it closes the pipe, or None when its anonymous memory first passes
    ``most_anonymous_bytes``; ``DecodeTimeoutError`` when ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    while (remaining := deadline - time.monotonic()) > 0 and anonymous_bytes(pid) <= most_anonymous_bytes:
        ready, _, _ = select.select([read_end], [], [], min(remaining, POLL_SECONDS))
        if not ready:
            continue
        chunk = os.read(read_end, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    if deadline - time.monotonic() <= 0:
        raise DecodeTimeoutError(TIMEOUT_DETAIL)
    return None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None under a C library without it."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


def release_freed_heap() -> None:
    """Give every whole free page of the C heap back to the kernel (a no-op without ``malloc_trim``). Freed memory
    the heap keeps stays resident and mapped, and a forked child could reuse it unseen by both limits."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def anonymous_bytes(pid: int) -> int:
    """A process's resident anonymous memory (``RssAnon``; 0 once it has exited). A forked child starts with its
    parent's; pages it copies on write keep the figure, pages it allocates raise it: what it grows by is what it
    allocated. Reading it is cheap, unlike a walk of the pages (``smaps_rollup``), which would stall the child."""
    return process_status_bytes("RssAnon", pid)


def process_status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory figure of ``/proc/<pid>/status`` (``RssAnon``, ``VmSize``, ``VmHWM``) in bytes; 0 once the process
    has exited, or when the kernel does not report the figure."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:  # noqa: PTH123  # One line of a proc file.
            line = next((line for line in status if line.startswith(f"{field}:")), f"{field}: 0 kB")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024


def _reap(pid: int, *, kill: bool) -> bool:
    """Collect the child (killing it first when it overran) so no zombie is left; whether it exited with 0."""
    if kill:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
