"""A model's inputs as it declares them (:class:`InputSpec`), and what each was fed (:class:`InputInfo`).

A dim is an int (fixed), a str (a symbol) or None (unknown, or 0 / negative: dynamic, as paddle2onnx's -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BadInputError

__all__ = ["Dim", "InputInfo", "InputSpec", "model_inputs"]

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the model declares it."""

    name: str
    elem_type: int
    dims: tuple[Dim, ...] | None
    """None when the model gives no shape; per dim an int (fixed), a str (symbol) or None (unknown)."""

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def dtype_name(self) -> str:
        """numpy's name: float32, bfloat16, int64, bool..."""
        return str(self.dtype.name)


@dataclass(frozen=True)
class InputInfo:
    """What one input was fed with, for the report."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    """"supplied", "normal(0, 1)", "uniform[lo, hi)", "integers[lo, hi)" or "bool"."""
    defaulted_dims: tuple[int, ...] = ()
    """Indexes of the dims that got a default value (see the module docstring)."""
    shape_source: str = ""
    """Where the dynamic dims came from (see :mod:`bnfold.check.sizes`); empty when none was dynamic."""

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "source": self.source,
            "defaulted_dims": list(self.defaulted_dims),
            "shape_source": self.shape_source,
        }


def model_inputs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The inputs a caller must feed: main-graph inputs that are not initializers (IR < 4 lists both)."""
    initializers = {t.name for t in model.graph.initializer}
    specs: list[InputSpec] = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        vtype = vi.type
        kind = vtype.WhichOneof("value")
        if kind == "optional_type" and vtype.optional_type.elem_type.WhichOneof("value") == "tensor_type":
            vtype = vtype.optional_type.elem_type  # an optional tensor is fed as a tensor
            kind = "tensor_type"
        if kind != "tensor_type":
            what = {"sequence_type": "sequence", "map_type": "map", "optional_type": "optional non-tensor",
                    "sparse_tensor_type": "sparse tensor"}.get(kind or "", "untyped value")
            raise BadInputError(
                f"input {vi.name!r} is a {what}, which verification cannot generate; "
                "fold without the check with --no-verify, or verify the written model with your own data"
            )
        ttype = vtype.tensor_type
        dims: tuple[Dim, ...] | None = None
        if ttype.HasField("shape"):
            dims = tuple(_declared_dim(d) for d in ttype.shape.dim)
        specs.append(InputSpec(vi.name, ttype.elem_type, dims))
    return tuple(specs)


def _declared_dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    """A fixed dim is a positive ``dim_value``; 0 and negative values (paddle2onnx writes -1), a ``dim_param``
    and a dim with neither are all dynamic."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return d.dim_param or None
