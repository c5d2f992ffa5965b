"""Which paths a run may read and write: one policy, checked before anything is read or written.

A run reads its input (the model file and every external data file it references, resolved through
links) and writes up to three things: OUT, OUT's data files (``OUT.<crc>.data``, beside OUT) and the
JSON report. The policy:

* the input is a regular file that can be opened for reading (never a FIFO, device or folder: opening a
  FIFO blocks, reading a device may never end); else :class:`~bnfold.errors.BadInputError` (exit 3);
* each thing written is a regular file or a new name, in an existing folder, with a name the file
  system accepts; a FIFO, device, socket or folder there is a :class:`~bnfold.errors.PathError`
  (usage, exit 2), a missing folder an :class:`~bnfold.errors.OutputError` (exit 6);
* each thing written is distinct from every file the input reads and from the other things written
  (``-o`` equal to the model itself is allowed: the write is atomic; the report never is);
  a violation is a :class:`~bnfold.errors.PathError`.

Files are compared by identity (device and inode) where they exist, so links and hard links cannot
sneak past, and by resolved path where they do not.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from bnfold.errors import BadInputError, OutputError, PathError

__all__ = ["STDOUT", "as_path", "check_input_file", "check_output_path", "check_run_paths", "describe_kind"]

STDOUT = "-"
"""The report path that means standard output."""

_DATA_NAME = re.compile(r"\.[0-9a-f]{8}\.data\Z")


def as_path(value: object, param: str) -> Path:
    """``value`` (str, bytes or os.PathLike) as a Path; TypeError naming ``param`` for anything else."""
    if isinstance(value, Path):
        return value
    if isinstance(value, bytes):
        return Path(os.fsdecode(value))
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        return Path(os.fsdecode(text) if isinstance(text, bytes) else text)
    raise TypeError(f"{param} must be a path (str or os.PathLike), not {type(value).__name__}")


def describe_kind(mode: int) -> str:
    """What a file of ``mode`` is, in words (for refusals)."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _too_long(path: Path) -> bool:
    directory = path.parent if str(path.parent) else Path(".")
    limit = _name_max(directory) if directory.is_dir() else 255
    return any(len(os.fsencode(part)) > limit for part in path.parts)


def check_input_file(path: Path) -> Path:
    """``path`` if it is a regular file this process can open for reading; BadInputError otherwise.

    Never opens anything but a regular file (a FIFO would block, a device may never end)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG or _too_long(path):
            raise BadInputError(f"{path}: file name too long") from None
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise BadInputError(f"{path}: is a directory, not a model file")
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{path}: is {describe_kind(info.st_mode)}, not a model file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    os.close(fd)
    return path


def check_output_path(path: Path, option: str) -> None:
    """``path`` can be written by replacing it: a regular file or a new name in an existing folder."""
    if _too_long(path):
        raise PathError(f"{path}: file name too long for {option} (at most {_name_max_of(path)} bytes a name)")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        info = os.stat(path)  # through links: a link to /dev/null names a device
    except FileNotFoundError:
        info = None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise OutputError(f"{path}: directory {directory} does not exist") from None
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise PathError(f"{path}: is {describe_kind(info.st_mode)}; {option} must name a regular file or a new one")
    if not directory.is_dir():
        raise OutputError(f"{path}: directory {directory} does not exist")


def _name_max_of(path: Path) -> int:
    directory = path.parent if str(path.parent) else Path(".")
    return _name_max(directory) if directory.is_dir() else 255


def _identity(path: Path) -> tuple[object, ...]:
    try:
        info = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("file", info.st_dev, info.st_ino)


def check_run_paths(
    inputs: Iterable[Path],
    *,
    model: Path | None = None,
    output: Path | None = None,
    report: Path | None = None,
) -> None:
    """Refuse (PathError) an output or report that is a file the run reads, or the same as each other.

    ``inputs``: every file the input reads (the model and its external data). ``model``: the input model
    file itself, which ``output`` may equal (a replacement in place)."""
    read = {_identity(p): p for p in inputs}
    model_id = _identity(model) if model is not None else None
    if output is not None:
        out_id = _identity(output)
        if out_id in read and out_id != model_id:
            raise PathError(f"{output}: -o/--output names {read[out_id]}, a file the input model reads; "
                            "choose another output")
    if report is not None and str(report) != STDOUT:
        rep_id = _identity(report)
        if rep_id in read:
            raise PathError(f"{report}: --report names {read[rep_id]}, a file the input reads; "
                            "choose another report path")
        if output is not None:
            if rep_id == _identity(output):
                raise PathError(f"{report}: --report names the output model; choose another report path")
            same_dir = _identity(report.parent if str(report.parent) else Path(".")) == _identity(
                output.parent if str(output.parent) else Path("."))
            if same_dir and report.name.startswith(output.name) and _DATA_NAME.fullmatch(
                    report.name[len(output.name):]):
                raise PathError(f"{report}: --report names a data file of the output model "
                                f"({output.name}.<crc>.data); choose another report path")
