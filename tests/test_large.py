"""Large models: memory stays bounded by the largest tensor, not the model; external data in and out.

Models are generated tensor by tensor straight into their external data files (never whole in memory):
a chain of ``Conv -> BatchNormalization -> Relu`` blocks plus a last Conv without BN (weights the fold
must copy untouched), weights spread over several data files. The >2 GB case is opt-in
(``pytest -m slow tests/test_large.py``); it prints its figures.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.io.load import load_lazily
from bnfold.io.save import save_model
from bnfold.io.staging import stage_model

IR_VERSION = 8


def data_file_names(folder: Path, model_name: str) -> list[str]:
    """The data files bnfold wrote for ``model_name`` in ``folder``: ``<model_name>.<8 hex digits>.data``."""
    pattern = re.compile(re.escape(model_name) + r"\.[0-9a-f]{8}\.data")
    return sorted(p.name for p in folder.iterdir() if pattern.fullmatch(p.name))


@dataclass(frozen=True)
class Generated:
    path: Path
    nbytes: int
    """Model file plus data files."""
    input_shape: tuple[int, ...]
    convs: int
    bns: int


def write_conv_bn_chain(
    path: Path,
    *,
    layers: int,
    channels: int,
    kernel: int = 3,
    files: int = 1,
    spatial: int = 4,
    seed: int = 0,
) -> Generated:
    """A ``layers``-deep Conv+BN+Relu chain with external data in ``files`` data files, written one tensor
    at a time (memory: one weight). Every tensor of 1 KiB or more is external."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{path.stem}.weights{i}.bin" for i in range(files)]
    handles = [open(path.parent / n, "wb") for n in names]  # noqa: SIM115 -- closed below
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def add(name: str, array: np.ndarray, file: int) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            inits.append(onnx.numpy_helper.from_array(array, name))
            return
        f = handles[file]
        offset = f.tell()
        f.write(memoryview(array.reshape(-1)).cast("B"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", names[file]), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)

    x = "input"
    std = np.float32(np.sqrt(2.0 / (channels * kernel * kernel)))
    for i in range(layers + 1):
        file = i * files // (layers + 1)
        w = rng.standard_normal((channels, channels, kernel, kernel), dtype=np.float32) * std
        add(f"conv{i}.weight", w, file)
        add(f"conv{i}.bias", rng.normal(0, 0.1, channels).astype(np.float32), file)
        del w
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                      pads=[kernel // 2] * 4, name=f"conv{i}"))
        x = f"conv{i}"
        if i == layers:  # the last Conv has no BN: its weights are copied as they are
            break
        stats = {
            "gamma": rng.uniform(0.5, 1.0, channels), "beta": rng.normal(0, 0.1, channels),
            "mean": rng.normal(0, 0.1, channels), "var": rng.uniform(0.5, 2.0, channels),
        }
        for key, value in stats.items():
            add(f"bn{i}.{key}", value.astype(np.float32), file)
        nodes.append(helper.make_node("BatchNormalization", [x, *(f"bn{i}.{k}" for k in stats)], [f"bn{i}"],
                                      name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    for f in handles:
        f.close()
    shape = (1, channels, spatial, spatial)
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    path.write_bytes(model.SerializeToString())
    total = path.stat().st_size + sum((path.parent / n).stat().st_size for n in names)
    return Generated(path, total, shape, layers + 1, layers)


def files_digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def run_by_path(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_same(original: Path, folded: Path, shape: tuple[int, ...]) -> float:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = run_by_path(original, x).astype(np.float64)
    got = run_by_path(folded, x).astype(np.float64)
    err = float(np.max(np.abs(ref - got)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(ref)))), err
    return err


def bn_count(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


_LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n"
)
"""Spawns the measured process from a tiny interpreter: Linux counts the memory a process had before
``exec`` (here: a copy of pytest's) in its peak, so spawning straight from pytest would inflate it."""


def peak_rss(args: list[str], tmp: Path) -> tuple[int, float]:
    """Peak resident memory (bytes) and wall time of a subprocess, from its own rusage (``wait4``)."""
    result = tmp / "rusage.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *args], capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    code, maxrss = json.loads(result.read_text())
    assert code == 0 and proc.returncode == 0, proc.stderr.decode(errors="replace")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return maxrss * scale, elapsed


BNFOLD = [sys.executable, "-m", "bnfold"]
IMPORTS_ONLY = [sys.executable, "-c", "import onnx, onnxruntime, numpy, rich, bnfold.pipeline, bnfold.folding.passes"]
"""The interpreter with what a fold imports: the baseline memory figures are measured above."""


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    """About 300 MB in two data files, tensors of ~9 MB: memory must follow the tensor, not the model."""
    folder = tmp_path_factory.mktemp("medium")
    return write_conv_bn_chain(folder / "medium.onnx", layers=31, channels=512, files=2)


def test_fold_memory_is_bounded_by_tensors_not_model(medium: Generated, tmp_path: Path) -> None:
    before = files_digest(medium.path.parent)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    baseline, _ = peak_rss(IMPORTS_ONLY, tmp_path)
    peak, _ = peak_rss([*BNFOLD, str(medium.path), "-o", str(out), "--no-verify", "-q"], tmp_path)
    assert peak - baseline < 0.5 * medium.nbytes, (peak, baseline, medium.nbytes)  # measured: ~0.1x
    assert files_digest(medium.path.parent) == before
    assert bn_count(out) == 0
    data = data_file_names(out.parent, "folded.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", *data] and len(data) == 1
    assert_same(medium.path, out, medium.input_shape)


def test_external_data_output_matches_and_input_untouched(tmp_path: Path) -> None:
    src = write_conv_bn_chain(tmp_path / "in" / "m.onnx", layers=3, channels=64, files=3)
    before = files_digest(src.path.parent)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    run = bnfold.fold_file(src.path, out, verify=False)
    assert files_digest(src.path.parent) == before
    assert run.written
    data = data_file_names(out.parent, "f.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.onnx", *data] and len(data) == 1
    assert len(run.fold.folded) == 3 and bn_count(out) == 0
    assert_same(src.path, out, src.input_shape)
    # the written model's references resolve against the output's folder
    for t in onnx.load(str(out), load_external_data=False).graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            assert dict((e.key, e.value) for e in t.external_data)["location"] == data[0]


def test_same_folder_and_in_place_never_read_what_they_overwrite(tmp_path: Path) -> None:
    src = write_conv_bn_chain(tmp_path / "m.onnx", layers=2, channels=64, files=1)
    ref_model = write_conv_bn_chain(tmp_path / "ref" / "m.onnx", layers=2, channels=64, files=1)
    bnfold.fold_file(src.path, tmp_path / "o.onnx", verify=False)
    assert_same(ref_model.path, tmp_path / "o.onnx", src.input_shape)
    assert_same(ref_model.path, src.path, src.input_shape)  # the input still loads and computes the same
    # in place: the input is replaced by its fold
    bnfold.fold_file(src.path, src.path, verify=False)
    assert bn_count(src.path) == 0
    assert_same(ref_model.path, src.path, src.input_shape)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_data_file_named_like_output_data_is_not_overwritten(tmp_path: Path) -> None:
    src = write_conv_bn_chain(tmp_path / "m.onnx", layers=2, channels=64, files=1)
    data = tmp_path / "m.weights0.bin"
    renamed = tmp_path / "o.onnx.data"  # the input's data has the name bnfold once gave the output's
    model = onnx.load(str(src.path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = renamed.name
    data.rename(renamed)
    src.path.write_bytes(model.SerializeToString())
    before = files_digest(tmp_path)
    run = bnfold.fold_file(src.path, tmp_path / "o.onnx", verify=False)
    assert run.written and len(data_file_names(tmp_path, "o.onnx")) == 1
    after = files_digest(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert_same(src.path, tmp_path / "o.onnx", src.input_shape)


def test_inline_model_streams_byte_identical_to_onnx(tmp_path: Path) -> None:
    """Lazy load + streamed save of an ordinary single-file model gives exactly onnx's bytes."""
    src = write_conv_bn_chain(tmp_path / "m.onnx", layers=2, channels=32, files=1)
    model = onnx.load(str(src.path))
    for t in model.graph.initializer:
        t.ClearField("data_location")  # onnx.load sets DEFAULT explicitly; an ordinary file has no such field
    inline = tmp_path / "inline.onnx"
    inline.write_bytes(model.SerializeToString())
    lazy = load_lazily(inline)
    assert lazy.inline and lazy.proto.ByteSize() < 4096
    out = tmp_path / "resaved.onnx"
    save_model(lazy.proto, out, base_dir=lazy.store)
    assert out.read_bytes() == inline.read_bytes()
    assert bnfold.load(inline).SerializeToString() == inline.read_bytes()
    save_model(model, out)
    assert out.read_bytes() == inline.read_bytes()


def test_staged_output_loads_by_path_then_commits_or_discards(tmp_path: Path) -> None:
    src = write_conv_bn_chain(tmp_path / "m.onnx", layers=2, channels=64, files=1)
    out = tmp_path / "o.onnx"
    folded = bnfold.fold(src.path).model
    staged = stage_model(folded, out)
    assert not out.exists() and staged.path.exists()
    assert_same(src.path, staged.path, src.input_shape)  # onnxruntime loads the staged model by path
    staged.discard()
    assert not out.exists() and not staged.path.exists()
    staged = stage_model(folded, out)
    staged.commit()
    assert_same(src.path, out, src.input_shape)


def test_in_memory_result_from_a_path_is_complete(tmp_path: Path) -> None:
    src = write_conv_bn_chain(tmp_path / "m.onnx", layers=2, channels=64, files=2)
    result = bnfold.fold(src.path)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in result.model.graph.initializer)
    out = tmp_path / "mem.onnx"
    out.write_bytes(result.model.SerializeToString())
    assert_same(src.path, out, src.input_shape)


@pytest.mark.slow
def test_over_2gb_external_data_folds_in_bounded_memory(tmp_path: Path) -> None:
    """About 3 GB (20 Conv+BN of 151 MB, three data files). Prints the figures."""
    start = time.perf_counter()
    src = write_conv_bn_chain(tmp_path / "in" / "big.onnx", layers=19, channels=2048, files=3, spatial=2)
    assert src.nbytes > 2**31
    generated = time.perf_counter() - start
    before = files_digest(src.path.parent)
    out = tmp_path / "out" / "big.folded.onnx"
    out.parent.mkdir()
    baseline, _ = peak_rss(IMPORTS_ONLY, tmp_path)
    peak, wall = peak_rss([*BNFOLD, str(src.path), "-o", str(out), "--no-verify", "-q"], tmp_path)
    assert files_digest(src.path.parent) == before
    assert bn_count(out) == 0
    err = assert_same(src.path, out, src.input_shape)
    written = sum(p.stat().st_size for p in out.parent.iterdir())
    print(f"\n>2 GB: model {src.nbytes / 1e9:.2f} GB (generated in {generated:.1f} s), fold {wall:.1f} s, "
          f"peak RSS {peak / 1e6:.0f} MB (interpreter {baseline / 1e6:.0f} MB, "
          f"{(peak - baseline) / src.nbytes:.3f}x the model above it), output {written / 1e9:.2f} GB, "
          f"max abs error {err:.3g}")
    assert peak - baseline < 0.35 * src.nbytes


def test_inline_model_folded_in_place(tmp_path: Path) -> None:
    """A single-file model whose tensors are read lazily from the very file that the output replaces."""
    src = write_conv_bn_chain(tmp_path / "ext" / "m.onnx", layers=3, channels=64, files=1)
    inline = tmp_path / "m.onnx"
    inline.write_bytes(onnx.load(str(src.path)).SerializeToString())
    assert load_lazily(inline).inline
    result = bnfold.fold_file(inline, inline, verify=False)
    assert len(result.fold.folded) == 3 and bn_count(inline) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext", "m.onnx"]
    assert_same(src.path, inline, src.input_shape)


def test_external_tensors_outside_the_initializers(tmp_path: Path) -> None:
    """A weight given by a Constant node whose tensor is external data: read for the fold, and carried
    into both output layouts."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), "Wc")
    stats = [onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("g", rng.uniform(0.5, 1, 64)), ("b", rng.normal(0, 0.1, 64)), ("m", rng.normal(0, 0.1, 64)),
        ("v", rng.uniform(0.5, 2, 64)))]
    other = onnx.numpy_helper.from_array(rng.standard_normal((64, 64, 1, 1)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("Constant", [], ["W"], value=weight),
        helper.make_node("Constant", [], ["W2c"], value=other),
        helper.make_node("Conv", ["input", "W"], ["c"], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        helper.make_node("Conv", ["y", "W2c"], ["output"]),
    ]
    shape = (1, 64, 4, 4)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], stats)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    src = tmp_path / "in" / "c.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="c.bin", size_threshold=0,
              convert_attribute=True)
    for layout in ("external", "inline"):
        out = tmp_path / layout / "o.onnx"
        out.parent.mkdir()
        if layout == "inline":
            result = bnfold.fold(src)  # in memory: every tensor read back in
            save_model(result.model, out)
            folded = result.folded
            assert not data_file_names(out.parent, "o.onnx")
        else:
            folded = bnfold.fold_file(src, out, verify=False).fold.folded
            assert len(data_file_names(out.parent, "o.onnx")) == 1
        assert len(folded) == 1 and bn_count(out) == 0
        assert_same(src, out, shape)


def test_clone_size_limit_is_the_same_when_tensors_go_to_disk(tmp_path: Path) -> None:
    """New tensors written straight to disk still count their bytes against ``max_clone_bytes``."""
    rng = np.random.default_rng(0)
    c = 256  # a 2.4 MB weight: more than the default 1 MB a clone may add
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("W", rng.standard_normal((c, c, 3, 3))), ("g", rng.uniform(0.5, 1, c)), ("b", rng.normal(0, 0.1, c)),
        ("m", rng.normal(0, 0.1, c)), ("v", rng.uniform(0.5, 2, c)))]
    nodes = [
        helper.make_node("Conv", ["input", "W"], ["conv"], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["conv", "g", "b", "m", "v"], ["output"]),
        helper.make_node("Relu", ["conv"], ["side"]),
    ]
    shape = (1, c, 4, 4)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("output", "side")], inits)
    src = tmp_path / "shared.onnx"
    src.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=IR_VERSION).SerializeToString())
    in_memory = bnfold.fold(src)
    on_disk = bnfold.fold_file(src, tmp_path / "o.onnx", verify=False)
    assert not in_memory.folded and not on_disk.fold.folded
    assert [s.reason for s in on_disk.fold.skipped] == [s.reason for s in in_memory.skipped]
    assert "max_clone_bytes" in on_disk.fold.skipped[0].reason
    allowed = bnfold.fold_file(src, tmp_path / "o2.onnx", options=bnfold.FoldOptions(max_clone_bytes=1 << 23),
                               verify=False)
    assert len(allowed.fold.folded) == 1


def test_disk_full_while_spilling_folded_tensors_is_an_output_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failure while folded tensors go to the spill file is exit 6, not an internal error."""
    import bnfold.io.store as ts
    from bnfold.errors import OutputError

    src = tmp_path / "m.onnx"
    model = _cnn_for_spill_test()
    onnx.save(model, src)

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ts, "write_all", full)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    with pytest.raises(OutputError, match="No space left"):
        bnfold.fold_file(src, out, verify=False)
    assert list(out.parent.iterdir()) == []


def _cnn_for_spill_test() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 64
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "W")]
    for name in ("g", "b", "m"):
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), name))
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v"))
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["t", "g", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, c, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
