"""The torch import guard, TorchScript archive sniffing, loading and atomic writes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bnfold.errors import BadInputError, MissingDependencyError, first_line

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArchiveSource",
    "is_exported_program",
    "is_torchscript",
    "load_archive",
    "quiet",
    "read_source",
    "require_torch",
    "save_archive",
]

log = logging.getLogger(__name__)

ArchiveSource = str | os.PathLike[str] | bytes
INSTALL_HINT = "pip install 'bnfold[torch]'"


def require_torch(what: str = "TorchScript input") -> ModuleType:
    """``import torch``, or raise MissingDependencyError naming the extra to install."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs PyTorch, which is not installed: {INSTALL_HINT}") from exc
    return torch


def _zip_names(source: ArchiveSource | io.BytesIO) -> list[str] | None:
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(bytes(source))
        elif not isinstance(source, io.BytesIO) and not stat.S_ISREG(os.stat(source).st_mode):
            return None  # a FIFO would block, a device (/dev/zero) never ends: zip reads only its directory
        with zipfile.ZipFile(source) as zf:
            return zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _looks_like_torchscript(names: list[str]) -> bool:
    # torch.jit.save writes <archive>/code/__torch__/...py and <archive>/constants.pkl; plain torch.save
    # pickles (state dicts, eager modules) have <archive>/data.pkl but neither of those.
    return any("/code/" in n or n.endswith("/constants.pkl") or n == "constants.pkl" for n in names)


def is_torchscript(source: ArchiveSource) -> bool:
    """True when ``source`` (a path or the bytes of a file) is a TorchScript archive, judged by content.

    Needs no torch: a TorchScript archive is a zip file with ``*/code/`` and ``*/constants.pkl`` entries.
    """
    names = _zip_names(source)
    return names is not None and _looks_like_torchscript(names)


def is_exported_program(source: ArchiveSource) -> bool:
    """True when ``source`` (a path or bytes) is a ``torch.export.save`` archive (``.pt2``), judged by content.

    Reads only the zip's central directory (no torch): such an archive has ``*/archive_format`` and
    ``*/models/*.json`` entries and no TorchScript ``code/``.
    """
    names = _zip_names(source)
    if names is None or _looks_like_torchscript(names):
        return False
    return any(n.endswith("archive_format") for n in names) and any("/models/" in n for n in names)


def read_source(source: ArchiveSource) -> bytes:
    """The bytes of a TorchScript archive, or BadInputError saying what the input is instead."""
    if isinstance(source, bytes | bytearray | memoryview):
        data, what = bytes(source), "the given bytes"
    else:
        path = Path(os.fspath(source))
        if not path.is_file():
            raise BadInputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        what = str(path)
    names = _zip_names(data)
    if names is None:
        raise BadInputError(f"{what}: not a TorchScript archive (not a zip file)")
    if not _looks_like_torchscript(names):
        if any(n.endswith("data.pkl") for n in names):
            raise BadInputError(
                f"{what}: a torch.save() pickle (state dict or eager module), not TorchScript; "
                "save it with torch.jit.save(torch.jit.script(model)) or torch.jit.trace"
            )
        raise BadInputError(f"{what}: a zip file, but not a TorchScript archive (no code/ entries)")
    return data


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's deprecation chatter (torch.jit.* and the legacy ONNX exporter are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def load_archive(data: bytes, what: str = "the archive") -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU; BadInputError when torch cannot read it."""
    torch = require_torch()
    try:
        with quiet():
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError / ValueError / pickle errors
        first = first_line(exc)
        raise BadInputError(f"{what}: torch.jit.load failed: {first}") from exc


def save_archive(module: Any) -> bytes:
    """``torch.jit.save`` to bytes."""
    torch = require_torch()
    buf = io.BytesIO()
    with quiet():
        torch.jit.save(module, buf)
    return buf.getvalue()
