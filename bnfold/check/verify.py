"""``verify(original, folded)``: run both models on the same inputs, per provider and seed, and compare."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime as ort

from bnfold.check.compare import OutputComparison, Tolerances, compare_arrays
from bnfold.check.feeds import FeedPlan, InputsArg, model_inputs, plan_feeds
from bnfold.check.localise import FoldRef, fold_candidates, localise
from bnfold.check.memory import release_freed_memory
from bnfold.check.options import DEFAULT_SEEDS, VerifyOptions
from bnfold.check.per_fold import PerFoldResult, check_folds
from bnfold.check.result import Comparison, RunComparison, verification_environment
from bnfold.check.runner import RunError, check_session, run_session
from bnfold.check.runtime import (
    CPU,
    EXACT_PROVIDER_OPTIONS,
    ModelHandle,
    ModelSource,
    SessionError,
    open_model,
    resolve_providers,
)
from bnfold.check.sensitivity import OutputSensitivity, measure_spread
from bnfold.check.sizes import UnrunnableModelError, choose_plan, short_error
from bnfold.check.widen import WIDENED_NOTE, has_bfloat16, widen_bfloat16
from bnfold.errors import BadInputError, first_line
from bnfold.overrides import with_overrides

__all__ = ["DEFAULT_SEEDS", "VerifyOptions", "verify"]

logger = logging.getLogger(__name__)



def _signature(orig: ModelHandle, fold: ModelHandle) -> tuple[list[str], list[str]]:
    """(problems, notes) about the folded model's inputs compared with the original's."""
    o = {s.name: s.dtype_name for s in model_inputs(orig.proto)}
    f = {s.name: s.dtype_name for s in model_inputs(fold.proto)}
    problems = [f"the folded model lacks input {n!r}" for n in o if n not in f]
    problems += [f"the folded model has an extra input {n!r}" for n in f if n not in o]
    problems += [
        f"input {n!r} is {o[n]} in the original but {f[n]} in the folded model" for n in o if n in f and o[n] != f[n]
    ]
    notes = []
    if not problems and list(o) != list(f):
        notes.append("the folded model lists its inputs in a different order")
    o_out = [v.name for v in orig.proto.graph.output]
    f_out = [v.name for v in fold.proto.graph.output]
    if set(o_out) == set(f_out) and o_out != f_out:
        notes.append("the folded model lists its outputs in a different order")
    return problems, notes


def _flatten(values: Mapping[str, object]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in values.items():
        if isinstance(value, list):
            out[f"{name}.length"] = np.asarray(len(value), dtype=np.int64)
            for i, item in enumerate(value):
                out[f"{name}[{i}]"] = np.asarray(item)
        else:
            out[name] = np.asarray(value)
    return out


def _absent(name: str, a: np.ndarray, reason: str) -> OutputComparison:
    return OutputComparison(name, False, reason, a.dtype.name, tuple(a.shape), int(a.size), 0.0, 0.0)


def _compare_outputs(
    ref: Mapping[str, object], got: Mapping[str, object], tolerances: Tolerances
) -> tuple[OutputComparison, ...]:
    r, g = _flatten(ref), _flatten(got)
    results = [compare_arrays(n, r[n], g[n], tolerances) for n in r if n in g]
    for n in r:
        if n not in g:
            results.append(_absent(n, r[n], "missing from the folded model"))
    for n in g:
        if n not in r:
            results.append(_absent(n, g[n], "extra output of the folded model"))
    return tuple(results)


def _original_failed(plan: FeedPlan, provider: str, error: str) -> BadInputError:
    hints = [f"--shape {n}=DIMS" for n in plan.defaulted]
    generated = [s for s in plan.specs if s.name not in plan.given]
    if any(s.dtype.kind in "iu" and s.name not in plan.ranges for s in generated):
        hints.append("--input-range NAME=LO,HI for integer inputs")
    hints.append("--inputs FILE.npz with real data")
    return BadInputError(
        f"the original model fails on onnxruntime ({provider}) with inputs {plan.describe()}: "
        f"{short_error(error).rstrip('.')}. Try {', '.join(hints)}"
    )


def verify(
    original: ModelSource,
    folded: ModelSource,
    options: VerifyOptions | None = None,
    /,
    *,
    fold_outputs: Sequence[FoldRef] | None = None,
    **overrides: Any,
) -> Comparison:
    """Check that ``folded`` computes what ``original`` computes, on onnxruntime with optimizations off.

    Both models run on the same inputs for every seed on every provider: CPU always, CUDA too when
    onnxruntime offers it and a session really starts there (``providers=None``; otherwise a plain
    note says CUDA was not checked), or CPU plus the providers named (``["cuda"]``; one this machine
    cannot run raises MissingDependencyError). Each provider's folded run is compared with the
    original on the same provider.

    ``original``, ``folded``: a path, bytes or onnx.ModelProto (pass paths for external data).
    ``options`` (:class:`VerifyOptions`, or its fields as keywords: ``seeds``, ``rtol``, ``atol``,
    ``shapes``, ``inputs``, ``input_ranges``, ``providers``, ``threads``): inputs, tolerances, runtimes.
    ``fold_outputs``: fold output tensor names or ``FoldResult.folded``; used to localise a failure
    (inferred from the graphs when None).

    Returns a :class:`Comparison` (truthy when it passed). Raises BadInputError when the original
    model cannot be loaded or run on CPU with these inputs, or an option names an unknown input;
    MissingDependencyError when a provider named in ``providers`` cannot run here.
    """
    options = with_overrides(VerifyOptions, options, overrides)
    tolerances = Tolerances(options.rtol, options.atol)
    orig = open_model(original, "original")
    fold = open_model(folded, "folded")
    try:
        try:
            return _verify(orig, fold, options, tolerances, fold_outputs)
        except BadInputError as exc:
            wide = _widened(orig, fold) if "bfloat16" in str(exc) else None
            if wide is None:
                raise
            try:
                result = _verify(*wide, options, replace(tolerances, judge_as="bfloat16"), fold_outputs)
            finally:
                for handle in wide:
                    handle.close()
            return replace(result, notes=(*result.notes, WIDENED_NOTE))
    finally:
        for handle, source in ((orig, original), (fold, folded)):
            if handle is not source:
                handle.close()


def _widened(orig: ModelHandle, fold: ModelHandle) -> tuple[ModelHandle, ModelHandle] | None:
    """Both models with bfloat16 widened to float32, or None when that cannot be done exactly."""
    if not has_bfloat16(orig.proto):
        return None
    wide = [widen_bfloat16(h.proto) for h in (orig, fold)]
    if wide[0] is None or wide[1] is None:
        return None
    return open_model(wide[0], "original"), open_model(wide[1], "folded")


def _plan(
    orig: ModelHandle,
    shapes: Mapping[str, Sequence[int] | int] | None,
    inputs: InputsArg,
    input_ranges: Mapping[str, tuple[float, float]] | None,
    threads: int | None,
    opened: dict[str, ort.InferenceSession],
) -> FeedPlan:
    """The feed plan, with dynamic sizes the original runs on (see :mod:`bnfold.check.sizes`)."""
    specs = model_inputs(orig.proto)

    load_error: list[SessionError] = []

    def run(feeds: Mapping[str, np.ndarray]) -> None:
        if load_error:  # a model that does not load is not tried again at the next size
            raise load_error[0]
        if CPU not in opened:
            try:
                opened[CPU] = check_session(orig, CPU, threads)
            except SessionError as exc:
                load_error.append(exc)
                raise
        run_session(opened[CPU], feeds)

    try:
        return choose_plan(orig.proto, specs, run, shapes=shapes, inputs=inputs, input_ranges=input_ranges)
    except UnrunnableModelError:
        if CPU not in opened:  # the model does not even load: the caller's load error says so
            return plan_feeds(specs, shapes=shapes, inputs=inputs, input_ranges=input_ranges)
        raise


def _verify(
    orig: ModelHandle,
    fold: ModelHandle,
    options: VerifyOptions,
    tolerances: Tolerances,
    fold_outputs: Sequence[FoldRef] | None,
) -> Comparison:
    providers, seeds, threads = options.providers, options.seeds, options.threads
    opened: dict[str, ort.InferenceSession] = {}  # the probe's session of the original, reused below
    plan = _plan(orig, options.shapes, options.inputs, options.input_ranges, threads, opened)
    problems, notes = _signature(orig, fold)
    notes += plan.notes
    opened.clear()  # the sizes' probe session of the original: one session at a time from here
    release_freed_memory()

    def probe(provider: str) -> str | None:  # the session is dropped: one session at a time, CPU's first
        try:
            check_session(orig, provider, threads)
        except SessionError as exc:
            return str(exc)
        return None

    chosen, provider_notes = resolve_providers(providers, probe)
    chosen = [CPU, *(p for p in chosen if p != CPU)]  # CPU is the reference: always checked, first
    notes += provider_notes
    environment = verification_environment(threads, chosen)
    seed_list: tuple[int | None, ...] = seeds
    if plan.all_given:
        if seeds and plan.specs:
            notes.append("every input was supplied, so seeds were not used")
        seed_list = (None,)
    elif not seeds:
        raise ValueError("at least one seed is needed to generate inputs")
    if problems:
        return Comparison(False, (), (), (), tolerances, plan.info(), environment, tuple(problems), tuple(notes))

    feeds_cache: dict[int | None, dict[str, np.ndarray]] = {}
    folded_values: dict[tuple[str, int | None], dict[str, object]] = {}  # failing runs: for the spread
    runs: list[RunComparison] = []
    checked: list[str] = []
    for provider in chosen:
        try:
            s_orig = check_session(orig, provider, threads)
        except SessionError as exc:
            if provider == CPU:
                first = first_line(exc)
                raise BadInputError(
                    f"onnxruntime cannot load the original model, so the fold cannot be checked ({first}); "
                    "fold without the check with --no-verify"
                ) from None
            notes.append(f"{provider.removesuffix('ExecutionProvider')} not checked: {exc}")
            continue
        # One session at a time (peak memory: one model, not two): the original on every seed, its outputs
        # kept and its session dropped, then the folded model.
        refs: dict[int | None, dict[str, object]] = {}
        original_fails = ""
        for seed in seed_list:
            if seed not in feeds_cache:
                feeds_cache[seed] = plan.feeds(seed)
            try:
                refs[seed] = run_session(s_orig, feeds_cache[seed])
            except RunError as exc:
                if provider == CPU:
                    raise _original_failed(plan, provider, str(exc)) from None
                original_fails = str(exc)
                break
        del s_orig
        release_freed_memory()  # the original's weights go back to the system before the folded loads
        if original_fails:
            short = provider.removesuffix("ExecutionProvider")
            notes.append(f"{short} not checked: the original model fails there: {original_fails}")
            continue
        try:
            s_fold, fold_error = check_session(fold, provider, threads), ""
        except SessionError as exc:
            s_fold, fold_error = None, f"the folded model does not load on {provider}: {exc}"
        for seed in seed_list:
            if s_fold is None:
                runs.append(RunComparison(provider, seed, (), fold_error))
                continue
            try:
                got = run_session(s_fold, feeds_cache[seed])
            except RunError as exc:
                error = f"the folded model fails on {provider}: {exc}"
                runs.append(RunComparison(provider, seed, (), error))
                continue
            runs.append(RunComparison(provider, seed, _compare_outputs(refs.pop(seed), got, tolerances)))
            if not runs[-1].passed:
                folded_values[(provider, seed)] = got
        del s_fold, refs
        release_freed_memory()
        checked.append(provider)
        if provider in EXACT_PROVIDER_OPTIONS:
            opts = ", ".join(f"{k}={v}" for k, v in EXACT_PROVIDER_OPTIONS[provider].items())
            notes.append(f"{provider.removesuffix('ExecutionProvider')} checked with {opts}")

    passed = bool(runs) and all(r.passed for r in runs)
    localisation = None
    failing = next((r for r in runs if not r.passed and not r.error), None)  # one that produced outputs
    if failing is not None:
        localisation = localise(
            orig,
            fold,
            fold_outputs,
            feeds_cache[failing.seed],
            failing.provider,
            tolerances=tolerances,
            threads=threads,
            seed=failing.seed,
        )
        logger.info("verification failed; %s", localisation.message)
    per_fold: PerFoldResult | None = None
    figures: tuple[OutputSensitivity, ...] = ()
    decided_by = "dtype table"
    if not passed and runs and not any(r.error for r in runs):
        per_fold, figures, sens_notes = _model_tolerance(orig, fold, fold_outputs, runs, feeds_cache, folded_values,
                                                         tolerances, threads)
        notes += sens_notes
        if per_fold.passed and figures and all(f.within for f in figures):
            passed, decided_by = True, "model sensitivity"
    return Comparison(
        passed=passed,
        providers=tuple(checked),
        seeds=() if seed_list == (None,) else seeds,
        runs=tuple(runs),
        tolerances=tolerances,
        inputs=plan.info(),
        environment=environment,
        problems=(),
        notes=tuple(notes),
        localisation=localisation,
        per_fold=per_fold,
        sensitivity=figures,
        decided_by=decided_by,
    )


def _model_tolerance(
    orig: ModelHandle,
    fold: ModelHandle,
    fold_outputs: Sequence[FoldRef] | None,
    runs: Sequence[RunComparison],
    feeds_cache: Mapping[int | None, dict[str, np.ndarray]],
    folded_values: Mapping[tuple[str, int | None], dict[str, object]],
    tolerances: Tolerances,
    threads: int | None,
) -> tuple[PerFoldResult, tuple[OutputSensitivity, ...], list[str]]:
    """Each fold alone, and the model's rounding spread on every failing run (see
    :mod:`bnfold.check.sensitivity`)."""
    refs: list[FoldRef] = list(fold_outputs) if fold_outputs is not None else list(
        fold_candidates(orig.proto, fold.proto))
    first_feeds = next(iter(feeds_cache.values()), {})
    per_fold = check_folds(orig, fold, refs, tolerances=tolerances, threads=threads,
                           input_shapes={k: tuple(np.shape(v)) for k, v in first_feeds.items()})
    names = [r if isinstance(r, str) else r.output for r in refs]
    figures: list[OutputSensitivity] = []
    notes: list[str] = []
    for run in runs:
        if run.passed:
            continue
        spread = measure_spread(fold, names, feeds_cache[run.seed], run.provider, threads,
                                folded_values[(run.provider, run.seed)])
        if isinstance(spread, str):
            notes.append(f"the model's rounding spread was not measured: {spread}")
            return per_fold, (), notes
        for out in run.outputs:
            if out.passed:
                continue
            if out.max_abs is None or out.nonfinite_mismatched:  # shape, dtype or NaN: no spread excuses it
                return per_fold, (), notes
            allowance = out.atol + out.rtol * (out.ref_max_abs or 0.0)
            figures.append(OutputSensitivity(out.name, run.provider, run.seed, out.max_abs, allowance,
                                             spread.get(out.name, 0.0)))
    return per_fold, tuple(figures), notes
