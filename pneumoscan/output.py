"""Printing results for people (a table) or programs (JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from core.results import ResultsPage

VERDICT_COLUMNS = ("scored_at", "status", "label", "pneumonia_probability", "model_version", "trigger", "reason")


def print_history(
    image_key: str, latest: dict[str, Any] | None, history: Sequence[dict[str, Any]], output_format: str
) -> None:
    """One image's latest result and every result it has had, oldest first."""
    if output_format == "json":
        print(json.dumps({"image_key": image_key, "latest": latest, "history": list(history)}, default=_number))
        return
    table = _table(f"{image_key}: {len(history)} result(s), latest marked *", history, latest, VERDICT_COLUMNS)
    Console().print(table)


def print_page(page: ResultsPage, output_format: str) -> None:
    """One page of a by-time listing, and how to ask for the next."""
    if output_format == "json":
        print(json.dumps({"items": page.items, "next_page_token": page.next_token}, default=_number))
        return
    console = Console()
    console.print(_table(f"{len(page.items)} result(s)", page.items, None, ("image_key", *VERDICT_COLUMNS)))
    if page.next_token:
        console.print(f"next page: --page-token {page.next_token}")


def _table(title: str, items: Sequence[dict[str, Any]], latest: dict[str, Any] | None, columns: Sequence[str]) -> Table:
    table = Table(title=title)
    table.add_column("")
    for column in columns:
        # Keys and timestamps wrap rather than lose their ends on a narrow terminal.
        table.add_column(column.replace("_", " "), overflow="fold")
    for item in items:
        marker = "*" if latest is not None and item == latest else ""
        table.add_row(marker, *(str(item.get(column, "")) for column in columns))
    return table


def _number(value: Any) -> Any:
    """DynamoDB numbers (Decimal) as JSON numbers."""
    return int(value) if value == int(value) else float(value)
