"""Native libraries' noise on standard error, dropped: LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate
for CPU.`` from C++ for every interpreter it builds, straight to file descriptor 2, with no setting to silence it."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

NOISE = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)


class LineFilter:
    """Passes bytes through as they come, except whole lines that start with one of ``noise``. Text that could still
    become a noise line is held back until its line ends; anything else (a progress bar's ``\\r`` updates) goes out
    at once."""

    def __init__(self, noise: tuple[bytes, ...] = NOISE) -> None:
        self._noise = noise
        self._held = b""
        self._at_line_start = True

    def feed(self, data: bytes) -> bytes:
        """The part of what was written so far that can be passed on now."""
        out = bytearray()
        self._held += data
        while self._held:
            if not self._at_line_start:
                end = self._held.find(b"\n")
                if end < 0:
                    out += self._held
                    self._held = b""
                    break
                out += self._held[: end + 1]
                self._held = self._held[end + 1 :]
                self._at_line_start = True
                continue
            end = self._held.find(b"\n")
            line = self._held if end < 0 else self._held[: end + 1]
            if end < 0 and any(phrase.startswith(line) or line.startswith(phrase) for phrase in self._noise):
                break  # Wait for the end of a line that may be noise.
            if not any(line.startswith(phrase) for phrase in self._noise):
                out += line
            self._held = self._held[len(line) :]
            self._at_line_start = end >= 0
        return bytes(out)

    def flush(self) -> bytes:
        """Whatever was held back, once nothing more will come."""
        held, self._held = self._held, b""
        return b"" if any(held.startswith(phrase) for phrase in self._noise) else held


@contextlib.contextmanager
def filtered_stderr(noise: tuple[bytes, ...] = NOISE) -> Iterator[None]:
    """Route file descriptor 2 (Python's and native code's writes alike) through a ``LineFilter`` while inside."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    line_filter = LineFilter(noise)

    def copy() -> None:
        while data := os.read(read_end, 65536):
            os.write(original, line_filter.feed(data))
        os.write(original, line_filter.flush())

    thread = threading.Thread(target=copy, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # Closes the pipe's last write end, so the copier reads to the end and stops.
        thread.join(timeout=5)
        os.close(read_end)
        os.close(original)
