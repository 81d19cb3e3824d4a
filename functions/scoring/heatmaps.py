"""The heatmap stage of scoring: which scored films get a heatmap, their class activation maps, the overlay PNGs,
and their storage in the heatmap bucket, which has no notifications, so a heatmap never triggers scoring.

Images scored PNEUMONIA or INDETERMINATE (flagged for a reader), and those whose uploader or backfill asked for
one, get a heatmap stored before their
result is written, so a result never points to a heatmap that does not exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from core.events import ObjectRef
from core.labels import Label
from core.preprocessing import DecodedImage
from scoring.classifier import Classifier, Prediction
from scoring.concurrent_io import io_pool
from scoring.explainer import render_overlay
from scoring.image_store import TransientStorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

HEATMAP_PREFIX = "heatmaps/"
MAX_KEY_BYTES = 1024
"""S3's limit on the UTF-8 length of a key."""


class HeatmapStore:
    """Stores one PNG per result under ``heatmaps/<input bucket>/<key>.<result id>.png``."""

    def __init__(self, s3_client: S3Client, bucket: str) -> None:
        self._s3 = s3_client
        self.bucket = bucket

    @staticmethod
    def key_for(image_key: str, object_sequence: str) -> str:
        """Where the heatmap of one result goes: beside the image's other heatmaps, unique per result."""
        result_id = hashlib.sha256(object_sequence.encode()).hexdigest()[:16]
        key = f"{HEATMAP_PREFIX}{image_key.removeprefix('s3://')}.{result_id}.png"
        if len(key.encode()) <= MAX_KEY_BYTES:
            return key
        # An input key near S3's limit leaves no room for the prefix: such heatmaps are named by a digest instead.
        bucket = image_key.removeprefix("s3://").split("/", 1)[0]
        return f"{HEATMAP_PREFIX}{bucket}/_long-keys/{hashlib.sha256(image_key.encode()).hexdigest()}.{result_id}.png"

    def put(self, image_key: str, object_sequence: str, png: bytes) -> str:
        """Write the overlay (idempotent: a retry writes the same key) and return its ``s3://`` address."""
        key = self.key_for(image_key, object_sequence)
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=png, ContentType="image/png")
        except (ClientError, BotoCoreError) as error:
            raise TransientStorageError(f"cannot store the heatmap of {image_key}: {error}") from error
        return f"s3://{self.bucket}/{key}"


class HeatmapCandidate(Protocol):
    """A scored image as the stage reads it."""

    @property
    def ref(self) -> ObjectRef: ...

    @property
    def decoded(self) -> DecodedImage: ...

    @property
    def pixels(self) -> np.ndarray: ...

    @property
    def explain(self) -> bool: ...


class HeatmapObserver(Protocol):
    """Where a heatmap that could not be made is reported; the verdict is written without it."""

    def heatmap_failed(self, image_key: str, why: str) -> None: ...


@dataclass(frozen=True)
class HeatmapOutcome:
    """Per image (by ``id``): the address of its stored heatmap, or the transient fault that must retry it."""

    addresses: dict[int, str] = field(default_factory=dict)
    faults: dict[int, Exception] = field(default_factory=dict)


class HeatmapStage:
    """Computes, renders and stores the heatmaps of the scored images that need one."""

    def __init__(
        self, store: HeatmapStore, observer: HeatmapObserver, io_concurrency: int = 1, *, flagged: bool = True
    ) -> None:
        """Overlays are rendered one after another; up to ``io_concurrency`` of them are stored at once."""
        self._store = store
        self._observer = observer
        self._io_concurrency = io_concurrency
        # Whether every flagged film gets a heatmap, or only those asked for.
        self._flagged = flagged

    def run(
        self, images: Sequence[HeatmapCandidate], predictions: Sequence[Prediction], classifier: Classifier
    ) -> HeatmapOutcome:
        """The heatmaps of the images asked to be explained and (unless only those are wanted) of the flagged ones
        (PNEUMONIA or INDETERMINATE), stored."""
        wanted = [
            image
            for image, prediction in zip(images, predictions, strict=True)
            if image.explain or (self._flagged and prediction.label is not Label.NORMAL)
        ]
        outcome = HeatmapOutcome()
        if not wanted:
            return outcome
        try:
            explainer = classifier.explainer
            if explainer is None:
                raise ValueError(f"model {classifier.spec.version} has no explainer")
            maps = explainer.maps(np.stack([image.pixels for image in wanted]))
        except (ValueError, RuntimeError, OSError) as error:
            # The verdicts stand without heatmaps: a missing explanation never holds a result back.
            for image in wanted:
                self._observer.heatmap_failed(image.ref.image_key, str(error))
            return outcome
        # Each overlay is stored while the next one is rendered.
        stored: list[tuple[HeatmapCandidate, Callable[[], str | Exception]]] = []
        with io_pool(self._io_concurrency, len(wanted)) as submit:
            for image, contribution_map in zip(wanted, maps, strict=True):
                try:
                    png = render_overlay(image.decoded.grayscale, contribution_map)
                except (ValueError, OSError) as error:
                    self._observer.heatmap_failed(image.ref.image_key, str(error))
                    continue
                stored.append((image, submit(partial(self._store.put, image.ref.image_key, image.ref.sequencer, png))))
        for image, wait in stored:
            address = wait()
            if isinstance(address, TransientStorageError):
                # The record is retried and stores the heatmap again under the same key.
                outcome.faults[id(image)] = address
            elif isinstance(address, Exception):
                raise address
            else:
                outcome.addresses[id(image)] = address
        return outcome
