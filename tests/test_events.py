"""Parsing S3 notifications out of SQS message bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.events import BackfillRequest, MalformedMessageError, parse_message, parse_message_body
from scoring.heatmaps import HeatmapStore

EVENTS = Path(__file__).parent / "events"


def notification(**object_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((EVENTS / "s3_object_created.json").read_text())
    body["Records"][0]["s3"]["bucket"]["name"] = "uploads"
    body["Records"][0]["s3"]["object"].update(object_fields)
    return body


def test_key_is_url_decoded_with_plus_as_space() -> None:
    """S3 encodes keys in notifications; '+' is a space and %2B a literal plus."""
    [ref] = parse_message_body(json.dumps(notification(key="incoming/a+b%2Bc+%C3%A9.jpeg")))
    assert ref.key == "incoming/a b+c é.jpeg"
    assert ref.image_key == "s3://uploads/incoming/a b+c é.jpeg"


def test_test_event_yields_nothing() -> None:
    """S3's s3:TestEvent is recognised and names no object."""
    assert parse_message_body((EVENTS / "s3_test_event.json").read_text()) == []


def test_every_record_of_a_message_is_returned() -> None:
    """A message with several records yields all their objects; non-create events are ignored."""
    body = notification(key="incoming/one.jpeg")
    second = json.loads(json.dumps(body["Records"][0]))
    second["s3"]["object"]["key"] = "incoming/two.jpeg"
    removed = json.loads(json.dumps(body["Records"][0]))
    removed["eventName"] = "ObjectRemoved:Delete"
    body["Records"] += [second, removed]
    assert [ref.key for ref in parse_message_body(json.dumps(body))] == ["incoming/one.jpeg", "incoming/two.jpeg"]


def test_sequencers_of_different_length_sort_in_event_order() -> None:
    """Padded sequencers compare in the order S3 produced them, whatever their length."""
    short = parse_message_body(json.dumps(notification(sequencer="FF")))[0].sequencer
    longer = parse_message_body(json.dumps(notification(sequencer="0100")))[0].sequencer
    assert short < longer


def test_notification_without_sequencer_gets_a_stable_identity() -> None:
    """Emulators without a sequencer get event time and ETag, identical across duplicate deliveries."""
    body = notification()
    del body["Records"][0]["s3"]["object"]["sequencer"]
    first = parse_message_body(json.dumps(body))[0].sequencer
    assert first == parse_message_body(json.dumps(body))[0].sequencer
    assert "ETAG" in first


@pytest.mark.parametrize(
    "body", ["{not json", "[]", json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}), "{}"]
)
def test_malformed_bodies_are_errors(body: str) -> None:
    """Bodies that are not S3 notifications raise, so their record is retried and then dead-lettered."""
    with pytest.raises(MalformedMessageError):
        parse_message_body(body)


def test_a_malformed_record_among_readable_ones_costs_only_itself() -> None:
    """The readable records of a message are parsed; the malformed one is listed with why, and nothing raises."""
    body = notification(key="incoming/one.jpeg")
    body["Records"] = [{"eventName": "ObjectCreated:Put"}, *body["Records"], "not a record"]
    parsed = parse_message(json.dumps(body))
    assert [ref.key for ref in parsed.refs] == ["incoming/one.jpeg"]
    assert len(parsed.malformed) == 2


def test_backfill_request_round_trips() -> None:
    """A backfill request names its object, the model pinned to score it, and whether a heatmap is wanted."""
    body = BackfillRequest("uploads", "incoming/a b.jpeg", '"abc"', 12, "model-a", explain=True).to_json()
    [ref] = parse_message_body(body)
    assert (ref.image_key, ref.etag, ref.size, ref.backfill_model, ref.explain) == (
        "s3://uploads/incoming/a b.jpeg",
        "abc",
        12,
        "model-a",
        True,
    )
    assert ref.is_backfill and ref.version_id is None


@pytest.mark.parametrize(
    "fields",
    [{"model_version": ""}, {"size": "twelve"}, {"etag": None}, {"unexpected": 1}],
)
def test_malformed_backfill_requests_are_errors(fields: dict[str, Any]) -> None:
    """A backfill body with a missing, empty or unknown field raises, so it is retried and then dead-lettered."""
    document = {**json.loads(BackfillRequest("uploads", "incoming/a.jpeg", "abc", 12, "model-a").to_json()), **fields}
    with pytest.raises(MalformedMessageError):
        parse_message_body(json.dumps(document))


def test_heatmap_keys_stay_within_the_s3_limit() -> None:
    """Heatmaps sit beside their image's key, unless that key is too long, when a digest names them."""
    short = HeatmapStore.key_for("s3://uploads/incoming/a.jpeg", "01")
    assert short.startswith("heatmaps/uploads/incoming/a.jpeg.") and short.endswith(".png")
    longest = HeatmapStore.key_for("s3://uploads/incoming/" + "é" * 500 + ".jpeg", "01")
    assert len(longest.encode()) <= 1024
    assert longest.startswith("heatmaps/uploads/_long-keys/")
    assert HeatmapStore.key_for("s3://uploads/incoming/a.jpeg", "02") != short
