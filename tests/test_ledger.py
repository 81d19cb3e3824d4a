"""The holdout ledger records every scoring of the official test split."""

from __future__ import annotations

import os
from pathlib import Path

from core.model_card import read_card
from tests.conftest import REPOSITORY_ROOT, SmokeRun
from training.ledger import LedgerEntry, is_official_test_split, ledger_path, read_ledger, record_scoring


def test_the_repository_ledger_lists_every_recorded_scoring() -> None:
    """The committed ledger parses, and every line names a model, its run and its test figures."""
    entries = read_ledger(REPOSITORY_ROOT / "models" / "holdout-ledger.jsonl")
    assert len(entries) >= 6
    for entry in entries:
        assert entry.version and entry.run and entry.date
        assert entry.count == 624
        assert 0.5 <= entry.figures["auc"] <= 1.0


def test_a_scoring_is_appended_with_its_date(tmp_path: Path) -> None:
    """Each recorded scoring adds one dated line; earlier lines stay as they were."""
    ledger = tmp_path / "ledger.jsonl"
    first = record_scoring(LedgerEntry("pneumoscan evaluate", "m-1", 624, {"auc": 0.9}, "abc"), ledger)
    record_scoring(LedgerEntry("pneumoscan train", "m-2", 624, {"auc": 0.95}, "def"), ledger)
    entries = read_ledger(ledger)
    assert [entry.version for entry in entries] == ["m-1", "m-2"]
    assert entries[0] == first and first.date.startswith("20")


def test_tests_never_write_the_repository_ledger() -> None:
    """The test session records its smoke runs' scorings in a ledger of its own."""
    path = ledger_path()
    assert path is not None and path != REPOSITORY_ROOT / "models" / "holdout-ledger.jsonl"
    assert path == Path(os.environ["PNEUMOSCAN_HOLDOUT_LEDGER"])


def test_a_training_run_records_its_test_scorings(smoke_run: SmokeRun) -> None:
    """The smoke run of `pneumoscan train` scored (a few films of) the test split: its models are in the ledger."""
    path = ledger_path()
    assert path is not None
    versions = {entry.version for entry in read_ledger(path) if entry.run == "pneumoscan train"}
    assert read_card(smoke_run.artifact)["version"] in versions


def test_the_official_test_split_is_recognised(tmp_path: Path) -> None:
    """A folder named test beside a train folder is the official split; another folder is a site's films."""
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "site").mkdir()
    assert is_official_test_split(tmp_path / "test")
    assert not is_official_test_split(tmp_path / "site")
