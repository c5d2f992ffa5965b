"""SIGTERM and SIGHUP handled like Ctrl-C, and the staging folders a killed run leaves behind.

:func:`handle_termination` makes SIGTERM (``timeout``, CI cancellation, ``docker stop``, Kubernetes) and
SIGHUP (a closed terminal) raise :class:`Terminated`, a ``KeyboardInterrupt``: every ``finally`` and
``except BaseException`` that cleans up after Ctrl-C (the staging folder beside OUT, a staged report)
runs, and the command exits ``128 + signal`` (143, 129). A second signal during that cleanup is ignored.

A run killed by SIGKILL (or power loss) cannot clean up. Its staging folder is named after it:
``.<OUT name>.bnfold-<host>-<pid>.<random>.tmp``. :func:`remove_stale_staging` (called by each run that
stages a model for the same OUT) removes the folders of runs on this host whose process is gone, and
logs a warning naming each one; folders of live runs, of other hosts (a shared file system) and
anything not named this way are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["Terminated", "handle_termination", "remove_stale_staging", "staging_prefix"]

log = logging.getLogger(__name__)

_NAME_CHARS = 120
"""Characters of OUT's name kept in a staging folder's name (the rest of the name must fit NAME_MAX)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; ``signum`` says which. The exit code is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    for sig in _SIGNALS:  # the cleanup the exception triggers runs to its end
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (a no-op in
    other threads); the previous handlers come back after it."""
    previous: dict[int, Any] = {}
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or a platform without it
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def staging_prefix(target_name: str) -> str:
    """The start of the staging folder name of this process for a target named ``target_name``."""
    return f".{target_name[:_NAME_CHARS]}.bnfold-{_host()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def remove_stale_staging(directory: Path, target_name: str) -> list[Path]:
    """Remove the staging folders for ``target_name`` in ``directory`` left by dead runs on this host.

    Only folders named by :func:`staging_prefix` for this target, of a process that no longer exists, and
    holding nothing but plain files are removed. Returns what was removed (each also logged)."""
    head = f".{target_name[:_NAME_CHARS]}.bnfold-{_host()}-"
    pattern = re.compile(re.escape(head) + r"(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp\Z")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        folder = Path(entry.path)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue
            children = list(os.scandir(folder))
            if any(not child.is_file(follow_symlinks=False) for child in children):
                continue  # not what a run leaves: not ours to delete
            for child in children:
                os.unlink(child.path)
            os.rmdir(folder)
        except OSError as exc:
            log.debug("%s: stale staging folder not removed (%s)", folder, exc)
            continue
        log.warning("bnfold: removed %s, the staging folder of a run that was killed (pid %d)", folder, pid)
        removed.append(folder)
    return removed
