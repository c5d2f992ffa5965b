"""External data in and out: outputs match and inputs stay untouched, same-folder and in-place folds never
read what they overwrite, inline models stream byte-identical, staged outputs commit or discard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from large_models import (
    IR_VERSION,
    assert_same,
    bn_count,
    data_file_names,
    files_digest,
    write_conv_bn_chain,
)
from onnx import TensorProto, helper

import bnfold
from bnfold.io.load import load_lazily
from bnfold.io.save import save_model
from bnfold.io.staging import stage_model


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
