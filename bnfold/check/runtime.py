"""onnxruntime for bnfold in one place: provider names and which run here, models, session options.

Providers (:func:`resolve_providers`): by default CPU, plus CUDA when onnxruntime lists it *and* a session
really runs on it, else a note; a provider named explicitly that cannot run here is MissingDependencyError
(exit 7). Models (:func:`open_model`): paths, bytes or ModelProtos, with external data and protos over
2 GB. Sessions (:func:`create_session`): level, threads, provider; a silent fallback is a SessionError.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from bnfold.errors import BadInputError, BnfoldError, ExitCode, MissingDependencyError
from bnfold.io.load import load_lazily, load_model
from bnfold.io.staging import INLINE_LIMIT, stage_model
from bnfold.io.store import LAZY_MIN_BYTES

__all__ = [
    "CPU",
    "CUDA",
    "CUDA_UNAVAILABLE_NOTE",
    "EXACT_PROVIDER_OPTIONS",
    "LEVELS",
    "TENSORRT",
    "ModelHandle",
    "ModelSource",
    "ProviderProbe",
    "SessionError",
    "UnknownProviderError",
    "available_providers",
    "clean_ort_message",
    "create_session",
    "normalize_level",
    "normalize_provider",
    "open_model",
    "provider_chain",
    "resolve_providers",
    "short_provider",
]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": TENSORRT,
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
CUDA_UNAVAILABLE_NOTE = (
    "CUDA execution provider not available (onnxruntime-gpu not installed or no GPU): ran on CPU only"
)
EXACT_PROVIDER_OPTIONS: Mapping[str, Mapping[str, str]] = {CUDA: {"use_tf32": "0"}}
"""Provider options for numerical checks: TF32 convolutions add ~1e-3 relative noise to float32."""

LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # onnxruntime >= 1.22
    LEVELS["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
"""Optimization level names (the CLI's vocabulary) -> onnxruntime's enum."""

ProviderProbe = Callable[[str], "str | None"]
"""``probe(provider) -> None`` when a session really runs on ``provider``, else a one-line reason."""

_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_PROTO_LIMIT = INLINE_LIMIT
"""A ModelProto at least this big is written with external data for onnxruntime, not serialised."""
_SPILL_THRESHOLD = LAZY_MIN_BYTES
"""Initializers of at least this many bytes go to the external data file then. (Both are module
attributes, read at call time, so that tests can pretend a small model is over 2 GB.)"""


class SessionError(Exception):
    """onnxruntime could not create a session; ``str()`` is one clean line."""


class UnknownProviderError(BnfoldError, ValueError):
    """A provider name that is neither an alias (cpu, cuda, ...) nor a full onnxruntime name."""

    exit_code = ExitCode.USAGE


def normalize_level(level: str | ort.GraphOptimizationLevel) -> str:
    """``"enable_all"``, ``"ORT_ENABLE_ALL"`` or the enum -> ``"enable_all"``."""
    if isinstance(level, ort.GraphOptimizationLevel):
        for name, value in LEVELS.items():
            if value == level:
                return name
    key = str(level).strip().lower().removeprefix("ort_")
    key = {"enable_basic": "basic", "enable_extended": "extended", "enable_layout": "layout"}.get(key, key)
    if key not in LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; expected one of {', '.join(LEVELS)}")
    return key


def normalize_provider(name: str) -> str:
    """``"cuda"`` or ``"CUDAExecutionProvider"`` -> ``"CUDAExecutionProvider"``."""
    full = _ALIASES.get(name.strip().lower(), name.strip())
    if not full.endswith("ExecutionProvider"):
        raise UnknownProviderError(
            f"unknown execution provider {name!r}; use one of {', '.join(_ALIASES)} or a full onnxruntime name"
        )
    return full


def short_provider(provider: str) -> str:
    """``"CUDAExecutionProvider"`` -> ``"CUDA"`` (for labels)."""
    return "TensorRT" if provider == TENSORRT else provider.removesuffix("ExecutionProvider")


def available_providers() -> list[str]:
    """onnxruntime's list, looked up at each call (``onnxruntime.get_available_providers`` can be patched)."""
    return list(ort.get_available_providers())


def resolve_providers(requested: str | Sequence[str] | None, probe: ProviderProbe) -> tuple[list[str], list[str]]:
    """(providers to use, notes for the report).

    ``None`` or ``"auto"``: CPU, plus CUDA when onnxruntime lists it and ``probe`` finds that a session
    runs on it (onnxruntime-gpu silently falls back to CPU when the CUDA libraries fail to load), else a
    note. Names (aliases or full names, deduplicated): each must be listed and, but for CPU, pass
    ``probe``, else MissingDependencyError; an unknown name is UnknownProviderError.
    """
    available = available_providers()
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        if CUDA not in available:
            return [CPU], [CUDA_UNAVAILABLE_NOTE]
        error = probe(CUDA)
        if error is None:
            return [CPU, CUDA], []
        return [CPU], [
            f"CUDA execution provider is installed but a session could not run on it ({error}): ran on CPU only"
        ]
    names = [requested] if isinstance(requested, str) else list(requested)
    chosen = list(dict.fromkeys(normalize_provider(n) for n in names))
    if not chosen:
        raise ValueError("no execution provider requested")
    for provider in chosen:
        if provider not in available:
            hint = " (install bnfold[gpu], i.e. onnxruntime-gpu, on a machine with an NVIDIA GPU)"
            raise MissingDependencyError(
                f"execution provider {provider} is not available in this onnxruntime"
                f"{hint if provider in (CUDA, TENSORRT) else ''}; available: {', '.join(available)}"
            )
        error = None if provider == CPU else probe(provider)
        if error is not None:
            raise MissingDependencyError(f"a session could not run on {provider}: {error}")
    return chosen, []


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_NODE_STATUS = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|h|cpp):\d+\s+")


def clean_ort_message(exc: BaseException | str) -> str:
    """onnxruntime's error text without the status prefix, source location and C++ signature; one line."""
    text = _ORT_PREFIX.sub("", str(exc).strip())
    if _SOURCE_LOCATION.match(text):
        text = _SOURCE_LOCATION.sub("", text)
        depth, cut = 0, -1  # drop the C++ signature "ns::Class::Fn(args...) " that follows the location
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    cut = i + 1
                    break
            elif ch == " " and depth == 0:
                break
        if cut > 0:
            text = text[cut:].strip()
    text = _NODE_STATUS.sub(lambda m: f"{m[1]} node {m[2]!r}: " if m[2] else f"{m[1]} node: ", text)
    text = " ".join(text.split())
    return text[:500] + ("..." if len(text) > 500 else "")


@dataclass
class ModelHandle:
    """A model ready to hand to onnxruntime (``data``, else ``path``), plus its graph for inspection."""

    label: str
    proto: onnx.ModelProto
    """The graph; large initializers may be external-data references (not loaded)."""
    data: bytes | None = None
    path: Path | None = None
    external_dir: Path | None = None
    """Folder that external-data references resolve against."""
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ModelHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto | ModelHandle


def open_model(source: ModelSource, label: str, *, in_memory: bool = False) -> ModelHandle:
    """A path, bytes or ModelProto (or an existing handle, returned as is) ready for onnxruntime.

    A path is handed to onnxruntime as it is (``in_memory``: its bytes, its folder named for external
    data); the handle's graph is read without its large tensors (:func:`bnfold.io.load.load_lazily`). A
    ModelProto too big for one protobuf is written with external data to a temporary folder first.
    Raises BadInputError (naming ``label``) when it is missing or not an ONNX model. Close the handle
    (or use it as a context manager) to remove that temporary folder.
    """
    if isinstance(source, ModelHandle):
        return source
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview, onnx.ModelProto)):
        raise TypeError(f"model '{label}' must be a path, bytes or onnx.ModelProto, not {type(source).__name__}")
    try:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            proto = load_lazily(path).proto  # the graph; onnxruntime reads the tensors itself
            data = path.read_bytes() if in_memory else None
            return ModelHandle(label, proto, data=data, path=path, external_dir=path.parent)
        data = None if isinstance(source, onnx.ModelProto) else bytes(source)
        proto = load_model(source if data is None else data)
    except BadInputError as err:
        raise BadInputError(f"{err} (model '{label}')") from None
    except OSError as err:
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given model"
        raise BadInputError(f"{where}: cannot read (model '{label}'): {err.strerror or err}") from None
    if data is not None:
        return ModelHandle(label, proto, data=data)
    assert isinstance(source, onnx.ModelProto)
    if source.ByteSize() < _PROTO_LIMIT:
        return ModelHandle(label, source, data=source.SerializeToString())
    tmp = tempfile.TemporaryDirectory(prefix="bnfold-ort-")
    try:  # the staged files are never committed: they go with the folder
        staged = stage_model(source, Path(tmp.name) / "model.onnx", external_data=True, min_bytes=_SPILL_THRESHOLD)
    except BaseException:
        tmp.cleanup()
        raise
    assert staged.model is not None
    logger.info("model '%s' is over 2 GB; written with external data to %s for onnxruntime", label, staged.path)
    data = staged.path.read_bytes() if in_memory else None
    return ModelHandle(label, staged.model, data=data, path=staged.path, external_dir=staged.dir, _tmp=tmp)


def provider_chain(provider: str, options: Mapping[str, str] | None = None) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime's ``providers=`` argument: ``provider`` (with its options), then CPU for unsupported nodes."""
    return [CPU] if provider == CPU else [(provider, dict(options or {})), CPU]


def create_session(
    model: ModelHandle,
    provider: str = CPU,
    *,
    level: str = "disable_all",
    threads: int | None = None,
    provider_options: Mapping[str, str] | None = None,
    spinning: bool = True,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """One session on ``provider`` at optimization ``level`` (a :data:`LEVELS` name) with ``threads``
    intra-op threads (None: onnxruntime's default). ``spinning=False`` stops idle worker threads from
    busy-waiting: two sessions timed in turn then do not steal cores from each other. ``config``: extra
    session config entries.

    Raises SessionError when onnxruntime refuses the model or silently falls back to another provider.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 0
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 4  # failures come back as exceptions; a library keeps the terminal clean
    for key, value in (config or {}).items():  # session config entries, e.g. VERIFY_SESSION_CONFIG
        options.add_session_config_entry(key, value)
    if model.data is not None and model.external_dir is not None:
        options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(model.external_dir))
    source = model.data if model.data is not None else str(model.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnxruntime warns (and falls back) for unavailable providers
            session = ort.InferenceSession(source, options, providers=provider_chain(provider, provider_options))
    except Exception as exc:  # onnxruntime raises pybind exception types
        raise SessionError(clean_ort_message(exc)) from None
    active = session.get_providers()
    if not active or active[0] != provider:
        raise SessionError(f"{provider} did not start; onnxruntime fell back to {', '.join(active) or 'nothing'}")
    return session
