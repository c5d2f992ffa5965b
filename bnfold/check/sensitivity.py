"""The model's own sensitivity to float rounding, measured on the inputs a failing check used.

A fold rounds each tensor it writes once to the model's dtype: half a unit in the last place. An
ill-conditioned model (deep, with cancellation) amplifies that rounding far beyond the fixed dtype
tolerance while the fold is exact. To tell that apart from a wrong fold, the folded tensors (the
constant inputs of every folded producer) are perturbed by their rounding error (each element times
``1 +- eps/2``, random signs, :data:`DRAWS` draws) and the folded model is run again on the same inputs:
the largest change of each output is the *spread*, the error the model shows for rounding alone.

A check that failed the dtype table is accepted when, for every failing output, the fold's error is at
most :data:`FACTOR` x spread **and** every fold passed its isolated check (:mod:`bnfold.check.per_fold`)
at the dtype table. A wrong fold fails its isolated check, so it is never passed this way. The report
shows the table's allowance, the spread, the fold's error and which of them decided.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from bnfold.check.compare import figure
from bnfold.check.runner import RunError, check_session, run_session
from bnfold.check.runtime import ModelHandle, SessionError
from bnfold.io.dtypes import is_float

__all__ = ["DRAWS", "FACTOR", "OutputSensitivity", "folded_tensors", "measure_spread"]

logger = logging.getLogger(__name__)

FACTOR = 3.0
"""A fold's whole-model error may reach this many times the rounding spread (two draws underestimate
the worst case; the original's own float arithmetic adds its share)."""
DRAWS = 2


@dataclass(frozen=True)
class OutputSensitivity:
    """One output on one run: the fold's error against the table's allowance and the model's spread."""

    name: str
    provider: str
    seed: int | None
    fold_error: float
    """max |folded - original|."""
    table_allowance: float
    """The dtype table's atol + rtol x |original| where the error is largest."""
    spread: float
    """max |folded with its folded tensors perturbed by their rounding error - folded|."""

    @property
    def within(self) -> bool:
        return self.fold_error <= FACTOR * self.spread

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.name,
            "provider": self.provider,
            "seed": self.seed,
            "fold_error": self.fold_error,
            "table_allowance": self.table_allowance,
            "rounding_spread": self.spread,
            "allowed_by_spread": FACTOR * self.spread,
            "within_model_error": self.within,
        }

    @property
    def line(self) -> str:
        return (f"{self.name!r}: error {figure(self.fold_error)}, dtype table allows {figure(self.table_allowance)}, "
                f"the model's rounding spread {figure(self.spread)} allows {figure(FACTOR * self.spread)}")


def folded_tensors(model: onnx.ModelProto, outputs: Sequence[str]) -> list[str]:
    """Float initializers read by the producers of ``outputs`` in ``model``'s main graph."""
    graph = model.graph
    floats = {t.name for t in graph.initializer
              if is_float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))}
    wanted = set(outputs)
    names: list[str] = []
    for node in graph.node:
        if wanted.intersection(node.output):
            names += [i for i in node.input if i in floats and i not in names]
    return names


def _perturbed(handle: ModelHandle, names: Sequence[str], draw: int) -> ModelHandle:
    model = onnx.ModelProto()
    model.CopyFrom(handle.proto)
    rng = np.random.default_rng(draw)
    wanted = set(names)
    for t in model.graph.initializer:
        if t.name not in wanted:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            if handle.external_dir is None:
                continue
            external_data_helper.load_external_data_for_tensor(t, str(handle.external_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
        arr = numpy_helper.to_array(t)
        eps = float(ml_dtypes.finfo(arr.dtype).eps) / 2
        signs = rng.choice(np.array([-1.0, 1.0]), size=arr.shape)
        t.CopyFrom(numpy_helper.from_array((arr.astype(np.float64) * (1 + signs * eps)).astype(arr.dtype), t.name))
    return ModelHandle(f"{handle.label} (perturbed)", model, data=model.SerializeToString(),
                       external_dir=handle.external_dir)


def measure_spread(
    fold: ModelHandle,
    outputs: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    provider: str,
    threads: int | None,
    reference: Mapping[str, object],
) -> dict[str, float] | str:
    """output name -> max change when the folded tensors of ``outputs`` are perturbed; ``reference`` is the
    folded model's own run on ``feeds``. A string says why it could not be measured."""
    names = folded_tensors(fold.proto, outputs)
    if not names:
        return "no folded tensor to perturb"
    spread: dict[str, float] = {}
    for draw in range(DRAWS):
        try:
            with _perturbed(fold, names, draw) as handle:
                got = run_session(check_session(handle, provider, threads), feeds)
        except (SessionError, RunError, ValueError) as exc:
            return f"the perturbed model did not run: {exc}"
        for name, value in got.items():
            ref = reference.get(name)
            if isinstance(value, list) or ref is None or isinstance(ref, list):
                continue
            a, b = np.asarray(value), np.asarray(ref)
            if a.shape != b.shape or not is_float(a.dtype):
                continue
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            d = d[np.isfinite(d)]
            spread[name] = max(spread.get(name, 0.0), float(d.max()) if d.size else 0.0)
    logger.info("rounding spread of %d folded tensors: %s", len(names), spread)
    return spread
