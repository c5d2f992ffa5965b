"""The typed results of a verification: per run, per fold checked while localising, and the whole check.

Each is a frozen dataclass with ``to_dict()`` (JSON-ready: no inf or nan) and, for :class:`Comparison`,
a one-line ``summary``. The per-output figures are :class:`bnfold.check.compare.OutputComparison`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bnfold.check.compare import OutputComparison, Tolerances, figure
from bnfold.check.feeds import InputInfo
from bnfold.check.per_fold import PerFoldResult
from bnfold.check.sensitivity import OutputSensitivity
from bnfold.environment import Environment

__all__ = ["Comparison", "FoldCheck", "Localisation", "RunComparison", "verification_environment"]


def verification_environment(threads: int | None, providers: Sequence[str] = ()) -> Environment:
    """The environment of a check on onnxruntime ``providers``: optimizations off, ``threads`` intra-op
    threads (0: onnxruntime's default)."""
    gpus = any(p != "CPUExecutionProvider" for p in providers)
    return Environment.capture(level="ORT_DISABLE_ALL", threads=threads or 0, gpus=gpus)


@dataclass(frozen=True)
class RunComparison:
    """All outputs on one provider for one seed (seed None: every input was supplied)."""

    provider: str
    seed: int | None
    outputs: tuple[OutputComparison, ...]
    error: str = ""
    """Set when the folded model could not be loaded or run; then outputs is empty."""

    @property
    def passed(self) -> bool:
        return not self.error and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "seed": self.seed,
            "passed": self.passed,
            "error": self.error,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass(frozen=True)
class FoldCheck:
    """One fold's output tensor compared between the two models during localisation."""

    output: str
    rule: str
    original_node: str
    """``BatchNormalization 'bn1'`` style description of the producer in the original model."""
    folded_node: str
    comparison: OutputComparison | None
    note: str = ""
    """Why this fold could not be checked (comparison is None)."""

    @property
    def diverges(self) -> bool:
        return self.comparison is not None and not self.comparison.passed

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.output,
            "rule": self.rule,
            "original_node": self.original_node,
            "folded_node": self.folded_node,
            "diverges": self.diverges,
            "note": self.note,
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
        }


@dataclass(frozen=True)
class Localisation:
    """Which fold broke: fold outputs compared in the folded graph's topological order."""

    provider: str
    seed: int | None
    checks: tuple[FoldCheck, ...]
    error: str = ""
    """Set when localisation itself could not run."""

    @property
    def first(self) -> FoldCheck | None:
        """The first fold, in topological order, whose output diverges."""
        return next((c for c in self.checks if c.diverges), None)

    @property
    def message(self) -> str:
        if self.error:
            return f"could not localise: {self.error}"
        first = self.first
        if first is not None:
            assert first.comparison is not None
            rule = f" ({first.rule})" if first.rule else ""
            return (
                f"first diverging fold: {first.output!r}{rule}, {first.folded_node} "
                f"(was {first.original_node}): {first.comparison.reason}"
            )
        checked = sum(c.comparison is not None for c in self.checks)
        if not checked:
            return "no fold output could be checked"
        return f"none of the {checked} fold outputs diverges; the difference arises after them"

    def to_dict(self) -> dict[str, object]:
        first = self.first
        return {
            "provider": self.provider,
            "seed": self.seed,
            "message": self.message,
            "first": None if first is None else first.output,
            "error": self.error,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`bnfold.check.verify`: truthy when the folded model matches the original."""

    passed: bool
    providers: tuple[str, ...]
    """Providers actually checked (each folded-vs-original on the same provider)."""
    seeds: tuple[int, ...]
    """Seeds used; empty when every input was supplied."""
    runs: tuple[RunComparison, ...]
    tolerances: Tolerances
    inputs: tuple[InputInfo, ...]
    environment: Environment
    problems: tuple[str, ...] = ()
    """Signature differences that fail the check before anything runs."""
    notes: tuple[str, ...] = ()
    """Plain remarks: a provider not checked and why, inputs cast, outputs order changed."""
    localisation: Localisation | None = None
    per_fold: PerFoldResult | None = None
    """Each fold checked alone (run when the whole-model check failed the dtype table)."""
    sensitivity: tuple[OutputSensitivity, ...] = ()
    """The model's own rounding spread for each output that failed the dtype table."""
    decided_by: str = "dtype table"
    """``"dtype table"``, or ``"model sensitivity"`` when the table failed but every fold is exact alone and
    every error lies within the model's own rounding spread (see :mod:`bnfold.check.sensitivity`)."""

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> Iterator[tuple[RunComparison, OutputComparison | None]]:
        """(run, output) for each failing output; output None for a run that errored."""
        for run in self.runs:
            if run.error:
                yield run, None
            for out in run.outputs:
                if not out.passed:
                    yield run, out

    @property
    def worst(self) -> OutputComparison | None:
        """The output that needed the largest atol (a failing one first)."""
        outs = [o for r in self.runs for o in r.outputs]
        if not outs:
            return None
        return max(outs, key=lambda o: o.severity)

    @property
    def summary(self) -> str:
        """One line for a terminal or an exception message."""
        if self.problems:
            return "verification failed: " + "; ".join(self.problems)
        n_out = len({o.name for r in self.runs for o in r.outputs})
        where = ", ".join(p.removesuffix("ExecutionProvider") for p in self.providers) or "no provider"
        seeds = f"{len(self.seeds)} seed(s)" if self.seeds else "supplied inputs"
        if self.passed and self.decided_by == "model sensitivity":
            worst = max(self.sensitivity, key=lambda f: f.fold_error / max(f.spread, 1e-300))
            assert self.per_fold is not None
            return (f"verified on {where}, {seeds}, {n_out} output(s) within the model's own rounding error "
                    f"(decided by model sensitivity): {self.per_fold.summary}; worst {worst.line}{self._sized()}")
        if self.passed:
            w = self.worst
            figs = ""
            if w is not None and w.max_abs is not None:
                figs = (
                    f"; worst {w.name!r}: max abs error {figure(w.max_abs)}, "
                    f"allowed {figure(w.atol)} + {figure(w.rtol)} x |original|"
                )
            return f"verified on {where}, {seeds}, {n_out} output(s){figs}{self._sized()}"
        run, out = next(self.failures(), (None, None))
        if run is None:
            return "verification failed: nothing was compared"
        seed = "" if run.seed is None else f" seed {run.seed}"
        detail = run.error if out is None else f"output {out.name!r}: {out.reason}"
        text = f"verification failed on {run.provider.removesuffix('ExecutionProvider')}{seed}, {detail}"
        if self.localisation is not None:
            text += f"; {self.localisation.message}"
        return text

    def _sized(self) -> str:
        """``; dynamic inputs x[1,3,32,32] (ladder: size 32)`` when a dynamic shape was chosen."""
        sized = [i for i in self.inputs if i.shape_source]
        if not sized:
            return ""
        shapes = ", ".join(f"{i.name}[{','.join(map(str, i.shape))}]" for i in sized)
        return f"; dynamic inputs {shapes} ({sized[0].shape_source})"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (no inf/nan: figures that do not apply are null)."""
        return {
            "passed": self.passed,
            "summary": self.summary,
            "providers": list(self.providers),
            "seeds": list(self.seeds),
            "tolerances": self.tolerances.to_dict(),
            "inputs": [i.to_dict() for i in self.inputs],
            "problems": list(self.problems),
            "notes": list(self.notes),
            "runs": [r.to_dict() for r in self.runs],
            "localisation": None if self.localisation is None else self.localisation.to_dict(),
            "decided_by": self.decided_by,
            "per_fold": None if self.per_fold is None else self.per_fold.to_dict(),
            "sensitivity": [f.to_dict() for f in self.sensitivity],
            "environment": self.environment.to_dict(),
        }
