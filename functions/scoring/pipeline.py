"""The scoring pipeline of one invocation: fetch and preprocess every image, score them in one batch, then commit
each SQS record's results.

It runs in two phases so that inference is batched across the whole invocation while the per-record outcome still
goes through Powertools' batch processor: ``prepare`` does the reading and scoring and remembers, per message,
the results to write or the transient fault to report; ``commit`` then writes one record's results, or raises its
fault so that the record comes back in ``batchItemFailures`` and SQS retries it.

Between the two, the heatmap stage (``scoring.heatmaps``) stores the overlays the scored images need.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from core.events import ObjectRef, parse_message
from core.preprocessing import DecodedImage, decode, resize_for_model
from core.rejections import InvalidImageError, RejectionReason
from core.results import AlreadyScoredError, ResultsTable, ScoringResult, Status, Trigger, rescoring_sequence
from scoring.classifier import Classifier, Prediction
from scoring.heatmaps import HeatmapOutcome, HeatmapStage
from scoring.image_store import BucketGoneError, ImageStore, ObjectArchivedError, ObjectGoneError, ObjectReplacedError
from scoring.isolated_decode import IsolationLimits, decode_isolated
from scoring.model_provider import ModelProvider

OBJECT_GONE_DETAIL = "the notified object version no longer exists"
BUCKET_GONE_DETAIL = "the bucket of the notified object no longer exists"
ARCHIVED_DETAIL = "the object is in an archive storage class or tier; restore it, then backfill it"


class ModelVersionMismatchError(RuntimeError):
    """A backfill asks for a model other than the one served; retried once the function has refreshed."""


class ReceiveAttributes(Protocol):
    """The SQS system attributes of a record the pipeline reads."""

    @property
    def approximate_receive_count(self) -> str: ...


class Message(Protocol):
    """The parts of an SQS record the pipeline reads (Powertools' ``SQSRecord`` has them)."""

    @property
    def message_id(self) -> str: ...

    @property
    def body(self) -> str: ...

    @property
    def attributes(self) -> ReceiveAttributes: ...


def is_retry(message: Message) -> bool:
    """Whether SQS has delivered the message before: its batch failed, or the invocation that had it died."""
    try:
        return int(message.attributes.approximate_receive_count) > 1
    except (KeyError, ValueError):  # An event without the attribute (tests, other sources): a first delivery.
        return False


class Observer(Protocol):
    """Where the pipeline reports what happened (metrics and logs), never with image content."""

    def scored(self, result: ScoringResult) -> None: ...

    def rejected(self, result: ScoringResult) -> None: ...

    def skipped(self, image_key: str, sequence: str, why: str) -> None: ...

    def dropped(self, why: str) -> None:
        """A record that can never be scored and has no place in the results table (malformed, or naming an
        object outside the input bucket and prefix) was acknowledged without a result."""


@dataclass
class RecordPlan:
    """What committing one SQS record will do."""

    results: list[ScoringResult] = field(default_factory=list)
    fault: Exception | None = None


@dataclass(frozen=True)
class _PendingImage:
    message_id: str
    ref: ObjectRef
    decoded: DecodedImage
    pixels: np.ndarray
    started: float
    explain: bool


class ScoringPipeline:
    """Turns SQS records of S3 notifications into rows of the results table."""

    def __init__(
        self,
        images: ImageStore,
        *,
        results: ResultsTable,
        models: ModelProvider,
        observer: Observer,
        max_image_bytes: int,
        input_bucket: str,
        input_prefix: str = "",
        heatmaps: HeatmapStage | None = None,
        isolation: IsolationLimits | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """Only objects under ``input_prefix`` in ``input_bucket`` are read; without a ``heatmaps`` store no
        heatmap is made. A batch holding a record delivered before is decoded in child processes within
        ``isolation``'s limits (``scoring.isolated_decode``), so a file that kills its decoder costs only its own
        record."""
        self._images = images
        self._heatmaps = heatmaps
        self._results = results
        self._models = models
        self._observer = observer
        self._max_image_bytes = max_image_bytes
        self._input_bucket = input_bucket
        self._input_prefix = input_prefix
        self._isolation = isolation or IsolationLimits()
        self._clock = clock

    @property
    def model_version(self) -> str | None:
        """The version of the model in memory, if one has been loaded."""
        return self._models.loaded_version

    def load_model(self) -> None:
        """Load, or refresh when due, the served model now, outside an invocation (the local stack does so before
        it forks one, as a warm execution environment keeps its model); raises ``ModelUnavailableError``."""
        self._models.get()

    def prepare(self, messages: Sequence[Message]) -> dict[str, RecordPlan]:
        """Read, validate and score every image of every message; nothing is written yet."""
        plans = {message.message_id: RecordPlan() for message in messages}
        # One model per invocation, loaded on first use: preprocessing and inference never see two versions.
        classifier = functools.cache(self._models.get)
        pending: list[_PendingImage] = []
        # A batch holding any record SQS delivered before is decoded record by record in child processes, its first
        # deliveries too: a record whose invocation was killed once is never killed again by a file beside it (a
        # duplicate notification of the same bomb arrives as a first delivery).
        isolated = any(is_retry(message) for message in messages)
        for message in messages:
            plan = plans[message.message_id]
            try:
                parsed = parse_message(message.body)
                for why in parsed.malformed:
                    self._observer.dropped(f"malformed record: {why}")
                for ref in parsed.refs:
                    image = self._read(message.message_id, ref, plan, classifier, isolated=isolated)
                    if image is not None:
                        pending.append(image)
            except Exception as fault:  # noqa: BLE001  # Any fault of one record must fail that record only.
                plan.fault = fault
        self._score(pending, plans, classifier)
        return plans

    def commit(self, plan: RecordPlan) -> None:
        """Write one record's results, or raise its fault so the record is retried."""
        if plan.fault is not None:
            raise plan.fault
        for result in plan.results:
            if not self._results.put_once(result):
                self._observer.skipped(result.image_key, result.object_sequence, "duplicate: a result already exists")
                continue
            if result.status is Status.SCORED:
                self._observer.scored(result)
            else:
                self._observer.rejected(result)

    def _read(
        self,
        message_id: str,
        ref: ObjectRef,
        plan: RecordPlan,
        classifier: Callable[[], Classifier],
        *,
        isolated: bool,
    ) -> _PendingImage | None:
        started = self._clock()
        if ref.bucket != self._input_bucket or not ref.key.startswith(self._input_prefix):
            # Never read, and no row: the function reads only what it is there to score (not even the model bucket).
            self._observer.dropped(
                f"the record names an object outside s3://{self._input_bucket}/{self._input_prefix}: {ref.image_key}"
            )
            return None
        if ref.is_backfill:
            try:
                ref = self._backfill_ref(ref, classifier().spec.version)
            except AlreadyScoredError as already:
                self._observer.skipped(ref.image_key, ref.etag, str(already))
                return None
        try:
            head = self._images.head(ref)
            if head.size == 0:
                raise InvalidImageError(RejectionReason.EMPTY, "the object has zero bytes")
            if head.size > self._max_image_bytes:
                raise InvalidImageError(
                    RejectionReason.TOO_LARGE, f"{head.size} bytes exceeds the limit of {self._max_image_bytes}"
                )
            size = classifier().input_size
            data = self._images.read(ref)
            if isolated:
                decoded, pixels = decode_isolated(data, size, self._isolation)
            else:
                decoded = decode(data, size)
                pixels = resize_for_model(decoded, size).pixels
        except (InvalidImageError, ObjectGoneError, ObjectArchivedError) as permanent:
            plan.results.append(self._rejection(ref, *_rejection_of(permanent), started))
            return None
        except ObjectReplacedError as replaced:
            self._observer.skipped(ref.image_key, ref.sequencer, str(replaced))
            return None
        return _PendingImage(message_id, ref, decoded, pixels, started, ref.explain or head.explain_requested)

    def _backfill_ref(self, ref: ObjectRef, served_version: str) -> ObjectRef:
        """The backfilled object's sort key: its version's sequence, then the model, so re-scorings keep history."""
        if served_version != ref.backfill_model:
            self._models.expire()
            raise ModelVersionMismatchError(
                f"the backfill asks for model {ref.backfill_model} but {served_version} is served; "
                "retried after the function re-reads the promoted model"
            )
        history = self._results.history(ref.image_key)
        return replace(ref, sequencer=rescoring_sequence(history, ref.etag, served_version))

    def _score(
        self, pending: list[_PendingImage], plans: dict[str, RecordPlan], classifier: Callable[[], Classifier]
    ) -> None:
        """One batched inference over every image that survived preprocessing, behind the screening stage."""
        live = [image for image in pending if plans[image.message_id].fault is None]
        if not live:
            return
        try:
            verdicts = classifier().screen(
                np.stack([image.pixels for image in live]),
                [(image.decoded.original_width, image.decoded.original_height) for image in live],
            )
        except Exception as fault:  # noqa: BLE001  # A model fault fails the records with images, so they retry.
            for image in live:
                plans[image.message_id].fault = fault
            return
        accepted: list[tuple[_PendingImage, Prediction]] = []
        for image, verdict in zip(live, verdicts, strict=True):
            if isinstance(verdict, InvalidImageError):
                # What the screening stage refuses is rejected like a file that cannot be decoded: no label, no
                # heatmap.
                plans[image.message_id].results.append(
                    self._rejection(image.ref, *_rejection_of(verdict), image.started)
                )
            else:
                accepted.append((image, verdict))
        if not accepted:
            return
        scored = [image for image, _ in accepted]
        heatmaps = HeatmapOutcome()
        if self._heatmaps is not None:
            heatmaps = self._heatmaps.run(scored, [prediction for _, prediction in accepted], classifier())
        for image in scored:
            if id(image) in heatmaps.faults:
                plans[image.message_id].fault = heatmaps.faults[id(image)]
        for image, prediction in accepted:
            if plans[image.message_id].fault is None:
                plans[image.message_id].results.append(
                    self._scored(image, prediction, heatmaps.addresses.get(id(image)))
                )

    def _scored(self, image: _PendingImage, prediction: Prediction, heatmap_key: str | None) -> ScoringResult:
        return self._result(
            image.ref,
            Status.SCORED,
            image.started,
            heatmap_key=heatmap_key,
            model_version=prediction.model_version,
            label=prediction.label,
            confidence=round(prediction.confidence, 6),
            pneumonia_probability=round(prediction.pneumonia_probability, 6),
            threshold=round(prediction.threshold, 6),
        )

    def _rejection(self, ref: ObjectRef, reason: RejectionReason, detail: str, started: float) -> ScoringResult:
        return self._result(ref, Status.REJECTED, started, reason=reason.value, reason_detail=detail[:500])

    def _result(self, ref: ObjectRef, status: Status, started: float, **verdict: Any) -> ScoringResult:
        """A result item for the notified object version, timed from when its processing started."""
        return ScoringResult(
            image_key=ref.image_key,
            object_sequence=ref.sequencer,
            status=status,
            object_etag=ref.etag,
            object_size=ref.size,
            object_version_id=ref.version_id,
            trigger=Trigger.BACKFILL if ref.is_backfill else Trigger.UPLOAD,
            scored_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            latency_ms=round((self._clock() - started) * 1000, 2),
            **verdict,
        )


def _rejection_of(fault: InvalidImageError | ObjectGoneError | ObjectArchivedError) -> tuple[RejectionReason, str]:
    """The reason and fixed detail of a permanent fault of one object."""
    if isinstance(fault, InvalidImageError):
        return fault.reason, fault.detail
    if isinstance(fault, ObjectGoneError):
        return RejectionReason.OBJECT_GONE, BUCKET_GONE_DETAIL if isinstance(
            fault, BucketGoneError
        ) else OBJECT_GONE_DETAIL
    return RejectionReason.OBJECT_ARCHIVED, ARCHIVED_DETAIL
