"""Large models: memory stays bounded by the largest tensor, not the model.

Models are generated tensor by tensor straight into their external data files (never whole in memory):
a chain of ``Conv -> BatchNormalization -> Relu`` blocks plus a last Conv without BN (weights the fold
must copy untouched), weights spread over several data files. The >2 GB case is opt-in
(``pytest -m slow tests/test_large.py``); it prints its figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from large_models import (
    BNFOLD,
    IMPORTS_ONLY,
    IR_VERSION,
    Generated,
    assert_same,
    bn_count,
    data_file_names,
    files_digest,
    peak_rss,
    write_conv_bn_chain,
)
from onnx import TensorProto, helper, numpy_helper

import bnfold


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
