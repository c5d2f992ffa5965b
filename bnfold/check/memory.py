"""Giving freed memory back to the system between onnxruntime sessions.

A session's weights are freed when it is dropped, but glibc's allocator keeps the pages for reuse; the
next session of a verification may not reuse them (a model written by bnfold is memory-mapped by
onnxruntime instead of copied), so the process would hold both. :func:`release_freed_memory` asks glibc
to return them (``malloc_trim``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from functools import cache
from typing import Any

__all__ = ["release_freed_memory"]

log = logging.getLogger(__name__)


@cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> None:
    """Collect garbage and return the allocator's free pages to the system (glibc only)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except (OSError, AttributeError) as exc:  # pragma: no cover -- a libc without it
            log.debug("malloc_trim failed: %s", exc)
