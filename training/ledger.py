"""The holdout ledger: one line for every scoring of the official test split by a training or evaluation run.

The test split is a reused holdout. Each scoring of it is honest on its own, but every model compared on it spends
some of its independence, so the count is kept where everyone sees it: ``models/holdout-ledger.jsonl`` beside the
release, committed with the model it records. A run that scores the test split appends its line (date, run,
model version, source commit, figures) when it has the figures; ``PNEUMOSCAN_HOLDOUT_LEDGER`` points elsewhere
(the tests point it at a temporary file), and outside a checkout of this repository, with no ledger there and
none named, the card alone carries the record.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPOSITORY_LEDGER = Path(__file__).resolve().parent.parent / "models" / "holdout-ledger.jsonl"
LEDGER_VARIABLE = "PNEUMOSCAN_HOLDOUT_LEDGER"


@dataclass(frozen=True)
class LedgerEntry:
    """One scoring of the test split."""

    run: str
    """What scored it: ``pneumoscan train``, ``pneumoscan evaluate``, ``pneumoscan calibrate``..."""
    version: str
    count: int
    figures: dict[str, float]
    git_commit: str
    note: str = ""
    date: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ledger_path(environment: Mapping[str, str] = os.environ) -> Path | None:
    """Where scorings are recorded: the named file, else the repository's ledger when this is a checkout."""
    if named := environment.get(LEDGER_VARIABLE):
        return Path(named)
    return REPOSITORY_LEDGER if REPOSITORY_LEDGER.parent.is_dir() else None


def record_scoring(entry: LedgerEntry, path: Path | None = None) -> LedgerEntry:
    """Append one scoring, dated now, to the ledger (``ledger_path()`` unless a path is given); return it."""
    dated = LedgerEntry(**{**entry.to_dict(), "date": entry.date or datetime.now(UTC).isoformat(timespec="seconds")})
    target = path if path is not None else ledger_path()
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as ledger:
            ledger.write(json.dumps(dated.to_dict(), sort_keys=True) + "\n")
    return dated


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Every recorded scoring, oldest first."""
    if not path.is_file():
        return []
    return [LedgerEntry(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def git_commit() -> str:
    """The source commit, from the build's environment or the working tree; 'unknown' outside both. It lives here,
    without TensorFlow, so that commands recording a scoring without training need not load it."""
    if commit := os.environ.get("PNEUMOSCAN_GIT_COMMIT"):
        return commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # git is looked up on PATH on purpose.
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def is_official_test_split(split_dir: Path) -> bool:
    """Whether a folder is the data set's official test split (``.../chest_xray/test``), by its layout's name."""
    resolved = split_dir.resolve()
    return resolved.name == "test" and (resolved.parent / "train").is_dir()
