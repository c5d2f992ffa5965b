"""Typed errors. Each carries the process exit code the command line uses for it.

Exit codes (documented in README.md):

====  ==================  ==========================================================
code  name                meaning
====  ==================  ==========================================================
0     OK                  success (including "nothing to fold")
1     INTERNAL            a bug in bnfold: please report it
2     USAGE               bad command-line usage (click's own code), or paths a run must not write
                          (an output that is a file the input reads, a FIFO, a device, a folder)
3     BAD_INPUT           the input is unreadable, not a model, or an invalid model
4     VERIFY_FAILED       the folded model does not match the original; nothing written
5     GATE_FAILED         the latency gate failed (folded model slower than allowed)
6     OUTPUT_ERROR        the output could not be written (permissions, disk full, ...)
7     MISSING_DEPENDENCY  an optional extra is needed (for instance ``bnfold[torch]``)
8     UNVERIFIED          a fold no check covered (the whole model does not run and the fold could not be
                          checked alone); nothing written unless ``--force``
129   HANGUP              SIGHUP (terminal closed); staging removed, no partial output left behind
130   INTERRUPTED         interrupted (Ctrl-C, SIGINT); no partial output is left behind
143   TERMINATED          SIGTERM (``timeout``, CI cancellation, ``docker stop``); as for SIGINT
====  ==================  ==========================================================
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BadInputError",
    "BnfoldError",
    "ExitCode",
    "GateFailedError",
    "MissingDependencyError",
    "OptionError",
    "OutputError",
    "PathError",
    "VerificationFailedError",
    "first_line",
]


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    BAD_INPUT = 3
    VERIFY_FAILED = 4
    GATE_FAILED = 5
    OUTPUT_ERROR = 6
    MISSING_DEPENDENCY = 7
    UNVERIFIED = 8
    HANGUP = 129
    INTERRUPTED = 130
    TERMINATED = 143


class BnfoldError(Exception):
    """Base of every error bnfold raises on purpose. ``str(err)`` is one line for the user."""

    exit_code: ExitCode = ExitCode.INTERNAL


class BadInputError(BnfoldError):
    """The input cannot be used: missing, unreadable, not ONNX/TorchScript, or an invalid model."""

    exit_code = ExitCode.BAD_INPUT


class OutputError(BnfoldError):
    """The output could not be written. The input and any previous output are untouched."""

    exit_code = ExitCode.OUTPUT_ERROR


class PathError(BnfoldError):
    """A path the run must not write (see :mod:`bnfold.io.paths`): an output or report that is a file the input
    reads or the other output, or that names a FIFO, a device or a folder. Refused before anything is
    read or written; a usage error (exit 2), one line."""

    exit_code = ExitCode.USAGE


class VerificationFailedError(BnfoldError):
    """The folded model does not compute the same function as the original. ``result``: what the call would
    have returned (``TorchFoldResult``, ``TorchExportResult``: the fold and its comparison), where it has one."""

    exit_code = ExitCode.VERIFY_FAILED

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class GateFailedError(BnfoldError):
    """A latency gate was exceeded."""

    exit_code = ExitCode.GATE_FAILED


class MissingDependencyError(BnfoldError):
    """An optional dependency is required for this input or option."""

    exit_code = ExitCode.MISSING_DEPENDENCY


class OptionError(BnfoldError, ValueError):
    """An argument value refused before anything runs (an unknown rule, a shape that fits no input, an
    optimization level this onnxruntime lacks). ``option`` names the command-line option it came from
    (None: no single one); the command line reports it as a usage error."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
