"""Running verification sessions with any dtype, and exposing fold outputs for localisation.

Models and sessions come from :mod:`bnfold.check.runtime` (``ORT_DISABLE_ALL``, so the original is not
rewritten by onnxruntime's own Conv+BN fusion before it serves as the reference; CUDA with
``use_tf32=0``). bfloat16 / float8 tensors, which numpy cannot hold natively, go in and out as OrtValues.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from bnfold.check.runtime import EXACT_PROVIDER_OPTIONS, ModelHandle, SessionError, clean_ort_message, create_session
from bnfold.io.dtypes import is_native

__all__ = ["RunError", "check_session", "run_session", "with_extra_outputs"]

logger = logging.getLogger(__name__)


class RunError(Exception):
    """onnxruntime could not run a session; ``str()`` is one clean line."""


VERIFY_SESSION_CONFIG = {"session.disable_prepacking": "1"}
"""Verification sessions do not pre-pack Gemm/MatMul weights: pre-packing keeps a second copy of every
weight (a session of a 320 MB model of Gemms peaks at 694 MB with it, 406 MB without); both models of a
check run the same way, and timing keeps onnxruntime's default."""


def check_session(model: ModelHandle, provider: str, threads: int | None) -> ort.InferenceSession:
    """A verification session: optimizations off, TF32 off on CUDA, no weight pre-packing. Raises
    SessionError."""
    return create_session(model, provider, threads=threads, provider_options=EXACT_PROVIDER_OPTIONS.get(provider),
                          config=VERIFY_SESSION_CONFIG)


def with_extra_outputs(handle: ModelHandle, names: Iterable[str]) -> ModelHandle:
    """A copy of ``handle`` whose main graph also outputs ``names`` (typed from value_info when known)."""
    model = onnx.ModelProto()
    model.CopyFrom(handle.proto)
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


def _to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    if is_native(array.dtype):
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
    exotic = any(not is_native(a.dtype) for a in feeds.values()) or any(n in exotic_out for n in names)
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
