"""One-line messages whatever the names and paths in them, and output that reads well in a log file.

:func:`one_line` escapes what would break an error line: newlines and other control characters in
node names and paths (``\\n``, ``\\x1b``), and the undecodable bytes of a file name (Python decodes them
to lone surrogates: they are shown as ``\\xNN``). :func:`natural_width` is the width a table needs so
that no cell wraps, for consoles that are not terminals.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["natural_width", "one_line"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: an undecodable byte of a file name
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line: control characters and undecodable bytes escaped, trailing blanks dropped."""
    escaped = _CONTROL.sub(_escape, text.strip())
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def natural_width(console: Any, renderable: Any) -> int | None:
    """The width ``renderable`` (a rich table) takes when nothing wraps; None for other renderables."""
    from rich.measure import Measurement
    from rich.table import Table

    if not isinstance(renderable, Table):
        return None
    options = console.options.update(max_width=1 << 16, width=1 << 16)
    return max(Measurement.get(console, options, renderable).maximum, 1)
