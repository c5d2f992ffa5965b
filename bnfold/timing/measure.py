"""Measure models on onnxruntime: provider x model x optimization level, runs interleaved in rounds.

For each configuration (see :func:`bnfold.timing.providers.plan_configs`):

1. one session per model is created (untimed; it pays one-time costs such as CUDA context set-up);
2. session creation is timed ``creations`` times per model, models alternating;
3. every model gets ``warmup`` untimed runs;
4. ``runs`` timed runs per model are split into ``rounds`` blocks; in round r the models run one block
   each, in the given order when r is even and reversed when odd (A B | B A | A B ...). The first run of
   each block is untimed (``block_warmup``) so that the switch from another session is not charged to
   the block. The garbage collector is paused while timing.

Timings are wall-clock (``time.perf_counter_ns``) around one ``run``/``run_with_iobinding`` call; on a
GPU provider with I/O binding the call returns after the device work has finished (onnxruntime
synchronizes the provider at the end of a run, and the outputs are synchronized too).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import onnxruntime as ort

from bnfold.check.feeds import model_inputs
from bnfold.check.runtime import ModelHandle, ModelSource, normalize_level, open_model, resolve_providers
from bnfold.environment import Environment
from bnfold.errors import BadInputError, first_line
from bnfold.overrides import with_overrides
from bnfold.timing.inputs import InputSpec, make_feeds, plan_inputs, same_signature
from bnfold.timing.options import LatencyOptions
from bnfold.timing.providers import MeasureConfig, plan_configs
from bnfold.timing.result import ConfigResult, LatencyReport, LatencySettings, ModelMeasurement
from bnfold.timing.session import checked_session, config_session, make_runner, probe_factory
from bnfold.timing.stats import Speedup, bootstrap_ratio_ci, interleaved_schedule, split_runs, summarize

__all__ = ["ModelSource", "ProgressCallback", "latency"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""``progress(label, done, total)``: called after each creation and each block of runs."""

_BLOCK_WARMUP = 1


def _time_calls(fn: Callable[[], object], n: int) -> list[float]:
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        start = clock()
        fn()
        out.append((clock() - start) / 1e6)
    return out


def _check_signatures(loaded: Sequence[ModelHandle]) -> tuple[InputSpec, ...]:
    """All models have the same inputs (names and element types); returns the first model's."""
    first, first_specs = loaded[0], model_inputs(loaded[0].proto)
    for model in loaded[1:]:
        specs = model_inputs(model.proto)
        if not same_signature(first_specs, specs):
            want = {s.name: s.dtype_name for s in first_specs}
            got = {s.name: s.dtype_name for s in specs}
            raise BadInputError(f"models '{first.label}' and '{model.label}' have different inputs ({want} vs {got})")
    return first_specs


class _Timer:
    """Measures every model under one configuration; holds nothing between configurations."""

    def __init__(
        self,
        loaded: Sequence[ModelHandle],
        feeds: Mapping[str, np.ndarray],
        threads: int | None,
        warmup: int,
        creations: int,
        blocks: tuple[int, ...],
        schedule: tuple[tuple[str, ...], ...],
        tick: Callable[[str, int], None],
    ) -> None:
        self.loaded = {m.label: m for m in loaded}
        self.feeds = feeds
        self.threads = threads
        self.warmup = warmup
        self.creations = creations
        self.blocks = blocks
        self.schedule = schedule
        self.tick = tick

    def measure(self, config: MeasureConfig) -> dict[str, ModelMeasurement]:
        logger.debug("measuring %s", config.label)
        labels = list(self.loaded)
        sessions = {}
        for label, model in self.loaded.items():
            sessions[label] = checked_session(model, config, self.threads)
            self.tick(f"{config.label}: {label}", 1)
        used = {label: tuple(s.get_providers()) for label, s in sessions.items()}
        creation = self._creations(config, labels)
        runners = {label: self._runner(label, s, config) for label, s in sessions.items()}
        samples = self._rounds(config, runners)
        return {
            label: ModelMeasurement(label, summarize(creation[label]), summarize(samples[label]), used[label])
            for label in labels
        }

    def _creations(self, config: MeasureConfig, labels: list[str]) -> dict[str, list[float]]:
        creation: dict[str, list[float]] = {label: [] for label in labels}
        for order in interleaved_schedule(labels, self.creations):
            for label in order:
                start = time.perf_counter_ns()
                session = config_session(self.loaded[label], config, self.threads)
                creation[label].append((time.perf_counter_ns() - start) / 1e6)
                del session
                self.tick(f"{config.label}: {label} (session creation)", 1)
        return creation

    def _runner(self, label: str, session: ort.InferenceSession, config: MeasureConfig) -> Callable[[], None]:
        try:
            runner = make_runner(session, self.feeds, config)
            runner()  # first run: surfaces shape/type errors before any timing
        except Exception as err:
            shapes = {k: list(v.shape) for k, v in self.feeds.items()}
            raise BadInputError(
                f"model '{label}' failed to run ({config.label}, inputs {shapes}): {first_line(err)}"
            ) from err
        _time_calls(runner, max(0, self.warmup - 1))
        self.tick(f"{config.label}: {label} (warm-up)", self.warmup)
        return runner

    def _rounds(self, config: MeasureConfig, runners: Mapping[str, Callable[[], None]]) -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {label: [] for label in runners}
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for size, order in zip(self.blocks, self.schedule, strict=True):
                for label in order:
                    _time_calls(runners[label], _BLOCK_WARMUP)
                    samples[label].extend(_time_calls(runners[label], size))
                    self.tick(f"{config.label}: {label}", size + _BLOCK_WARMUP)
        finally:
            if gc_was_enabled:
                gc.enable()
        return samples


def _config_result(
    config: MeasureConfig,
    measured: dict[str, ModelMeasurement],
    baseline: str,
    blocks: tuple[int, ...],
    schedule: tuple[tuple[str, ...], ...],
    confidence: float,
    resamples: int,
    seed: list[int],
) -> ConfigResult:
    base = measured[baseline]
    speedups = []
    for k, label in enumerate(x for x in measured if x != baseline):
        cand = measured[label]
        low, high = bootstrap_ratio_ci(
            base.run.samples_ms,
            cand.run.samples_ms,
            block_sizes=blocks,
            confidence=confidence,
            resamples=resamples,
            seed=[*seed, k],
        )
        speedups.append(
            Speedup(
                baseline=baseline,
                candidate=label,
                ratio=base.run.median_ms / cand.run.median_ms,
                ci_low=low,
                ci_high=high,
                confidence=confidence,
                creation_ratio=base.creation.median_ms / cand.creation.median_ms,
            )
        )
    return ConfigResult(config, measured, tuple(speedups), blocks, schedule)


def latency(
    models: Mapping[str, ModelSource] | ModelSource,
    options: LatencyOptions | None = None,
    /,
    *,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> LatencyReport:
    """Time ``models`` (label -> path, bytes or ModelProto) on every provider x optimization level.

    ``options`` (:class:`~bnfold.timing.options.LatencyOptions`, or its fields as keywords):
    ``providers`` None/"auto" = CPU, plus CUDA when it really works (else a note says so), or names
    ("cpu", "cuda", full onnxruntime names), where one this machine cannot run raises
    MissingDependencyError (see :func:`bnfold.check.runtime.resolve_providers`). ``runs`` timed runs per
    model and configuration, split into ``rounds`` interleaved rounds, after ``warmup`` untimed runs.
    ``threads`` sets intra_op_num_threads. ``shapes`` (input name -> shape, or symbolic dim -> value) and
    ``batch`` (replaces a dynamic first dimension) fix the inputs; other dynamic dimensions must be given.
    ``baseline``: the label speed-ups are relative to ("original" if present, else the first). Speed-up
    = baseline median / model median, with a seeded bootstrap CI at ``confidence``. ``max_slowdown`` is
    not applied here: :meth:`LatencyReport.gate` applies it.
    """
    o = with_overrides(LatencyOptions, options, overrides)
    runs, warmup, rounds, creations, threads = o.runs, o.warmup, o.rounds, o.creations, o.threads
    levels, providers, shapes, batch, seed = o.levels, o.providers, o.shapes, o.batch, o.seed
    io_binding, include_copies, baseline, device_id = o.io_binding, o.include_copies, o.baseline, o.device_id
    confidence, resamples = o.confidence, o.resamples
    items = list(models.items()) if isinstance(models, Mapping) else [("model", models)]
    if not items:
        raise ValueError("latency needs at least one model")
    for name, value in {"runs": runs, "rounds": rounds, "creations": creations}.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for onnxruntime's default), got {threads}")
    level_names = tuple(dict.fromkeys(normalize_level(lv) for lv in levels))
    if not level_names:
        raise ValueError("latency needs at least one optimization level")
    labels = [str(k) for k, _ in items]
    if baseline is None:
        baseline = "original" if "original" in labels else labels[0]
    elif baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not one of the models {labels}")

    with ExitStack() as opened:
        loaded = []
        for label, (_, source) in zip(labels, items, strict=True):
            handle = open_model(source, label, in_memory=True)
            if handle is not source:
                opened.callback(handle.close)  # removes a spilled (over 2 GB) model's temporary folder
            loaded.append(handle)
        plan, notes = plan_inputs(_check_signatures(loaded), shapes=shapes, batch=batch)
        feeds = make_feeds(plan, seed)
        resolved_shapes = dict(plan.shapes)
        chosen, provider_notes = resolve_providers(providers, probe_factory(loaded[0], threads, device_id))
        notes = provider_notes + notes
        configs = plan_configs(
            chosen, level_names, io_binding=io_binding, include_copies=include_copies, device_id=device_id
        )
        blocks = split_runs(runs, rounds)
        schedule = interleaved_schedule(labels, len(blocks))
        per_model = 1 + creations + warmup + sum(blocks) + _BLOCK_WARMUP * len(blocks)
        total = per_model * len(labels) * len(configs)
        done = 0

        def tick(label: str, n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(label, done, total)

        timer = _Timer(loaded, feeds, threads, warmup, creations, blocks, schedule, tick)
        results = [
            _config_result(config, timer.measure(config), baseline, blocks, schedule, confidence, resamples, [seed, i])
            for i, config in enumerate(configs)
        ]

    settings = LatencySettings(
        providers=tuple(chosen),
        levels=level_names,
        runs=sum(blocks),
        warmup=warmup,
        rounds=len(blocks),
        creations=creations,
        threads=threads,
        batch=batch,
        shapes=resolved_shapes,
        io_binding=io_binding,
        include_copies=include_copies,
        seed=seed,
        confidence=confidence,
        resamples=resamples,
        baseline=baseline,
        block_warmup=_BLOCK_WARMUP,
    )
    return LatencyReport(tuple(results), settings, Environment.capture(measured_providers=chosen), tuple(notes))
