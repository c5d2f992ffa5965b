"""Run two TorchScript modules on the same inputs and compare them with the ONNX check's metrics.

The result is the same :class:`bnfold.check.result.Comparison` the ONNX check returns, with provider
``"torch-cpu"``; the per-output figures come from :func:`bnfold.check.compare.compare_arrays`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from bnfold.check.compare import Tolerances, compare_arrays
from bnfold.check.feeds import InputInfo
from bnfold.check.result import Comparison, RunComparison, verification_environment
from bnfold.errors import BadInputError, first_line
from bnfold.torch.inputs import TorchInputs, flatten_outputs

__all__ = ["PROVIDER", "compare_modules", "run_module"]

log = logging.getLogger(__name__)

PROVIDER = "torch-cpu"


def run_module(module: Any, inputs: TorchInputs) -> dict[str, np.ndarray]:
    """Outputs of ``module(*inputs)`` flattened by name. The global torch RNG is seeded first, so a module
    that draws random numbers (dropout in training mode) draws the same ones in both runs."""
    import torch

    torch.manual_seed(inputs.seed)
    with torch.no_grad():
        return flatten_outputs(module(*inputs.tensors))


def _run_pair(original: Any, folded: Any, inputs: TorchInputs, tolerances: Tolerances) -> tuple[RunComparison, str]:
    """One seed: (the run's comparison, a problem with the output names or "")."""
    shapes = [tuple(t.shape) for t in inputs.tensors]
    try:
        reference = run_module(original, inputs)
    except Exception as exc:
        raise BadInputError(f"the original module fails on inputs of shapes {shapes}: {first_line(exc)}") from exc
    try:
        candidate = run_module(folded, inputs)
    except Exception as exc:
        return RunComparison(provider=PROVIDER, seed=inputs.seed, outputs=(), error=first_line(exc)), ""
    problem = ""
    if list(reference) != list(candidate):
        problem = f"outputs differ: original {list(reference)}, folded {list(candidate)}"
    outputs = tuple(compare_arrays(n, reference[n], candidate[n], tolerances) for n in reference if n in candidate)
    return RunComparison(provider=PROVIDER, seed=inputs.seed, outputs=outputs), problem


def compare_modules(
    original: Any, folded: Any, inputs: Sequence[TorchInputs], tolerances: Tolerances | None = None
) -> Comparison:
    """Run both modules on each of ``inputs`` (one per seed); a typed Comparison, truthy when every output
    of every run matches."""
    import torch

    tolerances = tolerances or Tolerances()
    pairs = [_run_pair(original, folded, one, tolerances) for one in inputs]
    runs = tuple(run for run, _ in pairs)
    problems = tuple(dict.fromkeys(p for _, p in pairs if p))
    first = inputs[0]
    source = "normal(0, 1)" if first.source != "supplied" else "supplied"
    infos = tuple(
        InputInfo(name=n, dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), source=source)
        for n, t in zip(first.names, first.tensors, strict=True)
    )
    notes = [f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s)"]
    if first.source == "inferred":
        notes.append(f"input shapes inferred from the model: {[tuple(t.shape) for t in first.tensors]}")
    comparison = Comparison(
        passed=not problems and all(run.passed for run in runs),
        providers=(PROVIDER,),
        seeds=tuple(one.seed for one in inputs),
        runs=runs,
        tolerances=tolerances,
        inputs=infos,
        environment=verification_environment(torch.get_num_threads()),
        problems=problems,
        notes=tuple(notes),
    )
    log.info("%s", comparison.summary)
    return comparison
