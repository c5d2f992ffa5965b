"""Writing models and small files atomically: staged beside the target, renamed into place.

See :mod:`bnfold.io.staging` for how a model's tensor bytes are streamed and committed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx

from bnfold.errors import OutputError
from bnfold.io.staging import stage_model
from bnfold.io.store import TensorStore

__all__ = ["atomic_write_bytes", "save_model"]


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    base_dir: str | os.PathLike[str] | TensorStore | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically. The input ``model`` is not modified.

    ``external_data``: None chooses external data when the model does not fit one protobuf (2 GB);
    the data then goes to ``<name>.<crc>.data`` next to the output (named after its content; the data
    files only the previous model at ``path`` used are deleted once the new one is in place).
    ``base_dir``: the folder (or a :class:`~bnfold.io.store.TensorStore`) that the model's
    external-data references resolve against; their bytes are copied into the output. Without it,
    references are written unchanged.
    """
    store = base_dir if isinstance(base_dir, TensorStore) or base_dir is None else TensorStore(base_dir)
    with stage_model(model, path, external_data=external_data, store=store) as staged:
        staged.commit()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; raise ``OutputError`` with one line on failure."""
    target = Path(os.fspath(path))
    if not target.parent.is_dir():
        raise OutputError(f"{target}: directory {target.parent} does not exist")
    try:
        _atomic_write(target, data)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


def _atomic_write(target: Path, data: bytes) -> None:
    from bnfold.io.report_file import default_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:200]}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(target))  # mkstemp's 0600 is not what a user expects of an output
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
