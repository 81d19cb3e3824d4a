"""What a command's failure tells its user: one line on stderr naming the problem and its fix, and an exit code per
kind of problem (the README's table). ``--debug`` or ``PNEUMOSCAN_DEBUG=1`` shows the traceback instead.

Nothing here imports botocore or the project's packages (but ``pneumoscan.terminal_text``, which imports only the
standard library): errors are recognised by their class names and modules, so a command that never loads boto3 does
not load it to report a failure either. A line's text from outside (a key, a path, an AWS message) is made inert:
control and bidi characters are shown as escapes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from pneumoscan.terminal_text import inert


class ExitCode(IntEnum):
    """The exit codes of every ``pneumoscan`` command."""

    OK = 0
    SOME_INPUTS_FAILED = 1
    """A file could not be scored, an image has no result yet, a backfill stopped (the output says which)."""
    USAGE = 2
    PROMOTION_REFUSED = 3
    """promote refused the candidate, or publish refused a version already published with other content."""
    MISSING_FILE = 4
    INVALID_INPUT = 5
    """The project's own checks refused a model artifact, a data set, a stack or a setting."""
    AWS_CREDENTIALS = 6
    AWS_ACCESS_DENIED = 7
    AWS_NO_SUCH_RESOURCE = 8
    AWS_UNREACHABLE = 9
    AWS_OTHER = 10
    INTERRUPTED = 130


class UsageError(SystemExit):
    """A command line that names too little or contradicts itself; one line and exit code 2."""


class MissingPathError(FileNotFoundError):
    """A file or folder the user named does not exist; the message names the fix. Exit code 4."""


PROJECT_PACKAGES = frozenset(
    {"core", "scoring", "publisher", "promotion", "batch_backfill", "training", "pneumoscan", "infra"}
)

CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "NoRegionError", "TokenRetrievalError", "SSOTokenLoadError"}
)
CREDENTIAL_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "ExpiredToken",
        "ExpiredTokenException",
        "AuthFailure",
    }
)
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "403", "Forbidden"})
NO_SUCH_RESOURCE_CODES = frozenset(
    {
        "NoSuchBucket",
        "NoSuchKey",
        "404",
        "NotFound",
        "ResourceNotFoundException",
        "QueueDoesNotExist",
        "AWS.SimpleQueueService.NonExistentQueue",
        "ValidationError",  # CloudFormation: "Stack with id S does not exist".
    }
)
UNREACHABLE_ERRORS = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"}
)

PROJECT_FIRST = frozenset({"NoCurrentModelError"})
"""Project errors whose own fix beats their AWS cause's (the missing pointer is S3's NoSuchKey underneath)."""

PROJECT_FIXES = {
    "ModelArtifactError": "give --model an artifact folder with model.tflite and model_card.json, e.g. models/release",
    "DataLayoutError": "give --data the chest_xray folder: train/ and test/, each with NORMAL/ and PNEUMONIA/",
    "HyperparameterError": "see pneumoscan train --help and the README's release recipe for the accepted values",
    "NoCurrentModelError": "publish and promote a model: pneumoscan publish ..., then pneumoscan promote --version V",
    "PointerMismatchError": "a file of the promoted version changed after promotion: restore it, or promote another",
    "UnpinnedPointerError": "promote the version again with this release: pneumoscan promote --version V",
    "UnpromotableVersionError": "publish the artifact again under a new version, then promote that",
    "RegistryError": "check the model bucket's name and that it holds models published with pneumoscan publish",
    "ConfigurationError": "set the variable it names",
    "OutputNotWritableError": "run the image as a user that can write /opt/ml/model and /opt/ml/output (README, "
    "'The training container'), or give --output an s3:// prefix",
    "FailureFileError": "run the image as a user that can write /opt/ml/output (README, 'The training container')",
    "RedriveError": "run pneumoscan redrive again; the messages not moved are still on the dead-letter queue",
    "RequantizeError": "the artifact stays as it is served; see README: int8 serving",
    "SiteCalibrationError": "give --data the site's labelled films (NORMAL/ and PNEUMONIA/, at least --min-per-class "
    "of each class, from two or more patients each) and --output a new folder",
}


@dataclass(frozen=True)
class Failure:
    """How a command ended: the line to print and the exit code."""

    exit_code: ExitCode
    line: str


def run_reported(run: Callable[[], int], command: str, *, debug: bool = False) -> int:
    """Run a command and return its exit code; a failure the user can fix is printed as one line on stderr and ends
    in its kind's exit code, anything else (a bug, or every failure with ``debug``) is raised with its traceback."""
    try:
        return run()
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except (Exception, UsageError) as error:  # Reported in one line when the user can fix it, else re-raised.
        failure = None if debug else describe(error, command)
        if failure is None:
            raise
        print(failure.line, file=sys.stderr)
        return failure.exit_code


def describe(error: BaseException, command: str) -> Failure | None:
    """The one-line report of ``error``, or None when it is not a problem the user can fix (a bug: traceback)."""
    chain = _chain(error)
    for cause in [] if type(error).__name__ in PROJECT_FIRST else chain:
        failure = _aws_failure(cause)
        if failure is not None:
            problem = _one_line(str(error)) if _is_project_error(error) else failure.line
            return Failure(failure.exit_code, f"pneumoscan {command}: {problem}; {_aws_fix(failure.exit_code)}")
    if isinstance(error, MissingPathError):
        return Failure(ExitCode.MISSING_FILE, f"pneumoscan {command}: {_one_line(str(error))}")
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        name = _one_line(str(error.filename or error))
        return Failure(ExitCode.MISSING_FILE, f"pneumoscan {command}: no such file or folder: {name}; check the path")
    if isinstance(error, UsageError):
        return Failure(ExitCode.USAGE, f"pneumoscan {command}: {_one_line(str(error))}")
    if _is_project_error(error):
        fix = next((PROJECT_FIXES[type(c).__name__] for c in chain if type(c).__name__ in PROJECT_FIXES), None)
        fix = fix or next(
            (PROJECT_FIXES[base.__name__] for base in type(error).__mro__ if base.__name__ in PROJECT_FIXES),
            "run it again with --debug for the details",
        )
        return Failure(ExitCode.INVALID_INPUT, f"pneumoscan {command}: {_one_line(str(error))}; {fix}")
    return None


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from (``raise ... from``), outermost first. An error merely raised while
    handling another (``__context__``) is not caused by it: a bug in an ``except`` block stays a bug."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__
    return chain


def _is_project_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in PROJECT_PACKAGES


def _aws_failure(error: BaseException) -> Failure | None:
    """An AWS client error by kind, with the problem in words (the line is completed by ``describe``)."""
    if not type(error).__module__.startswith(("botocore", "boto3")):
        return None
    name = type(error).__name__
    response = getattr(error, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    kinds = (
        (name in CREDENTIAL_ERRORS or code in CREDENTIAL_CODES, ExitCode.AWS_CREDENTIALS, "no usable AWS credentials"),
        (name in UNREACHABLE_ERRORS, ExitCode.AWS_UNREACHABLE, "cannot reach the endpoint"),
        (code in ACCESS_DENIED_CODES, ExitCode.AWS_ACCESS_DENIED, "access denied"),
        (code in NO_SUCH_RESOURCE_CODES, ExitCode.AWS_NO_SUCH_RESOURCE, "no such bucket, table, queue or stack"),
    )
    exit_code, problem = next(((kind, words) for hit, kind, words in kinds if hit), (ExitCode.AWS_OTHER, "AWS error"))
    return Failure(exit_code, f"{problem} ({_one_line(str(error))})")


def _aws_fix(code: ExitCode) -> str:
    return {
        ExitCode.AWS_CREDENTIALS: "configure AWS credentials and a region (aws configure, or AWS_PROFILE), or give "
        "--outputs / a local --endpoint-url for the local stack",
        ExitCode.AWS_ACCESS_DENIED: "use credentials whose role may do this (see the template's policies)",
        ExitCode.AWS_NO_SUCH_RESOURCE: "check --stack-name, --outputs, --bucket or --table, and the region",
        ExitCode.AWS_UNREACHABLE: "start the stack (pneumoscan local up) or check --endpoint-url and the network",
    }.get(code, "run it again with --debug for the details")


def _one_line(text: str) -> str:
    """``text`` on one line, its runs of spaces, tabs and line breaks as one space, and inert."""
    return inert(" ".join(text.split()))
