"""Deployment size and cold start: `sam build` (no Docker) of the scoring function and the result publisher,
unzipped and zipped, beside the scoring function built without functions/slim_package.py (the reference, built in
the same run); what each package costs on disk and at import; and the cold start of both.

The cold start is Lambda's: a new Python 3.12 process (the runtime's version; ``LAMBDA_PYTHON`` or the first 3.12
found) with the function's folder first on its path and boto3 after it (the runtime's own, installed once for the
bench, compiled as the runtime ships it) and ``LAMBDA_TASK_ROOT`` set, writing no ``.pyc`` (Lambda's code folder
is read-only), timed from its start to its first result: the handler's imports, the model's load and one film
scored. Slim and reference run in turn, five times each; medians. Without Python 3.12 only the sizes are measured.

Run with `make bench`; merges its figures into bench/results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The build script lives beside the function folders, outside every installed package.
sys.path.append(str(ROOT / "functions"))
from slim_package import lambda_python  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"
SAM = ROOT / ".venv-infra" / "bin" / "sam"
LAMBDA_UNZIPPED_LIMIT_MB = 250
ZIP_BAR_MB = 60.0
COLD_START_BAR_S = 0.5
COLD_RUNS = 5
BOTO3 = "boto3==1.44.8"
"""The runtime's boto3 for the cold start (requirements.lock's pin)."""
SAMPLE = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"

COLD_START = """
import sys, time
started = time.perf_counter()
function, runtime, model, film = sys.argv[1:5]
sys.path[:0] = [function]
sys.path.append(runtime)
from pathlib import Path
import scoring.handler  # The Lambda's own imports: boto3, Powertools and its tracer.
from scoring.classifier import Classifier
from scoring.scorer import score_files
imported = time.perf_counter()
classifier = Classifier.from_directory(Path(model))
loaded = time.perf_counter()
[result] = score_files(classifier, [Path(film).read_bytes()])
print(imported - started, loaded - imported, time.perf_counter() - loaded, flush=True)
"""


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def build(scratch: Path, python: str | None) -> tuple[Path, Path]:
    """The template's functions as `sam build` makes them, and the scoring function's reference (``SLIM=0``)."""
    environment = {**os.environ, "SAM_CLI_TELEMETRY": "0", "PATH": f"{SAM.parent}:{os.environ['PATH']}"}
    if python is not None:
        environment["LAMBDA_PYTHON"] = python
    built = scratch / "build"
    subprocess.run(
        [str(SAM), "build", "--template", str(ROOT / "template.yaml"), "--build-dir", str(built)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env=environment,
    )
    reference = scratch / "reference"
    subprocess.run(
        ["make", "build-ScoringFunction", "SLIM=0", f"ARTIFACTS_DIR={reference}", f"PYTHON={sys.executable}"],
        cwd=ROOT / "functions",
        check=True,
        capture_output=True,
    )
    return built, reference


def zipped_mb(folder: Path, scratch: Path, name: str) -> float:
    archive = shutil.make_archive(str(scratch / name), "zip", folder)
    return round(Path(archive).stat().st_size / 2**20, 1)


def package_sizes(slim: Path, reference: Path) -> list[dict[str, Any]]:
    """On-disk MB of each top-level entry of the reference folder of 0.5 MB or more, beside what is left of it."""
    rows = []
    for entry in sorted(reference.iterdir()):
        before = folder_bytes(entry) if entry.is_dir() else entry.stat().st_size
        if before < 2**19:
            continue
        kept = slim / entry.name
        after = (folder_bytes(kept) if kept.is_dir() else kept.stat().st_size) if kept.exists() else 0
        rows.append({"entry": entry.name, "reference_mb": round(before / 2**20, 1), "slim_mb": round(after / 2**20, 1)})
    return sorted(rows, key=lambda row: -row["reference_mb"])


def runtime_folder(python: str, scratch: Path) -> Path:
    """boto3 installed for Python 3.12 and compiled, standing in for the runtime's own copy."""
    runtime = scratch / "runtime"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(runtime),
         "--implementation", "cp", "--python-version", "3.12", "--only-binary=:all:",
         "--platform", "manylinux2014_x86_64", BOTO3],
        check=True,
        capture_output=True,
    )  # fmt: skip
    subprocess.run([python, "-m", "compileall", "-q", str(runtime)], check=True, capture_output=True)
    return runtime


def lambda_environment(function: Path) -> dict[str, str]:
    """The environment of a Lambda execution environment, as far as the imports see it: ``LAMBDA_TASK_ROOT`` makes
    the X-Ray SDK sample locally instead of building a botocore client for the X-Ray daemon as it is imported."""
    return {**os.environ, "LAMBDA_TASK_ROOT": str(function), "POWERTOOLS_TRACE_DISABLED": "1"}


def cold_start(python: str, function: Path, runtime: Path) -> dict[str, float]:
    """One new process: seconds to its first result (and the split of imports, model load and first score)."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [python, "-I", "-B", "-c", COLD_START, str(function), str(runtime), str(ROOT / "models" / "release"),
         str(SAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=lambda_environment(function),
    )  # fmt: skip
    assert child.stdout is not None
    line = child.stdout.readline()
    first_result = time.perf_counter() - started
    child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not line:
        raise RuntimeError(f"the cold start of {function} failed")
    imports, load, score = (float(value) for value in line.split())
    return {
        "first_result_s": first_result,
        "imports_s": imports,
        "model_load_s": load,
        "first_score_s": score,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def import_costs(python: str, function: Path, runtime: Path) -> list[dict[str, Any]]:
    """Milliseconds each top-level package's modules spend importing (``-X importtime`` self times), largest first."""
    result = subprocess.run(
        [python, "-I", "-B", "-X", "importtime", "-c", COLD_START, str(function), str(runtime),
         str(ROOT / "models" / "release"), str(SAMPLE)],
        capture_output=True,
        text=True,
        check=True,
        env=lambda_environment(function),
    )  # fmt: skip
    costs: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        costs[name.strip().split(".")[0]] += int(self_us) / 1000
    return [
        {"package": package, "ms": round(ms, 1)}
        for package, ms in sorted(costs.items(), key=lambda item: -item[1])
        if ms >= 5
    ]


def cold_starts(python: str, slim: Path, reference: Path, scratch: Path) -> dict[str, Any]:
    """Medians of ``COLD_RUNS`` cold starts of each build, run in turn."""
    runtime = runtime_folder(python, scratch)
    runs: dict[str, list[dict[str, float]]] = {"slim": [], "reference": []}
    for _ in range(COLD_RUNS):
        runs["slim"].append(cold_start(python, slim, runtime))
        runs["reference"].append(cold_start(python, reference, runtime))
    figures: dict[str, Any] = {
        name: {field: round(statistics.median(run[field] for run in measured), 3) for field in measured[0]}
        for name, measured in runs.items()
    }
    figures["import_ms_by_package"] = import_costs(python, slim, runtime)
    return figures


def main() -> dict[str, Any]:
    python = lambda_python()
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        built, reference = build(scratch, python)
        sizes: dict[str, float] = {}
        for name, function in (
            ("function", built / "ScoringFunction"),
            ("publisher", built / "ResultPublisherFunction"),
        ):
            sizes[f"{name}_unzipped_mb"] = round(folder_bytes(function) / 2**20, 1)
            sizes[f"{name}_zip_mb"] = zipped_mb(function, scratch, name)
        sizes["reference_unzipped_mb"] = round(folder_bytes(reference) / 2**20, 1)
        sizes["reference_zip_mb"] = zipped_mb(reference, scratch, "reference")
        packages = package_sizes(built / "ScoringFunction", reference)
        cold = cold_starts(python, built / "ScoringFunction", reference, scratch) if python is not None else None
    release = ROOT / "models" / "release"
    figures: dict[str, Any] = {
        **sizes,
        "lambda_unzipped_limit_mb": LAMBDA_UNZIPPED_LIMIT_MB,
        "model_tflite_mb": round((release / "model.tflite").stat().st_size / 2**20, 2),
        "explain_tflite_mb": round((release / "explain.tflite").stat().st_size / 2**20, 2),
        "packages": packages,
        "cold_start": cold,
    }
    measured = {"scoring zip (MB)": (sizes["function_zip_mb"], ZIP_BAR_MB)}
    if cold is not None:
        measured["cold start to first result (s)"] = (cold["slim"]["first_result_s"], COLD_START_BAR_S)
    figures["bars"] = {
        name: {"bar": bar, "measured": value, "met": value <= bar} for name, (value, bar) in measured.items()
    }
    print_tables(figures)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "package": figures}, indent=2) + "\n")
    return figures


def print_tables(figures: dict[str, Any]) -> None:
    """Markdown: sizes, each package before and after, cold starts, import costs, then the bars."""
    print("| package | slim (served) | reference (unslimmed) |\n|---|---|---|")
    print(f"| scoring function, unzipped | {figures['function_unzipped_mb']} MB (limit 250 MB) | "
          f"{figures['reference_unzipped_mb']} MB |")  # fmt: skip
    print(f"| scoring function, zip | {figures['function_zip_mb']} MB | {figures['reference_zip_mb']} MB |")
    publisher = f"{figures['publisher_unzipped_mb']} / {figures['publisher_zip_mb']} MB"
    print(f"| result publisher, unzipped / zip | {publisher} | |")
    print(f"| model.tflite | {figures['model_tflite_mb']} MB | |")
    print(
        f"| explain.tflite (downloaded with the model, loaded on first heatmap) | {figures['explain_tflite_mb']} MB | |"
    )
    print("\n| scoring zip entry | reference MB | slim MB |\n|---|---|---|")
    for row in figures["packages"]:
        print(f"| {row['entry']} | {row['reference_mb']} | {row['slim_mb']} |")
    cold = figures["cold_start"]
    if cold is None:
        print("\ncold start: not measured (no Python 3.12 here; set LAMBDA_PYTHON)")
    else:
        print(f"\n| cold start, Python 3.12, median of {COLD_RUNS} | first result s | imports s | model load s | "
              "first score s | peak RSS MB |\n|---|---|---|---|---|---|")  # fmt: skip
        for name in ("slim", "reference"):
            row = cold[name]
            print(f"| {name} | {row['first_result_s']} | {row['imports_s']} | {row['model_load_s']} | "
                  f"{row['first_score_s']} | {row['peak_rss_mb']:.0f} |")  # fmt: skip
        print("\n| package (slim cold start) | import ms |\n|---|---|")
        for row in cold["import_ms_by_package"][:15]:
            print(f"| {row['package']} | {row['ms']} |")
    print("\n| target | bar | measured | met |\n|---|---|---|---|")
    for name, row in figures["bars"].items():
        print(f"| {name} | <= {row['bar']} | {row['measured']} | {'yes' if row['met'] else 'NO'} |")


if __name__ == "__main__":
    main()
