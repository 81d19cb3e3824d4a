"""Hostile text never drives the operator's terminal: S3 keys (anyone who uploads chooses them), table items, model
cards, alarm texts and command-line values reach every human-readable line with their control characters, bidi
controls and rich markup shown, inert; JSON output carries them exactly."""

from __future__ import annotations

import json
import logging
import re
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from core.results import ResultsTable, ScoringResult, Status
from infra.local_stack import LocalStack
from pneumoscan.cli import main
from pneumoscan.errors import ExitCode, describe
from pneumoscan.terminal_text import InertFormatter, inert
from tests.conftest import RELEASE_MODEL, copy_artifact
from tests.test_status import raise_alarm

CLEAR_SCREEN = "\x1b[2J"
WINDOW_TITLE = "\x1b]0;owned\x07"
HYPERLINK = "\x1b]8;;https://attacker.example/\x1b\\click here\x1b]8;;\x1b\\"
C1_CONTROL_SEQUENCE = "\x9b31m"
RIGHT_TO_LEFT_OVERRIDE = "\u202e"
MARKUP = "[link=https://attacker.example/]markup[/link][bold red]"
HOSTILE = f"{CLEAR_SCREEN}{WINDOW_TITLE}{HYPERLINK}{RIGHT_TO_LEFT_OVERRIDE}gpj.exe{C1_CONTROL_SEQUENCE}\x7f{MARKUP}"
"""Every kind of attack at once: ESC sequences (clear screen, OSC 0 window title, OSC 8 hyperlink), a C1 control
sequence introducer, DEL, a bidi override and rich markup that would be a live link."""

BIDI_CONTROLS = {chr(code) for code in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]}
RICH_STYLES = re.compile(r"\x1b\[[0-9;]*m")
"""Select Graphic Rendition: the only escape sequences rich writes itself for these screens (bold, italic)."""


def assert_inert(screen: str, *, line_controls: str = "\n") -> None:
    """No escape sequence but rich's own styles, no bidi control, no other control character but line breaks, and no
    hyperlink: what reaches the terminal can only be read."""
    bare = RICH_STYLES.sub("", screen)
    assert "\x1b" not in bare, repr(screen)
    assert not BIDI_CONTROLS & set(bare), repr(screen)
    assert all(character.isprintable() for character in bare if character not in line_controls), repr(screen)


def flat(screen: str) -> str:
    """The screen without rich's styles, on one line (rich may wrap a title)."""
    return " ".join(RICH_STYLES.sub("", screen).split())


@pytest.mark.parametrize(
    ("character", "shown"),
    [
        ("\x00", "\\x00"),
        ("\x07", "\\x07"),
        ("\t", "\\t"),
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\x1b", "\\x1b"),
        ("\x7f", "\\x7f"),
        ("\x85", "\\x85"),
        ("\x9b", "\\x9b"),
        ("\x9d", "\\x9d"),
        ("\u061c", "\\u061c"),
        ("\u200e", "\\u200e"),
        ("\u200f", "\\u200f"),
        ("\u202a", "\\u202a"),
        ("\u202e", "\\u202e"),
        ("\u2066", "\\u2066"),
        ("\u2069", "\\u2069"),
        ("\u2028", "\\u2028"),
        ("\u200b", "\\u200b"),
        ("\U000e0041", "\\U000e0041"),
    ],
)
def test_a_control_or_format_character_is_shown_as_its_escape(character: str, shown: str) -> None:
    """C0 and C1 controls, DEL, ESC, bidi controls, separators and invisible format characters become the text of
    their Python escape."""
    assert inert(f"a{character}b") == f"a{shown}b"


def test_every_non_printable_character_is_escaped() -> None:
    """No character of the first plane that Python calls non-printable survives, whatever its category."""
    text = "".join(chr(code) for code in range(0x10000) if unicodedata.category(chr(code)) != "Cs")
    assert inert(text).isprintable()


def test_printable_text_is_left_as_it_is() -> None:
    """Keys in any script, with spaces, quotes, backslashes and brackets, are printed unchanged."""
    for text in ["incoming/Röntgen Thorax 胸部 X線 صورة.jpeg", "a 'b' \"c\" \\x1b [d] 🫁.png", ""]:
        assert inert(text) == text


def test_a_log_line_is_inert_but_keeps_its_traceback_lines() -> None:
    """The CLI's log formatter escapes a logged key and an exception's hostile message, line by line."""
    try:
        raise ValueError(f"cannot store the heatmap of {HOSTILE}")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", (HOSTILE,), sys.exc_info())
    line = InertFormatter("%(levelname)s %(message)s").format(record)
    assert_inert(line)
    assert line.startswith(f"ERROR key {inert(HOSTILE)}\nTraceback")
    assert line.endswith(f"ValueError: cannot store the heatmap of {inert(HOSTILE)}")


def test_an_aws_error_line_is_inert() -> None:
    """A one-line failure quoting an AWS message that holds a key shows the key's controls as escapes."""
    error = ClientError({"Error": {"Code": "NoSuchKey", "Message": f"no key {HOSTILE}"}}, "GetObject")
    failure = describe(error, "results")
    assert failure is not None and failure.exit_code == ExitCode.AWS_NO_SUCH_RESOURCE
    assert_inert(failure.line)
    assert inert(HOSTILE) in failure.line


@dataclass(frozen=True)
class HostileStack:
    """The local stack whose results table, model registry and alarms hold hostile text."""

    outputs: Path
    input_bucket: str
    scored_key: str
    rejected_key: str
    whitespace_key: str
    model_version: str
    since: str


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileStack]:
    """Results with hostile keys, model version, reason and heatmap key written to the local stack's table; a model
    whose card names a hostile version, published and promoted; an alarm in ALARM with a hostile name and reason."""
    folder = tmp_path_factory.mktemp("hostile")
    with LocalStack(retry_delay_seconds=1, quiet=True) as stack:
        assert stack.outputs is not None
        outputs = folder / "local-stack.json"
        outputs.write_text(stack.outputs.to_json())
        bucket = stack.outputs.input_bucket
        now = datetime.now(UTC)
        scored_at = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        model_version = f"model-{HOSTILE}"
        keys = [f"s3://{bucket}/incoming/terminal/{name}" for name in (HOSTILE, f"{HOSTILE}-rejected", "a\nb\tc.png")]
        common = {"object_etag": "etag", "object_size": 10, "object_version_id": None, "latency_ms": 5.0}
        table = ResultsTable(stack.client("dynamodb"), stack.outputs.results_table)
        table.put_once(
            ScoringResult(
                image_key=keys[0],
                object_sequence="01",
                status=Status.SCORED,
                scored_at=scored_at,
                model_version=model_version,
                label="PNEUMONIA",
                confidence=0.9,
                pneumonia_probability=0.9,
                normal_below=0.5,
                pneumonia_from=0.8,
                heatmap_key=f"s3://{stack.outputs.heatmap_bucket}/heatmaps/{HOSTILE}.png",
                **common,
            )
        )
        table.put_once(
            ScoringResult(
                image_key=keys[1],
                object_sequence="01",
                status=Status.REJECTED,
                scored_at=scored_at,
                reason=f"reason-{HOSTILE}",
                reason_detail=f"detail {HOSTILE}",
                **common,
            )
        )
        table.put_once(
            ScoringResult(
                image_key=keys[2],
                object_sequence="01",
                status=Status.SCORED,
                scored_at=scored_at,
                model_version=model_version,
                label="NORMAL",
                confidence=0.8,
                pneumonia_probability=0.2,
                normal_below=0.5,
                pneumonia_from=0.8,
                **common,
            )
        )
        artifact = copy_artifact(RELEASE_MODEL, folder / "hostile-model", model_version)
        assert main(["publish", "--outputs", str(outputs), "--model", str(artifact)]) == 0
        assert main(["promote", "--outputs", str(outputs), "--version", model_version, "--force"]) == 0
        raise_alarm(stack.client("cloudwatch"), f"alarm-{HOSTILE}", f"because {HOSTILE}")
        since = (now - timedelta(minutes=5)).isoformat(timespec="seconds")
        yield HostileStack(outputs, bucket, keys[0], keys[1], keys[2], model_version, since)


@pytest.fixture(params=[True, False], ids=["terminal", "pipe"])
def screen_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Rich writing for a terminal (FORCE_COLOR: it would write styles and live hyperlinks), or for a pipe; wide
    enough that no value is cut."""
    monkeypatch.setenv("COLUMNS", "3000")
    monkeypatch.delenv("NO_COLOR", raising=False)
    if request.param:
        monkeypatch.setenv("FORCE_COLOR", "1")
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    return bool(request.param)


@pytest.mark.slow
def test_results_listing_is_inert(
    hostile_stack: HostileStack, screen_kind: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`results --since --format table`: hostile keys, model version and reason are shown with their escapes visible
    and their markup as text; no raw ESC, C1, DEL or U+202E byte and no hyperlink reaches the terminal."""
    capsys.readouterr()
    arguments = ["results", "--outputs", str(hostile_stack.outputs), "--since", hostile_stack.since]
    assert main([*arguments, "--format", "table"]) == 0
    screen = capsys.readouterr().out
    assert_inert(screen)
    assert ("\x1b[" in screen) is screen_kind  # A terminal gets rich's styles: the check saw real terminal output.
    shown = flat(screen)
    assert "3 result(s)" in shown
    for text in [
        f"by {inert(hostile_stack.model_version)}",
        inert(f"incoming/terminal/{HOSTILE}"),
        inert(f"reason-{HOSTILE}"),
        "incoming/terminal/a\\nb\\tc.png",
        "\\x1b[2J\\x1b]0;owned\\x07\\x1b]8;;https://attacker.example/\\x1b\\click here",
        f"\\u202egpj.exe\\x9b31m\\x7f{MARKUP}",
    ]:
        assert text in shown, text


@pytest.mark.slow
def test_one_images_results_are_inert(
    hostile_stack: HostileStack, screen_kind: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`results KEY --format table`: the title naming the key, the heatmap key and the history are inert; the markup
    in the key is printed as text, never as a live link."""
    for key, hostile_fields in [
        (hostile_stack.scored_key, [f"heatmaps/{HOSTILE}.png", hostile_stack.model_version]),
        (hostile_stack.rejected_key, [f"reason-{HOSTILE}", f"detail {HOSTILE}"]),
        (hostile_stack.whitespace_key, []),
    ]:
        capsys.readouterr()
        assert main(["results", "--outputs", str(hostile_stack.outputs), key, "--format", "table"]) == 0
        screen = capsys.readouterr().out
        assert_inert(screen)
        shown = flat(screen)
        assert f"latest result of {inert(key)}" in shown
        for text in hostile_fields:
            assert inert(text) in shown, text


@pytest.mark.slow
def test_json_output_carries_hostile_text_exactly(
    hostile_stack: HostileStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON stays JSON: the keys come back character for character, escaped by JSON itself, so no raw control or
    bidi character is printed either."""
    capsys.readouterr()
    assert main(["results", "--outputs", str(hostile_stack.outputs), "--since", hostile_stack.since]) == 0
    printed = capsys.readouterr().out
    assert_inert(printed)
    listed = {item["image_key"] for item in json.loads(printed)["items"]}
    assert listed == {hostile_stack.scored_key, hostile_stack.rejected_key, hostile_stack.whitespace_key}
    assert main(["results", "--outputs", str(hostile_stack.outputs), hostile_stack.scored_key]) == 0
    printed = capsys.readouterr().out
    assert_inert(printed)
    assert json.loads(printed)["latest"]["model_version"] == hostile_stack.model_version


@pytest.mark.slow
def test_status_screen_is_inert(
    hostile_stack: HostileStack, screen_kind: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status`: the promoted version (from a model card), a rejection reason (from the table), an alarm's name and
    reason (from CloudWatch) are inert; `status --format json` carries them exactly."""
    capsys.readouterr()
    assert main(["status", "--outputs", str(hostile_stack.outputs)]) == 0
    screen = capsys.readouterr().out
    assert_inert(screen)
    shown = flat(screen)
    for text in [hostile_stack.model_version, f"1 reason-{HOSTILE}", f"alarm-{HOSTILE}", f"because {HOSTILE}"]:
        assert inert(text) in shown, text
    assert main(["status", "--outputs", str(hostile_stack.outputs), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["version"] == hostile_stack.model_version
    assert f"alarm-{HOSTILE}" in [alarm["name"] for alarm in report["alarms"]]


@pytest.mark.slow
def test_backfill_progress_line_is_inert(
    hostile_stack: HostileStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`backfill --prefix` with a hostile prefix: the progress line names it inert; the JSON summary names the
    promoted model's hostile version exactly."""
    capsys.readouterr()
    prefix = f"incoming/terminal/{HOSTILE}"
    arguments = ["backfill", "--outputs", str(hostile_stack.outputs), "--prefix", prefix]
    assert main([*arguments, "--state", str(tmp_path / "state.json")]) == 0
    captured = capsys.readouterr()
    assert_inert(captured.err, line_controls="\n\r")  # tqdm redraws its line with carriage returns.
    assert inert(f"backfill s3://{hostile_stack.input_bucket}/{prefix}") in flat(captured.err)
    assert json.loads(captured.out)["model_version"] == hostile_stack.model_version


@pytest.mark.slow
def test_error_lines_are_inert(hostile_stack: HostileStack, capsys: pytest.CaptureFixture[str]) -> None:
    """A command's one-line failure quoting a hostile path (`redrive`) or page token (`results`) shows it inert."""
    capsys.readouterr()
    missing = hostile_stack.outputs.parent / f"{HOSTILE}.json"
    assert main(["redrive", "--outputs", str(missing)]) == ExitCode.MISSING_FILE
    line = capsys.readouterr().err
    assert_inert(line)
    assert line.startswith("pneumoscan redrive: ") and inert(str(missing)) in line  # As a Path spells it: one "/".
    results = ["results", "--outputs", str(hostile_stack.outputs), "--since", hostile_stack.since]
    assert main([*results, "--page-token", HOSTILE]) == ExitCode.USAGE
    line = capsys.readouterr().err
    assert_inert(line)
    assert line.startswith("pneumoscan results: not a page token")
