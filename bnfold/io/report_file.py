"""The JSON report as a file that is committed together with the model, so the exit code tells the truth.

:class:`PendingReport` writes the report under a temporary name beside its path (``stage``) before the
model is committed, then renames it into place (``commit``) once the model is: a report that cannot be
written (disk full, permissions) stops the run before the model replaces OUT. The report file gets
ordinary permissions (``0666 & ~umask``, or the mode of the file it replaces), not ``mkstemp``'s 0600.
The path ``-`` is standard output: nothing is staged, the JSON is printed at commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from bnfold.errors import OutputError

__all__ = ["PendingReport", "default_mode", "report_bytes"]


def report_bytes(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=2, sort_keys=False, default=str).encode() + b"\n"


def default_mode(target: Path) -> int:
    """The mode a new file at ``target`` gets: the mode of the regular file it replaces, else
    ``0666 & ~umask``."""
    try:
        info = os.stat(target)
        if stat.S_ISREG(info.st_mode):
            return stat.S_IMODE(info.st_mode)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class PendingReport:
    """A report staged beside ``path`` (``"-"``: standard output), then committed or discarded."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.fspath(path))
        self.stdout = os.fspath(path) == "-"
        self._tmp: str | None = None
        self._data: bytes | None = None

    def stage(self, report: dict[str, Any]) -> None:
        """Write ``report`` under a temporary name (``OutputError`` naming the report path on failure)."""
        self.discard()
        data = report_bytes(report)
        if self.stdout:
            self._data = data
            return
        directory = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name[:200]}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(self._tmp, default_mode(self.path))
        except OSError as exc:
            self.discard()
            raise OutputError(f"{self.path}: cannot write the report ({exc.strerror or exc})") from exc

    def commit(self) -> None:
        """Put the staged report in place (or print it)."""
        if self.stdout:
            if self._data is not None:
                sys.stdout.buffer.write(self._data) if hasattr(sys.stdout, "buffer") else sys.stdout.write(
                    self._data.decode())
                sys.stdout.flush()
                self._data = None
            return
        if self._tmp is None:
            raise RuntimeError("nothing staged")
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.discard()
            raise OutputError(f"{self.path}: cannot write the report ({exc.strerror or exc})") from exc
        self._tmp = None

    def write(self, report: dict[str, Any]) -> None:
        """Stage and commit at once (no model to commit with it)."""
        self.stage(report)
        self.commit()

    def discard(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None
        self._data = None
