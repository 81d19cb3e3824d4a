"""Deployment size: `sam build` (no Docker) of the scoring function and the result publisher, unzipped and zipped,
and the sizes of the model and its explainer.

Run with `make bench`; merges its figures into bench/results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
SAM = ROOT / ".venv-infra" / "bin" / "sam"
LAMBDA_UNZIPPED_LIMIT_MB = 250


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        build = Path(scratch) / "build"
        subprocess.run(
            [str(SAM), "build", "--template", str(ROOT / "template.yaml"), "--build-dir", str(build)],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "SAM_CLI_TELEMETRY": "0", "PATH": f"{SAM.parent}:{os.environ['PATH']}"},
        )
        sizes: dict[str, float] = {}
        for name, function in (("function", "ScoringFunction"), ("publisher", "ResultPublisherFunction")):
            sizes[f"{name}_unzipped_mb"] = round(folder_bytes(build / function) / 2**20, 1)
            archive = shutil.make_archive(str(Path(scratch) / name), "zip", build / function)
            sizes[f"{name}_zip_mb"] = round(Path(archive).stat().st_size / 2**20, 1)
    release = ROOT / "models" / "release"
    figures = {
        **sizes,
        "lambda_unzipped_limit_mb": LAMBDA_UNZIPPED_LIMIT_MB,
        "model_tflite_mb": round((release / "model.tflite").stat().st_size / 2**20, 2),
        "explain_tflite_mb": round((release / "explain.tflite").stat().st_size / 2**20, 2),
    }
    print("| package | size |\n|---|---|")
    print(f"| scoring function, unzipped (`sam build`) | {figures['function_unzipped_mb']} MB (limit 250 MB) |")
    print(f"| scoring function, zip | {figures['function_zip_mb']} MB |")
    print(
        f"| result publisher, unzipped / zip | {figures['publisher_unzipped_mb']} / {figures['publisher_zip_mb']} MB |"
    )
    print(f"| model.tflite | {figures['model_tflite_mb']} MB |")
    print(
        f"| explain.tflite (downloaded with the model, loaded on first heatmap) | {figures['explain_tflite_mb']} MB |"
    )
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "package": figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
