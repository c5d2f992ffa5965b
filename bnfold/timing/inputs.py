"""Inputs for timing: the verifier's feed planning (bnfold.check.feeds) plus the latency rules.

Latency differs from verification in one way: a dynamic dimension other than the first (height, width,
sequence length) must be given, because timing at the verifier's default size (16) would be a misleading
number. The first dimension is the batch: ``batch`` when given, else 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bnfold.check.feeds import FeedPlan, InputSpec, model_inputs, plan_feeds
from bnfold.errors import BadInputError

__all__ = ["InputSpec", "make_feeds", "model_inputs", "plan_inputs", "same_signature"]


def same_signature(a: Sequence[InputSpec], b: Sequence[InputSpec]) -> bool:
    """Same input names with the same element types (shapes may differ in their symbols)."""
    return {s.name: s.elem_type for s in a} == {s.name: s.elem_type for s in b}


def plan_inputs(
    specs: Sequence[InputSpec],
    *,
    shapes: Mapping[str, Sequence[int] | int] | None = None,
    batch: int | None = None,
) -> tuple[FeedPlan, list[str]]:
    """Resolve every input's shape; returns the plan and notes for the report.

    ``shapes`` maps an input name to its full shape, or a symbolic dimension name to its value.
    ``batch`` replaces a dynamic first dimension of the inputs that ``shapes`` does not fix.
    """
    if batch is not None and batch < 1:
        raise BadInputError(f"batch size must be >= 1, got {batch}")
    wanted: dict[str, Sequence[int] | int] = dict(shapes or {})
    notes: list[str] = []
    if batch is not None:
        for spec in specs:
            if spec.name in wanted or not spec.dims:
                continue
            first, rest = spec.dims[0], spec.dims[1:]
            if isinstance(first, int) and first >= 0:
                if first != batch:
                    notes.append(
                        f"batch {batch} ignored for input '{spec.name}': its first dimension is fixed at {first}"
                    )
            elif isinstance(first, str) and first:
                wanted.setdefault(first, batch)
            elif all(isinstance(d, int) for d in rest):
                wanted[spec.name] = (batch, *rest)  # type: ignore[arg-type]
    plan = plan_feeds(specs, shapes=wanted)
    for name, axes in plan.defaulted.items():
        later = [a for a in axes if a != 0]
        if later:
            spec = next(s for s in specs if s.name == name)
            dims = ",".join("?" if d is None else str(d) for d in spec.dims or ())
            raise BadInputError(
                f"input '{name}' [{dims}] has dynamic dimension(s) at axis {', '.join(map(str, later))}; "
                f"give its shape for timing, e.g. --shape {name}=1,3,224,224 (shapes={{'{name}': [...]}})"
            )
    notes.extend(plan.notes)
    return plan, notes


def make_feeds(plan: FeedPlan, seed: int) -> dict[str, np.ndarray]:
    return plan.feeds(seed)
