"""The scoring pipeline of one invocation: fetch and preprocess every image, score them in one batch, then commit
each SQS record's results.

It runs in two phases so that inference is batched across the whole invocation while the per-record outcome still
goes through Powertools' batch processor: ``prepare`` does the reading and scoring and remembers, per message,
the results to write or the transient fault to report; ``write`` writes every record's results at once, and
``commit`` then reports one record's writes, or raises its fault (or its write's), so that the record comes back in
``batchItemFailures`` and SQS retries it.

Between the two, the heatmap stage (``scoring.heatmaps``) stores the overlays the scored images need. The S3 reads,
the heatmap stores and the result writes of a batch run up to ``io_concurrency`` at once on a thread pool
(``scoring.concurrent_io``); everything else, the observer's reports included, stays on the calling thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import numpy as np

from core.events import ObjectRef, parse_message
from core.population import AgeRange, AgeRangeOverride, check_stated_age
from core.preprocessing import DecodedImage, decode, resize_for_model
from core.rejections import InvalidImageError, RejectionReason
from core.results import AlreadyScoredError, ResultsTable, ScoringResult, Status, Trigger, rescoring_sequence
from scoring.classifier import Classifier, Prediction
from scoring.concurrent_io import run_all
from scoring.heatmaps import HeatmapOutcome, HeatmapStage
from scoring.image_store import (
    BucketGoneError,
    ImageStore,
    ObjectArchivedError,
    ObjectGoneError,
    ObjectHead,
    ObjectReplacedError,
)
from scoring.isolated_decode import TIMEOUT_DETAIL, DecodeTimeoutError, IsolationLimits, decode_isolated
from scoring.model_provider import ModelProvider

DEFAULT_IO_CONCURRENCY = 10
"""S3 reads and DynamoDB writes in flight at once in one invocation: a full SQS batch's worth."""
READ_WAVE_BYTES = 64 * 1024 * 1024
"""The most bytes of a batch's objects read at once: ten films of a few MB are read together, while ten 50 MB
DICOMs are read a wave at a time, each wave decoded before the next is read, so their bytes never pile up in the
function's memory."""

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


DECODE_TIMEOUT_VERDICT_RECEIVE = 4
INVOCATION_RESERVE_SECONDS = 10.0
"""Time an invocation keeps for inference, heatmaps and writes after its isolated decodes: a decode gets at most the
invocation's remaining time less this, so ten slow films in a retried batch never run the function past its
timeout."""


class InvocationTimeExhaustedError(RuntimeError):
    """The invocation had no time left for this record's isolated decode; the record is retried (no verdict)."""


"""The delivery on which an isolated decode that runs past its time is rejected as ``DECODE_TIMEOUT``; on an
earlier one the overrun is transient and the record is retried (at most three timed-out tries, before the queue's
five receives send it to the dead-letter queue)."""


def receive_count(message: Message) -> int:
    """How often SQS has delivered the message, this delivery included."""
    try:
        return int(message.attributes.approximate_receive_count)
    except (KeyError, ValueError):  # An event without the attribute (tests, other sources): a first delivery.
        return 1


def is_retry(message: Message) -> bool:
    """Whether SQS has delivered the message before: its batch failed, or the invocation that had it died."""
    return receive_count(message) > 1


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
    writes: list[bool | Exception] | None = None
    """Per result, once ``write`` has run: True when written, False when a result already existed, or the fault
    of its write."""


@dataclass(frozen=True)
class _Fetched:
    """One object's HEAD and GET, done on an I/O thread: its bytes, or the fault that ended the reading."""

    ref: ObjectRef
    """The notified object, with a backfill's sort key once it has been worked out."""
    started: float
    head: ObjectHead | None = None
    data: bytes = b""
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
        accepted_ages: AgeRangeOverride | None = None,
        io_concurrency: int = DEFAULT_IO_CONCURRENCY,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """Only objects under ``input_prefix`` in ``input_bucket`` are read; without a ``heatmaps`` store no
        heatmap is made. A batch holding a record delivered before is decoded in child processes within
        ``isolation``'s limits (``scoring.isolated_decode``), so a file that kills its decoder costs only its own
        record. An upload whose object metadata or DICOM header states a patient age outside the served model's
        validated population (its card's accepted range, with ``accepted_ages``' bounds over it) is rejected. Up to
        ``io_concurrency`` S3 reads (HEAD and GET) and DynamoDB writes run at once on a thread pool of the batch;
        decoding and inference stay on the calling thread, in the records' order (1: every call in turn)."""
        if io_concurrency < 1:
            raise ValueError(f"io_concurrency must be at least 1, got {io_concurrency}")
        self._images = images
        self._heatmaps = heatmaps
        self._results = results
        self._models = models
        self._observer = observer
        self._max_image_bytes = max_image_bytes
        self._input_bucket = input_bucket
        self._input_prefix = input_prefix
        self._isolation = isolation or IsolationLimits()
        self._accepted_ages = accepted_ages or AgeRangeOverride()
        self._io_concurrency = io_concurrency
        self._clock = clock
        self._remaining_seconds: Callable[[], float] | None = None

    @property
    def model_version(self) -> str | None:
        """The version of the model in memory, if one has been loaded."""
        return self._models.loaded_version

    def load_model(self) -> None:
        """Load, or refresh when due, the served model now, outside an invocation (the local stack does so before
        it forks one, as a warm execution environment keeps its model); raises ``ModelUnavailableError``."""
        self._models.get()

    def prepare(
        self, messages: Sequence[Message], remaining_seconds: Callable[[], float] | None = None
    ) -> dict[str, RecordPlan]:
        """Read, validate and score every image of every message; nothing is written yet. ``remaining_seconds``
        (the Lambda context's remaining time) bounds the isolated decodes, so they never outlast the invocation."""
        self._remaining_seconds = remaining_seconds
        plans = {message.message_id: RecordPlan() for message in messages}
        # One model per invocation, loaded on first use: preprocessing and inference never see two versions.
        classifier = _first_outcome(self._models.get)
        pending: list[_PendingImage] = []
        # A batch holding any record SQS delivered before is decoded record by record in child processes, its first
        # deliveries too: a record whose invocation was killed once is never killed again by a file beside it (a
        # duplicate notification of the same bomb arrives as a first delivery).
        isolated = any(is_retry(message) for message in messages)
        # First every message is parsed, then every object it names is looked at (HEADs, concurrently), then, in
        # the records' order, the objects are read in waves of at most READ_WAVE_BYTES (GETs, concurrently) and
        # each is decoded before the next wave is read (forked children start only once the I/O threads are
        # gone); a record's first fault ends its reading, as before.
        wanted: list[tuple[Message, list[ObjectRef]]] = []
        for message in messages:
            try:
                parsed = parse_message(message.body)
            except Exception as fault:  # noqa: BLE001  # Any fault of one record must fail that record only.
                plans[message.message_id].fault = fault
                continue
            for why in parsed.malformed:
                self._observer.dropped(f"malformed record: {why}")
            wanted.append((message, [ref for ref in parsed.refs if self._readable(ref)]))
        reads = self._fetch_in_waves([ref for _, refs in wanted for ref in refs], classifier)
        for message, refs in wanted:
            plan = plans[message.message_id]
            fetched = [next(reads) for _ in refs]
            try:
                for read in fetched:
                    if isinstance(read, Exception):
                        raise read
                    image = self._decode(
                        message.message_id, read, plan, classifier, isolated=isolated, delivery=receive_count(message)
                    )
                    if image is not None:
                        pending.append(image)
            except Exception as fault:  # noqa: BLE001  # Any fault of one record must fail that record only.
                plan.fault = fault
        self._score(pending, plans, classifier)
        return plans

    def write(self, plans: Iterable[RecordPlan]) -> None:
        """Write the results of every plan without a fault, up to ``io_concurrency`` at once; ``commit`` then
        reports each record's writes (or raises its fault) in the batch processor's order."""
        todo = [plan for plan in plans if plan.fault is None and plan.writes is None]
        outcomes = iter(
            run_all(
                [partial(self._results.put_once, result) for plan in todo for result in plan.results],
                self._io_concurrency,
            )
        )
        for plan in todo:
            plan.writes = [next(outcomes) for _ in plan.results]

    def commit(self, plan: RecordPlan) -> None:
        """Report one record's written results (writing them first unless ``write`` has), or raise its fault, or the
        first fault of its writes, so the record is retried."""
        if plan.fault is not None:
            raise plan.fault
        if plan.writes is None:
            self.write([plan])
        assert plan.writes is not None  # Set by write.
        faults = [written for written in plan.writes if isinstance(written, Exception)]
        # What was written is reported even when another write of the record failed: its retry finds it written.
        for result, written in zip(plan.results, plan.writes, strict=True):
            if written is False:
                self._observer.skipped(result.image_key, result.object_sequence, "duplicate: a result already exists")
            elif written is True and result.status is Status.SCORED:
                self._observer.scored(result)
            elif written is True:
                self._observer.rejected(result)
        if faults:
            raise faults[0]

    def _readable(self, ref: ObjectRef) -> bool:
        """Whether the object is in the input bucket under its prefix; what is not is dropped, never read."""
        if ref.bucket == self._input_bucket and ref.key.startswith(self._input_prefix):
            return True
        # Never read, and no row: the function reads only what it is there to score (not even the model bucket).
        self._observer.dropped(
            f"the record names an object outside s3://{self._input_bucket}/{self._input_prefix}: {ref.image_key}"
        )
        return False

    def _fetch_in_waves(
        self, refs: Sequence[ObjectRef], classifier: Callable[[], Classifier]
    ) -> Iterator[_Fetched | Exception]:
        """Each object's HEAD and GET, in the refs' order. The HEADs run at once; the GETs in waves whose sizes add
        up to at most ``READ_WAVE_BYTES`` (a larger object is a wave of its own), each wave read only when the caller
        asks for its first object, so a batch of large files never holds all their bytes at once."""
        heads = run_all([partial(self._head, ref, classifier) for ref in refs], self._io_concurrency)
        position = 0
        while position < len(heads):
            wave_end, wave_bytes = position, 0
            while wave_end < len(heads):
                size = _bytes_to_read(heads[wave_end])
                if wave_end > position and wave_bytes + size > READ_WAVE_BYTES:
                    break
                wave_bytes += size
                wave_end += 1
            yield from run_all([partial(self._read, head) for head in heads[position:wave_end]], self._io_concurrency)
            position = wave_end

    def _head(self, ref: ObjectRef, classifier: Callable[[], Classifier]) -> _Fetched:
        """On an I/O thread: a backfill's sort key, the HEAD and its checks. Only S3 and DynamoDB calls and checks
        of their answers run here; what becomes of the object is decided on the calling thread."""
        started = self._clock()
        try:
            if ref.is_backfill:
                ref = self._backfill_ref(ref, classifier().spec.version)
            head = self._images.head(ref)
            if head.size == 0:
                raise InvalidImageError(RejectionReason.EMPTY, "the object has zero bytes")
            if head.size > self._max_image_bytes:
                raise InvalidImageError(
                    RejectionReason.TOO_LARGE, f"{head.size} bytes exceeds the limit of {self._max_image_bytes}"
                )
            check_stated_age(head.stated_age_years, self._accepted(classifier()))  # The metadata is enough.
        except Exception as fault:  # noqa: BLE001  # Handled on the calling thread, in the records' order.
            return _Fetched(ref, started, fault=fault)
        return _Fetched(ref, started, head)

    def _read(self, headed: _Fetched | Exception) -> _Fetched | Exception:
        """On an I/O thread: the GET of an object whose HEAD passed its checks (anything else is handed on)."""
        if isinstance(headed, Exception) or headed.fault is not None:
            return headed
        try:
            data = self._images.read(headed.ref)
        except Exception as fault:  # noqa: BLE001  # Handled on the calling thread, in the records' order.
            return replace(headed, fault=fault)
        return replace(headed, data=data)

    def _decode(
        self,
        message_id: str,
        fetched: _Fetched,
        plan: RecordPlan,
        classifier: Callable[[], Classifier],
        *,
        isolated: bool,
        delivery: int,
    ) -> _PendingImage | None:
        """On the calling thread: what became of one object's reading (a rejection, a skip, or its fault raised)
        and, when it was read, its decoding."""
        ref, started = fetched.ref, fetched.started
        try:
            if fetched.fault is not None:
                raise fetched.fault
            assert fetched.head is not None  # A reading without a fault has its HEAD.
            size = classifier().input_size
            if isolated:
                limits = self._isolation_now()
                # A decode whose time the invocation's deadline cut short says nothing about the file: retried.
                verdict_delivery = delivery if limits == self._isolation else 0
                decoded, pixels = _decode_in_child(fetched.data, size, limits, verdict_delivery)
            else:
                decoded = decode(fetched.data, size)
                pixels = resize_for_model(decoded, size).pixels
            check_stated_age(decoded.stated_age_years, self._accepted(classifier()))
        except AlreadyScoredError as already:
            self._observer.skipped(ref.image_key, ref.etag, str(already))
            return None
        except (InvalidImageError, ObjectGoneError, ObjectArchivedError) as permanent:
            plan.results.append(self._rejection(ref, *_rejection_of(permanent), started))
            return None
        except ObjectReplacedError as replaced:
            self._observer.skipped(ref.image_key, ref.sequencer, str(replaced))
            return None
        return _PendingImage(message_id, ref, decoded, pixels, started, ref.explain or fetched.head.explain_requested)

    def _accepted(self, classifier: Classifier) -> AgeRange:
        """The patient ages the served model accepts: its card's range, with the deployment's bounds over it."""
        return self._accepted_ages.applied_to(classifier.spec.population.accepted)

    def _isolation_now(self) -> IsolationLimits:
        """The isolation limits of the next decode: its full time budget, or what the invocation has left when that
        is less (then a timeout is the invocation's, not the file's: ``InvocationTimeExhaustedError``)."""
        if self._remaining_seconds is None:
            return self._isolation
        left = self._remaining_seconds() - INVOCATION_RESERVE_SECONDS
        if left >= self._isolation.seconds:
            return self._isolation
        if left <= 1.0:
            raise InvocationTimeExhaustedError("no time left in this invocation to decode the file; retried")
        return replace(self._isolation, seconds=left)

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
            label=prediction.label.value,
            confidence=round(prediction.confidence, 6),
            pneumonia_probability=round(prediction.pneumonia_probability, 6),
            normal_below=round(prediction.operating_points.normal_below, 6),
            pneumonia_from=round(prediction.operating_points.pneumonia_from, 6),
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


def _bytes_to_read(headed: _Fetched | Exception) -> int:
    """How many bytes an object's GET will bring: its size when its HEAD passed, else none."""
    if isinstance(headed, Exception) or headed.fault is not None or headed.head is None:
        return 0
    return headed.head.size


def _decode_in_child(data: bytes, size: int, limits: IsolationLimits, delivery: int) -> tuple[DecodedImage, np.ndarray]:
    """``decode_isolated``, with a decode past its time a transient fault (``DecodeTimeoutError``, the record is
    retried) before delivery ``DECODE_TIMEOUT_VERDICT_RECEIVE``, and ``DECODE_TIMEOUT`` from then on."""
    try:
        return decode_isolated(data, size, limits)
    except DecodeTimeoutError:
        if delivery < DECODE_TIMEOUT_VERDICT_RECEIVE:
            raise
        raise InvalidImageError(RejectionReason.DECODE_TIMEOUT, TIMEOUT_DETAIL) from None


def _rejection_of(fault: InvalidImageError | ObjectGoneError | ObjectArchivedError) -> tuple[RejectionReason, str]:
    """The reason and fixed detail of a permanent fault of one object."""
    if isinstance(fault, InvalidImageError):
        return fault.reason, fault.detail
    if isinstance(fault, ObjectGoneError):
        return RejectionReason.OBJECT_GONE, BUCKET_GONE_DETAIL if isinstance(
            fault, BucketGoneError
        ) else OBJECT_GONE_DETAIL
    return RejectionReason.OBJECT_ARCHIVED, ARCHIVED_DETAIL


def _first_outcome(load: Callable[[], Classifier]) -> Callable[[], Classifier]:
    """``load``, called once: its classifier, or its fault raised again, for every later call. A model that cannot
    be loaded is then tried (downloaded, verified, reported) once per invocation, not once per record. The first
    I/O thread that needs the model loads it (and reports a refusal) while the calling thread waits for the reads;
    the others wait for that one load."""
    outcome: list[Classifier | Exception] = []
    lock = threading.Lock()

    def first() -> Classifier:
        with lock:
            if not outcome:
                try:
                    outcome.append(load())
                except Exception as fault:  # noqa: BLE001  # Raised again below, for every record that needs it.
                    outcome.append(fault)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    return first
