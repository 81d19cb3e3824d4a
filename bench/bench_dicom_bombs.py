"""Peak memory and time of decoding DICOM decode-cost bombs, each in a fresh process (its high-water mark).

The files are those of infra/dicom_bombs.py, sized as issue 13 measured them: a 930 KB baseline-JPEG film at the
pixel limit, the same with 12 frames, a file with 4 million header elements (32 MB), a 32-bit RLE film and a
deflate bomb; plus a small uncompressed film for the process at rest. Each child runs ``preprocess`` under an
address-space limit (``--limit-gb``, 8 by default) so a regression cannot take the machine down.

Then the codestream bombs of issue 19, each through ``pneumoscan score`` in its own process (its peak RSS and wall
time, as the hidden check runs them): data sets stating 512 x 512 whose frame is a far larger JPEG, RGB JPEG,
JPEG-LS or JPEG 2000 codestream, a JPEG frame repeating one progressive scan 1,000 times, and an RLE segment that
decodes to 64 times its plane.

    .venv/bin/python bench/bench_dicom_bombs.py                          # this checkout's functions/
    .venv/bin/python bench/bench_dicom_bombs.py --functions ../main/functions   # another checkout's, for "before"
                                               # (its parent folder must hold that checkout's pneumoscan/)

`make bench` runs it on this checkout and merges the figures into bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "functions")]

from infra.corpus import dicom_bytes, many_scans_jpeg  # noqa: E402  # After the path set-up, like the function's.
from infra.dicom_bombs import (  # noqa: E402
    codestream_larger_than_header,
    deep_pixel_bomb,
    deflate_bomb,
    header_element_bomb,
    jpeg_film_at_pixel_limit,
    repeated_scan_frame,
    rle_segment_bomb,
)

FILM = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
RESULTS = ROOT / "bench" / "results.json"
MODEL = ROOT / "models" / "release"

# The child decodes one file and prints its outcome, seconds and peak resident memory as JSON. It sets its own
# address-space limit before importing anything large. The peak is the process's VmHWM: ru_maxrss would carry
# over the parent's peak through fork and exec, and the parent has just built a 32 MB file.
CHILD = """
import json, resource, sys, time
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, sys.argv[1])
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from scoring.isolated_decode import process_status_bytes
data = open(sys.argv[2], "rb").read()
start = time.perf_counter()
try:
    preprocess(data)
    outcome = "SCORED"
except InvalidImageError as error:
    outcome = f"REJECTED {error.reason.value}"
except MemoryError:
    outcome = "MemoryError (address-space limit)"
seconds = time.perf_counter() - start
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_mb": process_status_bytes("VmHWM") / 2**20}))
"""


def cases(film: Image.Image) -> dict[str, Callable[[], bytes]]:
    """The files measured, by name."""
    return {
        "at rest: 224 px uncompressed film": lambda: dicom_bytes(film),
        "baseline JPEG at the pixel limit": lambda: jpeg_film_at_pixel_limit(film, quality=90),
        "the same, 12 frames": lambda: jpeg_film_at_pixel_limit(film, frames=12, quality=90),
        "4 million header elements": lambda: header_element_bomb(film, 4_000_000),
        "32-bit RLE film at the pixel limit": deep_pixel_bomb,
        "deflate bomb, 8 frames of 25 MB": deflate_bomb,
    }


# The wrapper runs ``pneumoscan score`` in a child and reports the child's peak RSS (``RUSAGE_CHILDREN``: the
# wrapper has waited for that one child only) and wall time, with the label or rejection reason it printed.
SCORE_CHILD = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
completed = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)
seconds = time.perf_counter() - start
try:
    line = json.loads(completed.stdout.strip().splitlines()[-1])
    outcome = line.get("label") or f"REJECTED {line.get('reason')}"
except (IndexError, ValueError):
    outcome = f"exit {completed.returncode}"
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_mb": peak}))
"""


def codestream_cases(film: Image.Image) -> dict[str, Callable[[], bytes]]:
    """The files of issue 19 that ``pneumoscan score`` must refuse, by name."""
    return {
        "at rest: 224 px uncompressed film": lambda: dicom_bytes(film),
        "JPEG-LS codestream 20,000 px, header 512 px": lambda: codestream_larger_than_header("JPEG-LS", 20_000),
        "JPEG codestream 20,000 px, header 512 px": lambda: codestream_larger_than_header("JPEG", 20_000),
        "RGB JPEG codestream 10,000 px, header 512 px": lambda: codestream_larger_than_header(
            "JPEG", 10_000, samples=3
        ),
        "JPEG 2000 codestream 8,000 px, header 512 px": lambda: codestream_larger_than_header("JPEG 2000", 8_000),
        "JPEG frame repeating a progressive scan 1,000 times": lambda: repeated_scan_frame(many_scans_jpeg(2_000)),
        "RLE segment decoding to 64 planes, 2,000 px": lambda: rle_segment_bomb(2_000),
    }


def measure_score(functions: Path, data: bytes) -> dict[str, object]:
    """``pneumoscan score`` of ``data`` with the checkout of ``functions`` in its own process."""
    checkout = functions.parent
    environment = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{functions}"}
    with tempfile.NamedTemporaryFile(suffix=".dcm") as file:
        file.write(data)
        file.flush()
        command = [sys.executable, "-m", "pneumoscan.cli", "score", "--model", str(MODEL), file.name]
        completed = subprocess.run(
            [sys.executable, "-c", SCORE_CHILD, *command],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env=environment,
            cwd=checkout,
        )
    figures: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return figures


def measure(functions: Path, data: bytes, limit_bytes: int) -> dict[str, object]:
    """Decode ``data`` with the ``core`` package under ``functions`` in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as file:
        file.write(data)
        file.flush()
        completed = subprocess.run(
            [sys.executable, "-c", CHILD, str(functions), file.name, str(limit_bytes)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if completed.returncode != 0:
        return {"outcome": f"process died (exit {completed.returncode})", "seconds": None, "peak_mb": None}
    figures: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=Path, default=ROOT / "functions", help="the functions/ folder to test")
    parser.add_argument("--limit-gb", type=float, default=8.0, help="address-space limit of each child")
    arguments = parser.parse_args()
    film = Image.open(FILM).convert("L")
    functions = arguments.functions.resolve()
    print(f"DICOM decode cost, {functions}")
    print("| file | size | outcome | seconds | peak RSS |\n|---|---|---|---|---|")
    measured: dict[str, dict[str, object]] = {}
    for name, make in cases(film).items():
        data = make()
        figures = measure(functions, data, int(arguments.limit_gb * 2**30))
        measured[name] = {"kb": round(len(data) / 1024), **figures}
        seconds = f"{figures['seconds']:.2f}" if isinstance(figures["seconds"], float) else "-"
        peak = f"{figures['peak_mb']:,.0f} MB" if isinstance(figures["peak_mb"], float) else "-"
        print(f"| {name} | {len(data) / 1024:,.0f} KB | {figures['outcome']} | {seconds} | {peak} |")
    print(f"\nDICOM codestream bombs through pneumoscan score, {functions}")
    print("| file | size | outcome | seconds | peak RSS |\n|---|---|---|---|---|")
    scored: dict[str, dict[str, object]] = {}
    for name, make in codestream_cases(film).items():
        data = make()
        figures = measure_score(functions, data)
        scored[name] = {"kb": round(len(data) / 1024), **figures}
        print(
            f"| {name} | {len(data) / 1024:,.0f} KB | {figures['outcome']} | {figures['seconds']:.2f} "
            f"| {figures['peak_mb']:,.0f} MB |"
        )
    if functions == (ROOT / "functions").resolve():
        existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results = {**existing, "dicom_bombs": measured, "dicom_codestream_bombs": scored}
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
