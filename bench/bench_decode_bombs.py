"""Decode-cost bombs: the peak memory and time of decoding each one, in a fresh process per file.

Each file of ``infra.corpus.decode_cost_bombs`` (plus a 2,000 px film cut to 5% and a few hundred bytes declaring
4,000 x 4,000) goes through ``core.preprocessing.preprocess`` in its own Python process under a 6 GB address-space
limit (so a bomb can never take the machine down); the child reports its resident memory at rest (after imports)
and at its peak (``VmHWM``), the seconds the decode took, and the outcome.

Run with `python bench/bench_decode_bombs.py`; prints a markdown table.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "functions")]

from infra.corpus import declared_size_jpeg, decode_cost_bombs, encode, truncated_with_end_marker  # noqa: E402

SAFETY_LIMIT_BYTES = 6 * 2**30
"""Address-space limit of each child: far above any budget, far below what would hurt a shared machine."""

CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from scoring.isolated_decode import process_status_bytes
def high_water_mb():
    # VmHWM is this process's own peak: ru_maxrss would carry over the peak of the process that started it.
    return process_status_bytes("VmHWM") / 2**20
data = open(sys.argv[1], "rb").read()
preprocess(open(sys.argv[2], "rb").read())  # Warm: the decoders' own first-use cost is not the bomb's.
at_rest = high_water_mb()
started = time.perf_counter()
try:
    preprocess(data)
    outcome = "decoded"
except InvalidImageError as rejected:
    outcome = rejected.reason.value + ": " + rejected.detail
except MemoryError:
    outcome = "MemoryError"
seconds = time.perf_counter() - started
peak = high_water_mb()
print(json.dumps({"at_rest_mb": at_rest, "peak_mb": peak, "seconds": seconds, "outcome": outcome}))
"""


def measure(name: str, data: bytes, warm: Path, scratch: Path) -> dict[str, object]:
    """Decode ``data`` in a fresh process; its figures."""
    path = scratch / name
    path.write_bytes(data)
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(warm), str(SAFETY_LIMIT_BYTES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'functions'}", "PATH": "/usr/bin:/bin"},
    )
    if completed.returncode != 0:
        return {"name": name, "bytes": len(data), "outcome": f"child exited {completed.returncode}"}
    return {"name": name, "bytes": len(data), **json.loads(completed.stdout.strip().splitlines()[-1])}


def main() -> list[dict[str, object]]:
    sample = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
    film = Image.open(sample).convert("L").resize((2000, 1800), Image.Resampling.BICUBIC)
    files = {
        **decode_cost_bombs(),
        "film-2000-truncated-5pct.jpeg": truncated_with_end_marker(encode(film, "JPEG", quality=90)),
        "declares-4000.jpeg": declared_size_jpeg(4_000, 4_000),
    }
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch:
        warm = Path(scratch) / "warm.jpeg"
        warm.write_bytes(io.BytesIO(sample.read_bytes()).getvalue())
        for name, data in files.items():
            rows.append(measure(name, data, warm, Path(scratch)))
    print("| file | bytes | at rest MB | peak MB | decode s | outcome |\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['bytes']:,} | {row.get('at_rest_mb', 0):.0f} | {row.get('peak_mb', 0):.0f} "
            f"| {row.get('seconds', 0):.2f} | {row['outcome']} |"
        )
    return rows


if __name__ == "__main__":
    main()
