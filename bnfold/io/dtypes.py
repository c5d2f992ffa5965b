"""Element types: ONNX's enum and numpy's dtypes, derived from ``onnx.helper`` (no hand-written tables).

numpy holds float16/32/64 natively; bfloat16, float8, float4 and the 4-bit and 2-bit integers are
``ml_dtypes`` types (numpy's "user-defined" dtypes), which onnxruntime's numpy bridge cannot take.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
from numpy.typing import DTypeLike
from onnx import helper

__all__ = [
    "PLAIN_TYPES",
    "elem_type",
    "is_float",
    "is_native",
    "is_native_float",
    "np_dtype",
    "tensor_nbytes",
]


def np_dtype(elem: int) -> np.dtype | None:
    """numpy's dtype for an ONNX element type; None for ``UNDEFINED`` or a number ONNX does not define."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        return None


def elem_type(dtype: DTypeLike) -> int | None:
    """The ONNX element type of a numpy dtype; None when ONNX has none."""
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return None


def is_native(dtype: DTypeLike) -> bool:
    """True for numpy's own dtypes (bool, ints, floats, complex, strings), False for ml_dtypes' types."""
    return np.dtype(dtype).isbuiltin == 1


def is_native_float(dtype: DTypeLike) -> bool:
    """float16, float32, float64 (numpy's own floats; not bfloat16 or float8)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" and is_native(dtype)


def _bits(dtype: np.dtype) -> int | None:
    """Bits per element of an ml_dtypes type (4 for int4 stored one per byte); None when it has no info."""
    for info in (ml_dtypes.finfo, ml_dtypes.iinfo):
        try:
            return int(info(dtype).bits)
        except (TypeError, ValueError):
            continue
    return None


def is_float(dtype: DTypeLike) -> bool:
    """True for numpy's floats and ml_dtypes' (bfloat16, float8, float6 and float4 variants)."""
    dtype = np.dtype(dtype)
    if is_native(dtype):
        return dtype.kind == "f"
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def _is_plain(elem: int) -> bool:
    dtype = np_dtype(elem)
    if dtype is None or dtype.kind in "OSU":
        return False
    return is_native(dtype) or _bits(dtype) == 8 * dtype.itemsize


PLAIN_TYPES: frozenset[int] = frozenset(t for t in onnx.TensorProto.DataType.values() if _is_plain(t))
"""ONNX element types whose ``raw_data`` bytes are exactly numpy's little-endian layout: not strings, not the
packed types (int4, float4, int2, ... two or more elements to a byte)."""


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of ``tensor``'s data in ``raw_data`` layout, from its shape; None for a type not in
    :data:`PLAIN_TYPES`."""
    if tensor.data_type not in PLAIN_TYPES:
        return None
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(int(d) for d in tensor.dims) * itemsize
