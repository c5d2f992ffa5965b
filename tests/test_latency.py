"""Functional tests of bnfold.timing: structure, schedule, gate, bootstrap, command line. No timing asserts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from latency_models import CPU, CUDA, FAST, conv_model
from onnx import TensorProto
from rich.console import Console

from bnfold.check import runtime
from bnfold.errors import BadInputError, ExitCode, GateFailedError
from bnfold.timing import (
    CUDA_UNAVAILABLE_NOTE,
    ConfigResult,
    LatencyReport,
    LatencySettings,
    LatencyStats,
    MeasureConfig,
    ModelMeasurement,
    latency,
    render_latency,
)
from bnfold.timing import measure as measure_mod
from bnfold.timing.inputs import InputSpec, plan_inputs
from bnfold.timing.stats import bootstrap_ratio_ci, interleaved_schedule, split_runs, summarize


@pytest.fixture(scope="module")
def pair() -> dict[str, onnx.ModelProto]:
    return {"original": conv_model(True), "folded": conv_model(False)}


@pytest.fixture(scope="module")
def report(pair: dict[str, onnx.ModelProto]) -> LatencyReport:
    return latency(pair, batch=2, **FAST)


def test_report_structure(report: LatencyReport) -> None:
    assert [c.config.label for c in report.configs] == ["CPU / disable_all", "CPU / enable_all"]
    for cfg in report.configs:
        assert list(cfg.models) == ["original", "folded"]
        for meas in cfg.models.values():
            run = meas.run
            assert run.n == 6 and len(run.samples_ms) == 6
            assert 0 < run.min_ms <= run.median_ms <= run.p90_ms <= run.p99_ms <= run.max_ms
            assert run.iqr_ms >= 0 and run.mean_ms > 0
            assert meas.creation.n == 1 and meas.creation.median_ms > 0
            assert meas.session_providers[0] == CPU
        (speed,) = cfg.speedups
        assert (speed.baseline, speed.candidate) == ("original", "folded")
        assert speed.ratio == pytest.approx(cfg.models["original"].run.median_ms / cfg.models["folded"].run.median_ms)
        assert speed.ci_low <= speed.ci_high and speed.confidence == 0.95
    s = report.settings
    assert (s.threads, s.batch, dict(s.shapes), s.runs, s.rounds, s.spread) == (
        1,
        2,
        {"x": (2, 3, 8, 8)},
        6,
        3,
        "iqr",
    )
    assert s.levels == ("disable_all", "enable_all") and s.baseline == "original"
    for key in ("cpu_model", "cpu_count", "platform", "onnxruntime", "available_providers"):
        assert key in report.environment


def test_to_dict_is_json_and_render(report: LatencyReport) -> None:
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == "bnfold.latency/1"
    assert data["settings"]["shapes"] == {"x": [2, 3, 8, 8]}
    cfg = data["configs"][0]
    assert set(cfg["models"]["folded"]["run"]) >= {"median_ms", "p90_ms", "p99_ms", "min_ms", "iqr_ms", "n"}
    assert "samples_ms" not in cfg["models"]["folded"]["run"]
    assert len(report.to_dict(samples=True)["configs"][0]["models"]["folded"]["run"]["samples_ms"]) == 6
    console = Console(record=True, width=200)
    console.print(render_latency(report))
    text = console.export_text()
    assert "disable_all" in text and "folded" in text and "baseline" in text


def test_cuda_note_when_unavailable(monkeypatch: pytest.MonkeyPatch, pair: dict[str, onnx.ModelProto]) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    rep = latency(pair, levels=["disable_all"], **FAST)
    assert rep.notes == (CUDA_UNAVAILABLE_NOTE,)
    assert rep.settings.providers == (CPU,)


def test_progress_reaches_total(pair: dict[str, onnx.ModelProto]) -> None:
    calls: list[tuple[str, int, int]] = []
    latency(pair, levels=["disable_all"], progress=lambda *a: calls.append(a), **FAST)
    dones = [d for _, d, _ in calls]
    assert dones == sorted(dones) and dones[-1] == calls[-1][2]
    assert all(label.startswith("CPU / disable_all") for label, _, _ in calls)


def test_single_model_and_baseline_choice(pair: dict[str, onnx.ModelProto]) -> None:
    rep = latency(pair["folded"], levels=["enable_all"], **FAST)
    assert list(rep.configs[0].models) == ["model"] and rep.configs[0].speedups == ()
    rep = latency({"a": pair["original"], "b": pair["folded"]}, levels=["basic"], baseline="b", **FAST)
    assert rep.configs[0].speedups[0].candidate == "a"
    with pytest.raises(ValueError, match="baseline"):
        latency(pair, baseline="nope", **FAST)


def test_model_sources_paths_and_bytes(tmp_path: Any, pair: dict[str, onnx.ModelProto]) -> None:
    path = tmp_path / "orig.onnx"
    onnx.save(pair["original"], path)
    rep = latency({"original": path, "folded": pair["folded"].SerializeToString()}, levels=["disable_all"], **FAST)
    assert rep.configs[0].models["folded"].run.n == 6
    with pytest.raises(BadInputError, match="no such file"):
        latency({"original": tmp_path / "missing.onnx"}, **FAST)


def test_protos_over_the_limit_are_spilled(monkeypatch: pytest.MonkeyPatch, pair: dict[str, onnx.ModelProto]) -> None:
    monkeypatch.setattr(runtime, "_PROTO_LIMIT", 100)  # pretend these models are over 2 GB
    monkeypatch.setattr(runtime, "_SPILL_THRESHOLD", 16)
    before = pair["original"].SerializeToString()
    rep = latency(pair, levels=["disable_all"], **FAST)
    assert rep.configs[0].models["folded"].run.n == 6 and pair["original"].SerializeToString() == before


def test_different_inputs_refused() -> None:
    with pytest.raises(BadInputError, match="different inputs"):
        latency({"original": conv_model(True), "folded": conv_model(False, input_name="z")}, **FAST)


def test_unloadable_model_is_bad_input() -> None:
    with pytest.raises(BadInputError, match=r"not an ONNX model.*\(model 'original'\)"):
        latency({"original": b"not a model"}, **FAST)
    broken = conv_model(False)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BadInputError, match="cannot create a session for model 'folded'"):
        latency({"original": conv_model(True), "folded": broken}, **FAST)


def test_schedule_alternates() -> None:
    assert interleaved_schedule(["a", "b"], 4) == (("a", "b"), ("b", "a"), ("a", "b"), ("b", "a"))
    assert interleaved_schedule(["a", "b", "c"], 2) == (("a", "b", "c"), ("c", "b", "a"))
    assert split_runs(10, 3) == (4, 3, 3)
    assert split_runs(2, 5) == (1, 1)
    with pytest.raises(ValueError):
        split_runs(0, 1)


def test_runs_are_interleaved_in_rounds(monkeypatch: pytest.MonkeyPatch, pair: dict[str, onnx.ModelProto]) -> None:
    log: list[str] = []
    labels: dict[int, str] = {}
    real_session, real_runner = measure_mod.checked_session, measure_mod.make_runner

    def session(model: Any, config: MeasureConfig, threads: int | None) -> Any:
        sess = real_session(model, config, threads)
        labels[id(sess)] = model.label
        return sess

    def runner(sess: Any, feeds: Any, config: MeasureConfig) -> Any:
        label, run = labels[id(sess)], real_runner(sess, feeds, config)
        return lambda: (log.append(label), run())

    monkeypatch.setattr(measure_mod, "checked_session", session)
    monkeypatch.setattr(measure_mod, "make_runner", runner)
    rep = latency(pair, levels=["disable_all"], **{**FAST, "runs": 7, "warmup": 2})
    cfg = rep.configs[0]
    assert cfg.block_sizes == (3, 2, 2)
    assert cfg.block_order == (("original", "folded"), ("folded", "original"), ("original", "folded"))
    warm = ["original"] * 2 + ["folded"] * 2  # first run + warm-up, per model, before timing
    timed = [
        label
        for size, order in zip(cfg.block_sizes, cfg.block_order, strict=True)
        for label in order
        for _ in range(size + 1)
    ]  # +1: untimed first run of each block
    assert log == warm + timed


def test_cuda_listed_but_not_working_falls_back(
    monkeypatch: pytest.MonkeyPatch, pair: dict[str, onnx.ModelProto]
) -> None:
    # onnxruntime here has no CUDA: a session asked for it silently runs on CPU; the real probe sees that.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    rep = latency(pair, levels=["disable_all"], **FAST)
    assert rep.settings.providers == (CPU,)
    assert "could not run on it" in rep.notes[0] and "ran on CPU only" in rep.notes[0]


def _synthetic(medians: dict[str, tuple[float, float]]) -> LatencyReport:
    """config level -> (original median, folded median), 5 samples each around the median."""
    configs = []
    for level, (orig, fold) in medians.items():
        models = {
            label: ModelMeasurement(
                label,
                LatencyStats.from_samples([10.0]),
                LatencyStats.from_samples([m * f for f in (0.9, 0.95, 1.0, 1.05, 1.1)]),
            )
            for label, m in (("original", orig), ("folded", fold))
        }
        configs.append(ConfigResult(MeasureConfig(CPU, level, "bound", "cpu"), models))
    settings = LatencySettings(
        providers=(CPU,),
        levels=tuple(medians),
        runs=5,
        warmup=0,
        rounds=1,
        creations=1,
        threads=None,
        batch=None,
        shapes={},
        io_binding=True,
        include_copies=False,
        seed=0,
        confidence=0.95,
        resamples=10,
        baseline="original",
    )
    return LatencyReport(tuple(configs), settings)


def test_gate_semantics() -> None:
    rep = _synthetic({"disable_all": (10.0, 9.0), "enable_all": (10.0, 10.5)})
    failed = rep.gate(1.02)
    assert not failed.passed and failed.exit_code == ExitCode.GATE_FAILED
    (bad,) = failed.offending
    assert (bad.config, bad.candidate, bad.slowdown) == ("CPU / enable_all", "folded", pytest.approx(1.05))
    assert [c.passed for c in failed.checks] == [True, False]
    assert "CPU / enable_all" in failed.message
    with pytest.raises(GateFailedError) as info:
        failed.raise_if_failed()
    assert info.value.exit_code == ExitCode.GATE_FAILED
    assert json.loads(json.dumps(failed.to_dict()))["offending"] == ["CPU / enable_all"]

    passed = rep.gate(1.05)  # equal to the limit passes
    assert passed.passed and passed.exit_code == ExitCode.OK and passed.offending == ()
    passed.raise_if_failed()
    assert rep.gate(1.10).passed
    with pytest.raises(ValueError):
        rep.gate(0)


def test_gate_needs_two_models() -> None:
    rep = _synthetic({"disable_all": (10.0, 9.0)})
    only_base = LatencyReport(
        tuple(ConfigResult(c.config, {"original": c.models["original"]}) for c in rep.configs), rep.settings
    )
    with pytest.raises(ValueError, match="baseline"):
        only_base.gate(1.02)


def test_summarize() -> None:
    s = summarize(np.arange(1, 101, dtype=float))
    assert (s.n, s.median_ms, s.min_ms, s.max_ms, s.mean_ms) == (100, 50.5, 1.0, 100.0, 50.5)
    assert s.iqr_ms == pytest.approx(49.5) and s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    with pytest.raises(ValueError):
        summarize([])


def test_bootstrap_ci_is_sane_and_seeded() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(10.0, 0.5, 200)
    cand = rng.normal(8.0, 0.4, 200)
    ratio = np.median(base) / np.median(cand)
    low, high = bootstrap_ratio_ci(base, cand, block_sizes=[50] * 4, resamples=500, seed=3)
    assert low < ratio < high and high - low < 0.1 and low > 1.15
    assert bootstrap_ratio_ci(base, cand, block_sizes=[50] * 4, resamples=500, seed=3) == (low, high)
    same_low, same_high = bootstrap_ratio_ci(base, rng.normal(10.0, 0.5, 200), resamples=500)
    assert same_low < 1.0 < same_high
    wide = bootstrap_ratio_ci(base, cand, confidence=0.99, resamples=500, seed=3)
    narrow = bootstrap_ratio_ci(base, cand, confidence=0.5, resamples=500, seed=3)
    assert wide[0] < narrow[0] <= narrow[1] < wide[1]
    with pytest.raises(ValueError, match="block sizes"):
        bootstrap_ratio_ci(base, cand, block_sizes=[10])


def test_plan_inputs_shapes_and_batch() -> None:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    specs = [InputSpec("x", f32, ("N", 3, "H", "W")), InputSpec("k", i64, (4,))]
    with pytest.raises(BadInputError, match=r"dynamic dimension.*axis 2, 3"):
        plan_inputs(specs)
    plan, notes = plan_inputs(specs, shapes={"x": [2, 3, 16, 16]}, batch=8)
    assert plan.shapes == {"x": (2, 3, 16, 16), "k": (4,)} and "batch 8 ignored for input 'k'" in notes[0]
    plan, _ = plan_inputs(specs, shapes={"H": 5, "W": 7}, batch=4)
    assert plan.shapes["x"] == (4, 3, 5, 7)
    plan, _ = plan_inputs([InputSpec("x", f32, (None, 3))], batch=4)
    assert plan.shapes == {"x": (4, 3)}
    plan, _ = plan_inputs([InputSpec("x", f32, ("N", 3))])
    assert plan.shapes == {"x": (1, 3)}
    feeds = plan.feeds(0)
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (1, 3)
    with pytest.raises(BadInputError, match="not an input"):
        plan_inputs(specs, shapes={"nope": [1]})


def test_external_data_path(tmp_path: Any) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(True), path, save_as_external_data=True, location="m.data", size_threshold=0)
    rep = latency({"original": path, "folded": conv_model(False)}, levels=["disable_all"], **FAST)
    assert rep.configs[0].models["original"].run.n == 6


def _cli(args: list[str]) -> int:
    from bnfold.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def test_cli_latency_verb_gate_exit_codes(tmp_path: Any, pair: dict[str, onnx.ModelProto]) -> None:
    a, b, out = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "r.json"
    onnx.save(pair["original"], a)
    onnx.save(pair["folded"], b)
    common = [str(a), str(b), "--runs", "4", "--rounds", "2", "--warmup", "0", "--threads", "1", "-q"]
    common += ["--level", "disable_all", "--batch", "2", "--report", str(out)]
    assert _cli(["latency", *common, "--max-slowdown", "1e-6"]) == ExitCode.GATE_FAILED
    data = json.loads(out.read_text())
    assert data["exit_code"] == 5 and data["latency"]["gate"]["offending"] == ["CPU / disable_all"]
    assert data["latency"]["settings"]["shapes"] == {"x": [2, 3, 8, 8]}
    assert _cli(["latency", *common, "--max-slowdown", "1e6"]) == ExitCode.OK
    assert json.loads(out.read_text())["latency"]["gate"]["passed"] is True
    assert _cli(["latency", *common, "--provider", "no-such"]) == ExitCode.USAGE
    assert _cli(["latency", *common, "--shape", "x=1,3"]) == ExitCode.BAD_INPUT


def test_cli_fold_with_latency(tmp_path: Any) -> None:
    src, dst, out = tmp_path / "m.onnx", tmp_path / "m.folded.onnx", tmp_path / "r.json"
    onnx.save(conv_model(True, batch=1), src)
    args = [str(src), "-o", str(dst), "--runs", "4", "--rounds", "2", "--warmup", "0", "--threads", "1", "-q"]
    assert _cli([*args, "--latency", "--level", "enable_all", "--report", str(out)]) == ExitCode.OK
    latency_json = json.loads(out.read_text())["latency"]
    assert latency_json["schema"] == "bnfold.latency/1" and latency_json["gate"] is None
    assert _cli([*args, "--max-slowdown", "1e-6", "--report", str(out)]) == ExitCode.GATE_FAILED
    assert len(json.loads(out.read_text())["latency"]["configs"]) == 2
