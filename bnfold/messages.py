"""One-line messages whatever the names and paths in them, and output that reads well in a log file.

:func:`one_line` escapes what would break an error line: newlines and other control characters in
node names and paths (``\\n``, ``\\x1b``), and the undecodable bytes of a file name (Python decodes them
to lone surrogates: they are shown as ``\\xNN``). :func:`natural_width` is the width a table needs so
that no cell wraps, for consoles that are not terminals.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["LOG_WIDTH", "natural_width", "one_line"]

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


LOG_WIDTH = 1 << 14
"""The width of a console writing to a log file: wide enough that nothing measured needs more."""


def natural_width(console: Any, renderable: Any) -> int | None:
    """The width ``renderable`` takes when nothing in it wraps (tables, groups of tables and text); 80 for
    a rule (it would fill any width); None for a plain string (printed without wrapping)."""
    from rich.measure import Measurement
    from rich.rule import Rule

    if isinstance(renderable, str):
        return None
    if isinstance(renderable, Rule):
        return 80
    options = console.options.update(max_width=LOG_WIDTH, width=LOG_WIDTH)
    return min(max(Measurement.get(console, options, renderable).maximum, 1), LOG_WIDTH)
