"""`pneumoscan results --format table` at 80 columns: no listing cell wraps, one image's result is a key/value list."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

from rich.console import Console

from core.results import ResultsPage
from pneumoscan.output import compact_time, print_history, print_page

BUCKET = "s3://pneumoscan-input-123456789012/"
MODEL = "efficientnet-20261128T130752Z"


def _item(index: int, status: str = "SCORED", **overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "image_key": f"{BUCKET}incoming/ward-7/2026/11/28/patient-{index:04d}-chest-posteroanterior.jpeg",
        "scored_at": f"2026-11-28T08:{index:02d}:02.345Z",
        "status": status,
        "model_version": MODEL,
        "trigger": "backfill" if index % 2 else "upload",
        "latency_ms": Decimal("123.4"),
        "object_etag": "0123456789abcdef0123456789abcdef",
    }
    if status == "SCORED":
        item.update(label="PNEUMONIA", pneumonia_probability=Decimal("0.9731"), normal_below=Decimal("0.41"))
    else:
        item.update(reason="not_decodable", reason_detail="cannot identify image file; not JPEG, PNG nor DICOM")
    return {**item, **overrides}


def _render(draw: Any) -> list[str]:
    console = Console(width=80, file=io.StringIO(), record=True, color_system=None)
    draw(console)
    return console.export_text().splitlines()


def _row_of(lines: list[str], *cells: str) -> list[str]:
    """The lines holding all of ``cells``: exactly one when a row does not wrap."""
    return [line for line in lines if all(cell in line for cell in cells)]


def _body(lines: list[str]) -> int:
    """The number of non-blank lines under a listing's header rule."""
    rule = next(index for index, line in enumerate(lines) if line.strip().startswith("─"))
    return sum(1 for line in lines[rule + 1 :] if line.strip())


def test_a_listing_row_is_one_line_at_80_columns() -> None:
    """Every result of a --since listing takes one line of at most 80 columns, its time, status, label or reason and
    probability whole, and nothing of it spills onto another line."""
    items = [_item(index, "SCORED" if index % 3 else "REJECTED") for index in range(12)]
    lines = _render(lambda console: print_page(ResultsPage(items=items, next_token=None), "table", console))
    assert all(len(line) <= 80 for line in lines)
    for item in items:
        verdict = item.get("label") or item["reason"]
        cells = [compact_time(item["scored_at"]), item["status"], verdict]
        if "pneumonia_probability" in item:
            cells.append("0.973")
        assert len(_row_of(lines, *cells)) == 1, cells
    assert _body(lines) == len(items)  # No continuation lines.
    title = " ".join(" ".join(lines[:3]).split())
    assert f"in {BUCKET}" in title and f"by {MODEL}" in title


def test_a_listing_of_several_models_has_a_model_column() -> None:
    """Results of different models keep a model column; rows still take one line each at 80 columns."""
    items = [_item(index, model_version=f"{MODEL}-{index % 2}") for index in range(6)]
    lines = _render(lambda console: print_page(ResultsPage(items=items, next_token=None), "table", console))
    assert all(len(line) <= 80 for line in lines)
    assert _body(lines) == len(items)
    assert "model" in next(line for line in lines if "scored" in line and "status" in line)


def test_the_next_page_token_is_printed_whole() -> None:
    """The token that continues a listing is printed on one line even when wider than the terminal, so it can be
    copied."""
    token = "x" * 120
    lines = _render(lambda console: print_page(ResultsPage(items=[_item(1)], next_token=token), "table", console))
    assert f"next page: --page-token {token}" in lines


def test_one_image_is_a_key_value_list_with_whole_values() -> None:
    """`results KEY --format table` lists the latest result's attributes one per line, values whole (the model version
    on one line; long ones folded, never cut), then the history one line per result with the latest marked *."""
    history = [_item(1, "REJECTED"), _item(1, scored_at="2026-11-28T09:00:00.000Z")]
    latest = history[1]
    lines = _render(lambda console: print_history(latest["image_key"], latest, history, "table", console))
    assert all(len(line) <= 80 for line in lines)
    assert _row_of(lines, "model version", MODEL)
    assert _row_of(lines, "scored at", "2026-11-28T09:00:00.000Z")
    assert _row_of(lines, "pneumonia probability", "0.9731")
    assert latest["image_key"] in "".join(line.strip() for line in lines)
    assert _row_of(lines, "2 result(s), latest marked *")
    marked = _row_of(lines, "*", "11-28 09:00:00", "SCORED", "PNEUMONIA", "0.973", "backfill")
    assert len(marked) == 1
    assert len(_row_of(lines, "11-28 08:01:02", "REJECTED", "not_decodable", "backfill")) == 1


def test_compact_time() -> None:
    """A listing shows scored_at as month-day and time to the second; anything else unchanged."""
    assert compact_time("2026-11-28T08:01:02.345Z") == "11-28 08:01:02"
    assert compact_time("yesterday") == "yesterday"
