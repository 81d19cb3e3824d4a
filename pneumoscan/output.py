"""Printing results for people (a table) or programs (JSON).

Tables are made for an 80-column terminal: one image's latest result is a key/value list (long values fold onto
further lines, whole), and in a listing no cell wraps: times are compact, the fixed-width fields (time, status,
label, probability) are always whole, and the image key and model version share what is left, cut with an ellipsis.
JSON always carries every attribute in full.

Keys and every other value from the table, S3 or the command line reach the terminal only as ``rich.text.Text``
(never read as markup) made inert by ``terminal_text.inert`` (control and bidi characters shown as escapes); JSON
needs neither."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from core.results import ResultsPage
from pneumoscan.terminal_text import inert

if TYPE_CHECKING:
    from pneumoscan.status import StackStatus, WindowCounts

DETAIL_FIELDS = (
    "image_key",
    "scored_at",
    "status",
    "label",
    "pneumonia_probability",
    "confidence",
    "normal_below",
    "pneumonia_from",
    "model_version",
    "trigger",
    "reason",
    "reason_detail",
    "heatmap_key",
    "latency_ms",
    "object_etag",
    "object_version_id",
)
"""The attributes one image's key/value list shows, in this order (those an item has)."""
ELASTIC_MINIMUM = 8
"""The narrowest an elastic column (image key, model version) gets, ellipsis included."""


def print_history(
    image_key: str,
    latest: dict[str, Any] | None,
    history: Sequence[dict[str, Any]],
    output_format: str,
    console: Console | None = None,
) -> None:
    """One image's latest result and every result it has had, oldest first."""
    if output_format == "json":
        print(json.dumps({"image_key": image_key, "latest": latest, "history": list(history)}, default=_number))
        return
    console = console or Console()
    console.print(details_table(image_key, latest or {}))
    console.print(history_table(history, latest))


def print_page(page: ResultsPage, output_format: str, console: Console | None = None) -> None:
    """One page of a by-time listing, and how to ask for the next."""
    if output_format == "json":
        print(json.dumps({"items": page.items, "next_page_token": page.next_token}, default=_number))
        return
    console = console or Console()
    console.print(listing_table(page.items))
    if page.next_token:
        console.print(_plain(f"next page: --page-token {page.next_token}"), soft_wrap=True)


def details_table(image_key: str, item: dict[str, Any]) -> Table:
    """One result as a key/value list: the attribute's name, then its value (folded, never cut)."""
    table = Table(box=None, show_header=False, title=_plain(f"latest result of {image_key}"), title_justify="left")
    table.add_column("field", no_wrap=True, style="bold")
    table.add_column("value", overflow="fold")
    for field in DETAIL_FIELDS:
        if field == "image_key" or item.get(field) is None:
            continue
        table.add_row(field.replace("_", " "), _plain(_text(field, item[field])))
    return table


def history_table(history: Sequence[dict[str, Any]], latest: dict[str, Any] | None) -> Table:
    """Every result of one image, oldest first, the latest marked *: one line each."""
    table = _listing(f"{len(history)} result(s), latest marked *")
    table.add_column("", no_wrap=True)
    _fixed_columns(table)
    table.add_column("trigger", no_wrap=True)
    _elastic_column(table, "model")
    for item in history:
        marker = "*" if latest is not None and item == latest else ""
        cells = (marker, *_fixed_cells(item), str(item.get("trigger", "")), str(item.get("model_version", "")))
        table.add_row(*map(_plain, cells))
    return table


def listing_table(items: Sequence[dict[str, Any]]) -> Table:
    """A page of results scored in a time range: one line each, times in UTC."""
    keys = [str(item.get("image_key", "")) for item in items]
    buckets = {_bucket_of(key) for key in keys}
    shared = buckets.pop() if len(buckets) == 1 else ""
    where = f" in {shared}" if shared else ""
    models = {str(item["model_version"]) for item in items if item.get("model_version")}
    one_model = models.pop() if len(models) == 1 else ""
    by = f" by {one_model}" if one_model else ""
    table = _listing(f"{len(items)} result(s){where}{by}, times UTC")
    _fixed_columns(table)
    _elastic_column(table, "image")
    if not one_model:  # One model scored them all: the title names it, and the key gets its room.
        _elastic_column(table, "model")
    for item, key in zip(items, keys, strict=True):
        image = key.removeprefix(shared) if shared else key
        cells = (*_fixed_cells(item), image) if one_model else (*_fixed_cells(item), image, _model(item))
        table.add_row(*map(_plain, cells))
    return table


def _plain(text: str) -> Text:
    """Text from outside as rich prints it: never read as markup, its control and bidi characters as escapes."""
    return Text(inert(text))


def _model(item: dict[str, Any]) -> str:
    return str(item.get("model_version", ""))


def _bucket_of(image_key: str) -> str:
    """``s3://bucket/`` of an image key (empty for anything else): a listing names it once, in its title."""
    if not image_key.startswith("s3://") or "/" not in image_key[5:]:
        return ""
    return image_key[: image_key.index("/", 5) + 1]


def compact_time(scored_at: str) -> str:
    """``2026-11-28T08:01:02.345Z`` as ``11-28 08:01:02``: the year and milliseconds add nothing to a listing."""
    if re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", scored_at):
        return f"{scored_at[5:10]} {scored_at[11:19]}"
    return scored_at


def _listing(title: str) -> Table:
    # expand: the elastic columns share whatever width the fixed ones leave (see _elastic_column).
    return Table(
        title=_plain(title),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        expand=True,
        pad_edge=False,
        collapse_padding=True,
    )


def _fixed_columns(table: Table) -> None:
    table.add_column("scored", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("label/reason", no_wrap=True)
    table.add_column("p", no_wrap=True, justify="right")


def _fixed_cells(item: dict[str, Any]) -> tuple[str, str, str, str]:
    """Time, status, label (or the rejection's reason) and pneumonia probability: short, and always whole."""
    verdict = item.get("label") if item.get("status") == "SCORED" else item.get("reason")
    probability = item.get("pneumonia_probability")
    return (
        compact_time(str(item.get("scored_at", ""))),
        str(item.get("status", "")),
        str(verdict or ""),
        "" if probability is None else f"{float(probability):.3f}",
    )


def _elastic_column(table: Table, header: str) -> None:
    """A column as wide as the fixed columns leave (never under ELASTIC_MINIMUM), cut with an ellipsis."""
    table.add_column(header, no_wrap=True, overflow="ellipsis", ratio=1, min_width=ELASTIC_MINIMUM)


def _text(field: str, value: Any) -> str:
    if field in ("pneumonia_probability", "normal_below", "pneumonia_from", "threshold", "confidence"):
        return f"{float(value):.4f}"
    if field == "latency_ms":
        return f"{float(value):.0f}"
    return str(value)


def _number(value: Any) -> Any:
    """DynamoDB numbers (Decimal) as JSON numbers."""
    return int(value) if value == int(value) else float(value)


def print_status(status: StackStatus, output_format: str, console: Console | None = None) -> None:
    """The operator's morning screen (``pneumoscan status``), or the same as one JSON object."""
    if output_format == "json":
        print(status.to_json())
        return
    console = console or Console()
    console.print(Text.assemble(("pneumoscan status", "bold"), f" at {inert(status.checked_at)}"))
    console.print(_section("model", _model_rows(status)))
    queue = status.queue
    age = (
        "unknown (no CloudWatch datapoint)" if queue.oldest_age_seconds is None else f"{queue.oldest_age_seconds:.0f} s"
    )
    queue_rows: list[tuple[str, str | Text]] = [
        ("waiting", str(queue.waiting)),
        ("in flight", str(queue.in_flight)),
        ("oldest message", age),
        ("dead letters", str(queue.dead_letters)),
    ]
    if status.redrive_command:
        queue_rows.append(("fix, then run", status.redrive_command))
    console.print(_section("queue", queue_rows))
    console.print(_section("results", [(window.window, _window_text(window)) for window in status.windows]))
    drift = status.drift
    observed = "-" if drift.observed_rate is None else f"{drift.observed_rate:.1%} of {drift.films} scored"
    expected = "-" if drift.expected_rate is None else f"{drift.expected_rate:.1%}"
    check = Text.assemble(("DRIFT: ", "bold red"), inert(drift.note)) if drift.drifted else _plain(drift.note)
    console.print(
        _section(
            "pneumonia rate, last day",
            [("observed", observed), ("model card", expected), ("check", check)],
        )
    )
    alarm_rows: list[tuple[str, str | Text]] = [
        (alarm.name, f"since {alarm.since}: {alarm.reason}") for alarm in status.alarms
    ]
    console.print(_section("alarms in ALARM", alarm_rows or [("none", "")]))
    delivery = status.alarm_delivery
    reach = (
        Text.assemble(("WARNING: ", "bold red"), inert(delivery.note))
        if delivery.reaches_someone is False
        else _plain(delivery.note)
    )
    console.print(_section("alarm delivery", [("topic", delivery.topic_arn or "-"), ("reaches", reach)]))


def _model_rows(status: StackStatus) -> list[tuple[str, str | Text]]:
    model = status.model
    if model is None:
        return [("promoted", status.model_problem or "none")]

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return [
        ("promoted", model.version),
        ("since", model.promoted_at),
        (
            "test figures",
            f"AUC {figure(model.test_auc)}, sensitivity {figure(model.test_sensitivity)}, "
            f"specificity {figure(model.test_specificity)}, flagged from {figure(model.threshold)}",
        ),
    ]


def _window_text(window: WindowCounts) -> str:
    if not window.total:
        return "none"
    parts = [f"{count} {status}" for status, count in window.by_status.items()]
    text = f"{window.total}: " + ", ".join(parts)
    if window.scored:
        text += f" ({window.pneumonia} PNEUMONIA)"
    if window.by_reason:
        text += "; rejected: " + ", ".join(f"{count} {reason}" for reason, count in window.by_reason.items())
    return text


def _section(title: str, rows: Sequence[tuple[str, str | Text]]) -> Group:
    """A heading, then a key/value list whose values fold (whole) rather than being cut; a ``str`` field or value
    (an alarm's name and reason, a model version, a path) is made inert, a ``Text`` is printed as built."""
    heading = Text(title, style="bold")
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for field, value in rows:
        table.add_row(_plain(field), value if isinstance(value, Text) else _plain(value))
    return Group(heading, table)
