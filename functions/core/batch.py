"""Powertools' batch processor, telling a callback about every record it reports in ``batchItemFailures``.

The processor itself records a failed record silently (it logs only when given a logger, and then the fault's text
and traceback, which can quote an S3 key or a service's answer); the callback decides what an operator sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.batch.base import FailureResponse
from aws_lambda_powertools.utilities.batch.exceptions import ExceptionInfo

FailureReporter = Callable[[Any, BaseException], None]
"""Called with the failed record (Powertools' data class; None when the record could not be read as one) and its
fault."""


class ReportingBatchProcessor(BatchProcessor):
    """A ``BatchProcessor`` that reports each failed record to ``on_failure`` before listing it as failed."""

    def __init__(self, event_type: EventType, on_failure: FailureReporter, **options: Any) -> None:
        super().__init__(event_type=event_type, **options)
        self._on_failure = on_failure

    def failure_handler(self, record: Any, exception: ExceptionInfo) -> FailureResponse:
        fault = exception[1]
        if fault is not None:
            self._on_failure(record, fault)
        return super().failure_handler(record, exception)
