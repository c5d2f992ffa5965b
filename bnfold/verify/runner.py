"""onnxruntime sessions for verification: model sources, providers, and running with any dtype.

Every session uses ``GraphOptimizationLevel.ORT_DISABLE_ALL``, so the original is not rewritten by
onnxruntime's own Conv+BN fusion before it serves as the reference. CUDA sessions are created with
``use_tf32=0``: TF32 convolutions would add ~1e-3 relative noise to float32 and hide or fake a failure.

Model sources: a path is handed to onnxruntime as a path (external data and models over 2 GB load
natively; the graph is read with ``load_external_data=False``); bytes are passed as bytes; a ModelProto
is serialised, or, when it is over protobuf's 2 GB limit, spilled tensor by tensor to a temporary folder
as external data and loaded from there.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import helper, numpy_helper

from bnfold.errors import BadInputError
from bnfold.onnx_io import load_model

__all__ = [
    "CPU",
    "CUDA",
    "ModelHandle",
    "ModelSource",
    "RunError",
    "SessionError",
    "clean_ort_message",
    "create_session",
    "open_model",
    "run_session",
    "select_providers",
    "with_extra_outputs",
]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
PROVIDER_OPTIONS: Mapping[str, Mapping[str, str]] = {CUDA: {"use_tf32": "0"}}
"""Options each provider's sessions are created with (recorded in the report's notes)."""

_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_PROTO_LIMIT = 2**31 - 2**20  # a little under protobuf's 2 GiB, for headroom
_SPILL_THRESHOLD = 1024  # bytes: tensors at least this big go to external data when spilling

ModelSource = Union[str, "os.PathLike[str]", bytes, onnx.ModelProto, "ModelHandle"]


class SessionError(Exception):
    """onnxruntime could not create a session; ``str()`` is one clean line."""


class RunError(Exception):
    """onnxruntime could not run a session; ``str()`` is one clean line."""


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_NODE_STATUS = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|h|cpp):\d+\s+")


def clean_ort_message(exc: BaseException | str) -> str:
    """onnxruntime's error text without the status prefix, source location and C++ signature; one line."""
    text = str(exc).strip()
    text = _ORT_PREFIX.sub("", text)
    if _SOURCE_LOCATION.match(text):
        text = _SOURCE_LOCATION.sub("", text)
        # drop the C++ signature "ns::Class::Fn(args...) " that follows the location
        depth, cut = 0, -1
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
    """A model ready to hand to onnxruntime, plus its graph for inspection."""

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


def _is_repeated(fd: FieldDescriptor) -> bool:
    # protobuf >= 6 has ``is_repeated``; ``label`` is gone in 7
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _copy_fields(src: Message, dst: Message, skip: str) -> None:
    """Copy every set field of ``src`` into ``dst`` except ``skip`` (which is never touched)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        target = getattr(dst, fd.name)
        if _is_repeated(fd):
            target.extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _spill(model: onnx.ModelProto, folder: Path) -> Path:
    """Write ``model`` under ``folder`` with its large main-graph initializers as external data,
    without mutating ``model`` and holding at most one tensor's bytes extra."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    with open(folder / "weights.bin", "wb") as f:
        offset = 0
        for tensor in model.graph.initializer:
            copy = light.graph.initializer.add()
            if tensor.ByteSize() < _SPILL_THRESHOLD or tensor.data_location == onnx.TensorProto.EXTERNAL:
                copy.CopyFrom(tensor)
                continue
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            copy.name, copy.data_type = tensor.name, tensor.data_type
            copy.dims.extend(tensor.dims)
            copy.data_location = onnx.TensorProto.EXTERNAL
            entries = (("location", "weights.bin"), ("offset", str(offset)), ("length", str(len(raw))))
            for key, value in entries:
                entry = copy.external_data.add()
                entry.key, entry.value = key, value
            f.write(raw)
            offset += len(raw)
    path = folder / "model.onnx"
    path.write_bytes(light.SerializeToString())
    return path


def open_model(source: ModelSource, label: str) -> ModelHandle:
    """Normalise a path, bytes, ModelProto (or an existing handle, returned as is)."""
    if isinstance(source, ModelHandle):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise BadInputError(f"{path}: no such file ({label} model)")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # protobuf raises several unrelated types
            raise BadInputError(f"{path}: not an ONNX model (protobuf could not parse it)") from None
        if not proto.HasField("graph"):
            raise BadInputError(f"{path}: not an ONNX model (no graph)")
        return ModelHandle(label, proto, path=path, external_dir=path.parent)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return ModelHandle(label, load_model(data), data=data)
    if isinstance(source, onnx.ModelProto):
        load_model(source)  # validity check only
        if source.ByteSize() < _PROTO_LIMIT:
            return ModelHandle(label, source, data=source.SerializeToString())
        tmp = tempfile.TemporaryDirectory(prefix="bnfold-verify-")
        path = _spill(source, Path(tmp.name))
        logger.info("%s model is over 2 GB; spilled to %s for onnxruntime", label, path)
        return ModelHandle(label, source, path=path, external_dir=path.parent, _tmp=tmp)
    raise TypeError(f"{label} model must be a path, bytes or onnx.ModelProto, not {type(source).__name__}")


def with_extra_outputs(handle: ModelHandle, names: Iterable[str]) -> ModelHandle:
    """A copy of ``handle`` whose main graph also outputs ``names`` (typed from value_info when known)."""
    source = handle.proto
    if handle.path is not None and handle.data is None:
        source = onnx.load(str(handle.path), load_external_data=False)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    present = {o.name for o in graph.output}
    known = {vi.name: vi for vi in graph.value_info}
    for name in names:
        if name in present:
            continue
        vi = graph.output.add()
        if name in known:
            vi.CopyFrom(known[name])
        else:
            vi.name = name  # untyped: onnxruntime infers it
        present.add(name)
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GB
        raise SessionError(f"the {handle.label} model holds over 2 GB inline; save it with external data") from None
    return ModelHandle(handle.label, model, data=data, external_dir=handle.external_dir)


def select_providers(requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Providers to try, CPU first and always; plus notes on those that cannot be tried."""
    available = ort.get_available_providers()
    explicit = requested is not None
    wanted = [_ALIASES.get(p.lower(), p) for p in (requested if requested is not None else (CPU, CUDA))]
    chosen: list[str] = [CPU]
    notes: list[str] = []
    for p in wanted:
        if p in chosen:
            continue
        if p in available:
            chosen.append(p)
            continue
        short = p.removesuffix("ExecutionProvider")
        how = " (it needs onnxruntime-gpu and an NVIDIA GPU)" if p == CUDA else ""
        lead = f"{short} was requested but not checked" if explicit else f"{short} not checked"
        notes.append(f"{lead}: onnxruntime {ort.__version__} has no {p}{how}; available: {', '.join(available)}")
    return chosen, notes


def create_session(handle: ModelHandle, provider: str, threads: int | None = None) -> ort.InferenceSession:
    """One session with optimizations off on ``provider`` (CPU as fallback for unsupported nodes).

    Raises SessionError when onnxruntime refuses the model or silently falls back to another provider.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 4  # failures come back as exceptions; keep the terminal clean
    providers: list[str | tuple[str, dict[str, str]]] = [CPU]
    if provider != CPU:
        providers = [(provider, dict(PROVIDER_OPTIONS.get(provider, {}))), CPU]
    try:
        if handle.data is None:
            assert handle.path is not None
            session = ort.InferenceSession(str(handle.path), options, providers=providers)
        else:
            if handle.external_dir is not None:
                options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(handle.external_dir))
            session = ort.InferenceSession(handle.data, options, providers=providers)
    except Exception as exc:  # onnxruntime raises pybind exception types
        raise SessionError(clean_ort_message(exc)) from None
    active = session.get_providers()
    if not active or active[0] != provider:
        fallback = ", ".join(active) or "nothing"
        raise SessionError(f"{provider} did not start; onnxruntime fell back to {fallback}")
    return session


def _is_native(dtype: np.dtype) -> bool:
    return dtype.kind in "biufcOSU?"


def _to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    if _is_native(array.dtype):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    raw = np.ascontiguousarray(array).view(np.dtype(f"u{array.dtype.itemsize}"))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_element_type=elem)


def _from_ortvalue(value: ort.OrtValue) -> np.ndarray:
    try:
        return np.asarray(value.numpy())
    except Exception:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.element_type()))
        shape = tuple(value.shape())
        if value.device_name().lower() != "cpu":
            raise RunError(f"cannot read a {dtype.name} output from {value.device_name()} memory") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype)
        buf = (ctypes.c_uint8 * nbytes).from_address(value.data_ptr())
        return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape)


def run_session(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
) -> dict[str, object]:
    """Run once; returns name -> numpy array (a list of arrays for a sequence output)."""
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    exotic_out = {o.name for o in session.get_outputs() if "bfloat16" in o.type or "float8" in o.type}
    exotic = any(not _is_native(a.dtype) for a in feeds.values()) or any(n in exotic_out for n in names)
    try:
        if not exotic:
            values = session.run(names, dict(feeds))
            return {n: (v if isinstance(v, list) else np.asarray(v)) for n, v in zip(names, values, strict=True)}
        ort_feeds = {k: _to_ortvalue(np.asarray(v)) for k, v in feeds.items()}
        outs = session.run_with_ort_values(names, ort_feeds)
        return {n: _from_ortvalue(v) for n, v in zip(names, outs, strict=True)}
    except RunError:
        raise
    except Exception as exc:
        raise RunError(clean_ort_message(exc)) from None
