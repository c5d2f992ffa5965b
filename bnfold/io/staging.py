"""Writing a model without holding its tensor bytes: staged beside the target, then renamed into place.

:class:`StagedModel` writes a model into a temporary folder beside its target: either one ``.onnx`` file
(tensor bytes streamed into the protobuf, byte-identical to ``SerializeToString``) or a model file plus
one data file. Tensor bytes come from the caller's in-memory tensors (one at a time) or from file ranges
(external data, a lazily loaded model's own file, the spill file of a fold), copied by the kernel
(``copy_file_range``). Everything is ``fsync``ed. How a model is laid out in bytes is
:mod:`bnfold.io.layout`.

Committing: renaming the model file is the one commit point. A data file is named after its content,
``OUT.<crc>.data`` (``<crc>``: 8 hex digits, the CRC-32 of its bytes, computed while it is ``fsync``ed), so
it never replaces a data file the previous ``OUT`` uses unless the bytes are the same (a rerun writes the
same names, byte for byte). :meth:`StagedModel.commit` renames the data files into place (the old model
still reads its own, intact), then the model; only then does it delete the data files the previous ``OUT``
used and the new one does not (never a file the input model uses, unless ``OUT`` is the input). An
interruption before the model is renamed leaves the previous ``OUT`` as it was (data files already moved
are removed again); a crash (power loss, ``SIGKILL``) can leave an unreferenced data file behind: the
new one if it came before the model's rename, the previous one if after. Either is harmless and can be
deleted.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
import tempfile
import threading
import zlib
from pathlib import Path

import onnx

from bnfold.errors import OutputError
from bnfold.io.layout import (
    Data,
    Piece,
    RangeCopier,
    inline_pieces,
    inline_size,
    light_copy,
    other_tensors,
    reusable_spill,
)
from bnfold.io.store import (
    ALIGN,
    ALIGN_MIN_BYTES,
    LAZY_MIN_BYTES,
    TensorStore,
    all_tensors,
    external_ref,
    set_external_ref,
    write_all,
)
from bnfold.io.wire import scan_model

__all__ = ["INLINE_LIMIT", "StagedModel", "stage_model"]

log = logging.getLogger(__name__)

INLINE_LIMIT = 2**31 - 1 - 2**20
"""Largest single-file model written (protobuf's 2 GB limit, with headroom); beyond it, external data."""
_EXTERNAL = onnx.TensorProto.EXTERNAL


def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    store: TensorStore | None = None,
    min_bytes: int = LAZY_MIN_BYTES,
) -> StagedModel:
    """Write ``model`` for ``path`` under temporary names beside it; see :class:`StagedModel`."""
    staged = StagedModel(path)
    try:
        staged.write(model, store=store, external_data=external_data, min_bytes=min_bytes)
    except BaseException:
        staged.discard()
        raise
    return staged


class StagedModel:
    """A model written under temporary names in a folder beside its target, not yet in place.

    ``path`` is the staged ``.onnx`` file: onnxruntime (or verification) can load it by path, its data
    files lie beside it under their final names. :meth:`commit` renames the data files, then the model,
    into the target's folder, then deletes the data files only the previous target used (see the module's
    docstring); :meth:`discard` deletes everything. Used as a context manager, whatever
    was not committed is discarded on exit. ``model`` is the model as written, its large tensors as
    external-data references relative to ``path``'s folder (into the ``.onnx`` itself for an inline file).
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        from bnfold.io.paths import as_path, check_output_path
        from bnfold.io.signals import remove_stale_staging, staging_prefix

        self.target = as_path(target, "output")
        directory = self.target.parent if str(self.target.parent) else Path(".")
        if not directory.is_dir():
            raise OutputError(f"{self.target}: output directory {directory} does not exist")
        check_output_path(self.target, "the output")  # a regular file or a new name; never a FIFO or device
        remove_stale_staging(directory, self.target.name)  # of killed runs for this target, on this host
        try:  # named after this process, so that a later run can tell a dead run's folder from a live one's
            self.dir = Path(tempfile.mkdtemp(prefix=staging_prefix(self.target.name), suffix=".tmp", dir=directory))
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot write ({exc.strerror or exc})") from exc
        self.path = self.dir / self.target.name
        self.model: onnx.ModelProto | None = None
        self.store: TensorStore | None = None
        self.data_files: list[str] = []
        """Names of the data files written beside the model (empty for a single-file model):
        ``<target name>.<crc>.data``, named after their content."""
        self.nbytes = 0
        """Bytes written: the model file and its data files."""
        self.committed = False

    @property
    def scratch(self) -> Path:
        """A file name inside the staging folder for temporary data (deleted with it)."""
        return self.dir / ".scratch"

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()

    # -- writing ----------------------------------------------------------------------------------
    def write(self, model: onnx.ModelProto, *, store: TensorStore | None = None,
              external_data: bool | None = None, min_bytes: int = LAZY_MIN_BYTES) -> None:
        """Write ``model`` into the staging folder (once). ``model`` is not modified. ``external_data``: None
        chooses external data when the model would exceed :data:`INLINE_LIMIT`; the main-graph initializers
        of at least ``min_bytes`` then go to the data file."""
        if self.model is not None:
            raise RuntimeError("a StagedModel is written once")
        self.store = store
        try:
            light, sources = light_copy(model, store, min_bytes)
            nbytes = inline_size(light, sources)
            use_external = external_data if external_data is not None else nbytes > INLINE_LIMIT
            if use_external:
                self._write_external(light, sources, store)
            else:
                self._write_inline(light, sources, store)
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot write ({exc.strerror or exc})") from exc

    def _write_inline(self, light: onnx.ModelProto, sources: list[Data | None], store: TensorStore | None) -> None:
        if store is not None:  # references outside the main initializers: read them into the copy
            for tensor in other_tensors(light):
                if tensor.data_location == _EXTERNAL:
                    store.materialize(tensor)
        pieces, positions = inline_pieces(light, sources)
        with open(self.path, "wb", buffering=0) as f, RangeCopier() as copier:
            offset = 0
            for piece in pieces:
                if isinstance(piece, bytes):
                    write_all(f, piece)
                    offset += len(piece)
                else:
                    copier.copy(piece, f)
                    offset += piece[2]
            os.fsync(f.fileno())
        self.nbytes = offset
        for index, pos, length in positions:  # what was written, as references into the file itself
            set_external_ref(light.graph.initializer[index], self.target.name, pos, length)
        self.model = light

    def _write_external(self, light: onnx.ModelProto, sources: list[Data | None], store: TensorStore | None) -> None:
        placed: list[tuple[onnx.TensorProto, Piece | Data]] = []
        for tensor, data in zip(light.graph.initializer, sources, strict=True):
            if data is not None:
                placed.append((tensor, data.range if data.range is not None else data))
        if store is not None:
            placed += [(t, store.ref(t)) for t in other_tensors(light) if t.data_location == _EXTERNAL]
        spill = reusable_spill(self.dir, placed, store)
        data_path = self.dir / ".data"  # renamed once its content, hence its name, is known
        refs: list[tuple[onnx.TensorProto, int, int]] = []
        if spill is not None:  # the folded tensors are already in a file here: it becomes the data file
            assert store is not None
            store.close()
            os.replace(spill, data_path)
        with open(data_path, "ab" if spill is not None else "wb", buffering=0) as f, RangeCopier() as copier:
            end = os.fstat(f.fileno()).st_size
            for tensor, piece in placed:
                if isinstance(piece, tuple) and piece[0] == spill:
                    refs.append((tensor, piece[1], piece[2]))
                    continue
                if isinstance(piece, Data):
                    piece = piece.piece()
                length = len(piece) if isinstance(piece, bytes) else piece[2]
                if length >= ALIGN_MIN_BYTES and end % ALIGN:
                    pad = ALIGN - end % ALIGN
                    write_all(f, bytes(pad))
                    end += pad
                if isinstance(piece, bytes):
                    write_all(f, piece)
                else:
                    copier.copy(piece, f)
                refs.append((tensor, end, length))
                end += length
            crc = _sync_and_crc32(f, data_path, end)
        data_name = _data_name(self.target, crc, end)
        os.replace(data_path, self.dir / data_name)
        for tensor, offset, length in refs:
            set_external_ref(tensor, data_name, offset, length)
        serialized = light.SerializeToString()
        with open(self.path, "wb", buffering=0) as f:
            write_all(f, serialized)
            os.fsync(f.fileno())
        self.data_files = [data_name]
        self.nbytes = len(serialized) + end
        self.model = light

    # -- committing -------------------------------------------------------------------------------
    def commit(self) -> None:
        """Rename the data files, then the model (the commit point), into place; remove the folder; delete
        the data files that only the previous target used."""
        if self.model is None:
            raise RuntimeError("nothing was written")
        directory = self.target.parent if str(self.target.parent) else Path(".")
        previous = _data_files_of(self.target)  # read before anything is replaced
        moved: list[Path] = []
        try:
            for name in self.data_files:
                dest = directory / name
                existed = os.path.lexists(dest)  # then the same bytes (named after them): nothing to undo
                os.replace(self.dir / name, dest)
                if not existed:
                    moved.append(dest)
            if moved:
                _fsync_dir(directory)  # the data files' names reach the disk before the model's
            _keep_mode(self.path, self.target)
            os.replace(self.path, self.target)
        except BaseException as exc:
            for dest in moved:  # the previous model does not use them: the folder is as it was
                with contextlib.suppress(OSError):
                    dest.unlink()
            if isinstance(exc, OSError):
                raise OutputError(f"{self.target}: cannot write ({exc.strerror or exc})") from exc
            raise
        self.committed = True
        self.path = self.target
        self._remove_dir()
        if previous:
            self._delete_unused(previous, directory)

    def _delete_unused(self, previous: set[Path], directory: Path) -> None:
        """Delete the files of ``previous`` (the previous target's data files) that neither the model now in
        place nor, unless it was replaced in place, the input model uses."""
        assert self.model is not None
        keep = {p.resolve() for p in _data_files_of_model(self.model, directory)} | {self.target.resolve()}
        store = self.store
        if store is not None and not (store.model_path is not None and store.model_path == self.target.resolve()):
            keep |= store.referenced_files()
        for path in previous:
            if path.resolve() in keep:
                continue
            try:
                path.unlink()
            except OSError as exc:  # the new model is in place: a file left behind is only disk space
                log.debug("%s: could not delete %s (%s)", self.target, path, exc)
            else:
                log.debug("%s: deleted %s, which only the previous model used", self.target, path)

    def discard(self) -> None:
        """Delete the staged files (nothing at the target is touched)."""
        if not self.committed:
            self._remove_dir()

    def _remove_dir(self) -> None:
        if not self.dir.exists():
            return
        for leftover in self.dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _data_name(target: Path, crc: int, size: int) -> str:
    """``<target>.<crc>.data``. A file of that name already beside the target holds the same bytes (a rerun);
    when its size says otherwise (a CRC collision, about 1 in 4e9), the next name in a fixed sequence."""
    digest = crc
    while True:
        name = f"{target.name}.{digest:08x}.data"
        try:
            existing = os.stat(target.parent / name)
        except FileNotFoundError:
            return name
        if stat.S_ISREG(existing.st_mode) and existing.st_size == size:
            return name
        digest = zlib.crc32(digest.to_bytes(4, "little"), digest)


_CRC_WINDOW = 1 << 24
"""Bytes of the data file mapped at a time while it is checksummed (keeps the pages it maps out of the peak
resident memory)."""


def _sync_and_crc32(f: object, path: Path, size: int) -> int:
    """``fsync`` the open file ``f`` (in a thread: the disk works while the CPU checksums) and return the
    CRC-32 of the first ``size`` bytes of ``path`` (its pages are still in the page cache)."""
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            os.fsync(f.fileno())  # type: ignore[attr-defined]
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    syncing = threading.Thread(target=sync, name="bnfold-fsync", daemon=True)
    syncing.start()
    try:
        crc = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, size, _CRC_WINDOW):
                with _map_read(fd, min(_CRC_WINDOW, size - offset), offset) as window:
                    crc = zlib.crc32(window, crc)  # releases the GIL
        finally:
            os.close(fd)
    finally:
        syncing.join()
    if errors:
        raise errors[0]
    return crc


def _map_read(fd: int, length: int, offset: int) -> mmap.mmap:
    """A read-only map of ``length`` bytes of ``fd`` at ``offset``, its pages mapped in one go where the
    platform can (``MAP_POPULATE``: faulting them in one at a time costs as much again as the checksum)."""
    if hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ, offset=offset)
    return mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=offset)


def _keep_mode(staged: Path, target: Path) -> None:
    """Give the staged file the mode of the regular file it replaces (else it keeps ``0666 & ~umask``)."""
    try:
        info = os.stat(target)
    except OSError:
        return
    if stat.S_ISREG(info.st_mode):
        os.chmod(staged, stat.S_IMODE(info.st_mode))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not every platform can open a folder
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _data_files_of(model_path: Path) -> set[Path]:
    """The external data files the model file at ``model_path`` uses (within its folder); empty when there
    is no such file, it cannot be read as a model, or it is a link (the model it names lives on after the
    name is replaced, with its data): then nothing is deleted."""
    try:
        info = os.lstat(model_path)
    except OSError:
        return set()
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1 or info.st_size == 0:
        return set()
    try:
        with model_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model, _ = scan_model(buf, LAZY_MIN_BYTES)
    except Exception as exc:  # best effort: a file that is not a model has no data files to clean up
        log.debug("%s: previous file not read as a model (%s)", model_path, exc)
        return set()
    return _data_files_of_model(model, model_path.parent if str(model_path.parent) else Path("."))


def _data_files_of_model(model: onnx.ModelProto, directory: Path) -> set[Path]:
    """The files that ``model``'s external-data references name, when they lie in ``directory``."""
    found: set[Path] = set()
    base = directory.resolve()
    locations = {external_ref(t)[0] for t in all_tensors(model) if t.data_location == _EXTERNAL}
    for location in locations:
        if not isinstance(location, str) or not location or "\0" in location:
            continue
        relative = Path(location)
        if relative.is_absolute() or ".." in relative.parts:
            continue
        path = directory / relative
        if base in path.resolve().parents and path.is_file():
            found.add(path)
    return found
