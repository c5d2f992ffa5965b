"""Bad input (exit 3, nothing written): one test per entry of the README's catalogue.

Every entry asserts the documented exit code, one clear line on stderr (``bnfold: error: ...``, never a
traceback), the input folder byte-for-byte unchanged and the output folder exactly as it was. The library
raises the same message as a typed exception and prints nothing.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from cli_faults import (
    NO_VERIFY,
    _external,
    assert_one_error_line,
    listing,
    run_cli,
    save,
    torch_or_skip,
)
from onnx import helper
from test_io_cli import conv_bn_model

import bnfold
from bnfold.errors import BadInputError, ExitCode


def _missing(d: Path) -> Path:
    return d / "nope.onnx"


def _directory(d: Path) -> Path:
    (d / "folder.onnx").mkdir(parents=True)
    return d / "folder.onnx"


def _bytes(content: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        (d / "m.onnx").write_bytes(content)
        return d / "m.onnx"

    return build


def _truncated(fraction: float) -> Callable[[Path], Path]:
    data = conv_bn_model()[0].SerializeToString()
    return _bytes(data[: int(len(data) * fraction)] if fraction < 1 else data[:-1])


def _zip_pickle() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # what torch.save() writes: archive/data.pkl, no code/
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _model(edit: Callable[[onnx.ModelProto], None]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        model, _ = conv_bn_model()
        edit(model)
        return save(model, d / "m.onnx")

    return build


def _undefined_input(m: onnx.ModelProto) -> None:
    m.graph.node[0].input[0] = "not_defined_anywhere"


def _ir_too_new(m: onnx.ModelProto) -> None:
    m.ir_version = 99


def _unknown_default_op(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"]))
    m.graph.output[0].name = "z"


def _undeclared_domain(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("MyOp", ["y"], ["z"], domain="com.example"))
    m.graph.output[0].name = "z"


def _unknown_element_type(m: onnx.ModelProto) -> None:  # found by the loader fuzz: KeyError before
    next(t for t in m.graph.initializer if t.name == "gamma").data_type = 99


def _raw_data_too_long(m: onnx.ModelProto) -> None:  # found by the loader fuzz: ValueError before
    gamma = next(t for t in m.graph.initializer if t.name == "gamma")
    gamma.raw_data = gamma.raw_data + b"\0" * 4


def _dims_far_too_big(m: onnx.ModelProto) -> None:  # found by the loader fuzz: ValueError before
    gamma = next(t for t in m.graph.initializer if t.name == "gamma")
    gamma.dims[0] = 2**31


def _graph_bytes(d: Path) -> Path:  # a valid protobuf, but a GraphProto, not a ModelProto
    return _bytes(conv_bn_model()[0].graph.SerializeToString())(d)


def _no_weights(d: Path) -> None:
    (d / "m.weights").unlink()


def _short_weights(d: Path) -> None:
    (d / "m.weights").write_bytes((d / "m.weights").read_bytes()[:100])


def _bad_offset(d: Path) -> None:  # found by the loader fuzz: ValueError before
    model = onnx.load(d / "m.onnx", load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = "abc"
    (d / "m.onnx").write_bytes(model.SerializeToString())


def _weights_outside(d: Path) -> None:
    model = onnx.load(d / "m.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../m.weights"
    (d / "m.onnx").write_bytes(model.SerializeToString())


BAD_INPUTS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing file", _missing, "no such file"),
    ("directory", _directory, "is a directory"),
    ("empty file", _bytes(b""), "empty file"),
    ("truncated at 10%", _truncated(0.1), "not an ONNX model"),
    ("truncated at 50%", _truncated(0.5), "not an ONNX model"),
    ("truncated by one byte", _truncated(1.0), "not an ONNX model"),
    ("text file", _bytes(b"name,value\nconv,1\n"), "not an ONNX model"),
    ("PNG image", _bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"), "not an ONNX model"),
    ("zip / torch.save pickle", _bytes(_zip_pickle()), "zip archive"),
    ("protobuf that is not a model", _graph_bytes, "no graph or no IR version"),
    ("fails onnx.checker", _model(_undefined_input), "fails onnx.checker"),
    ("IR version newer than onnx knows", _model(_ir_too_new), "fails onnx.checker"),
    ("unknown op, default domain", _model(_unknown_default_op), "fails onnx.checker"),
    ("custom domain without opset import", _model(_undeclared_domain), "No opset import for domain"),
    ("unknown element type", _model(_unknown_element_type), "unknown element type 99"),
    ("raw data longer than the shape", _model(_raw_data_too_long),
     "tensor 'gamma' has 36 bytes of data; its shape [8] needs 32"),
    ("shape far bigger than the data", _model(_dims_far_too_big), "has 32 bytes of data; its shape [2147483648]"),
    ("missing external data file", _external(_no_weights), "external data could not be read"),
    ("truncated external data file", _external(_short_weights), "external data could not be read"),
    ("external data outside the model folder", _external(_weights_outside), "external data could not be read"),
    ("external data offset not a number", _external(_bad_offset), "external data could not be read"),
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Callable[[Path], Path],
                       message: str) -> None:
    src = build(tmp_path / "in")
    (tmp_path / "out").mkdir()
    before = listing(tmp_path / "in") if (tmp_path / "in").exists() else {}
    got = run_cli([str(src), "-o", str(tmp_path / "out" / "o.onnx"), *NO_VERIFY], capsys)
    assert got.code == ExitCode.BAD_INPUT
    assert_one_error_line(got.err, message)
    assert (listing(tmp_path / "in") if (tmp_path / "in").exists() else {}) == before
    assert listing(tmp_path / "out") == {}


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_library(tmp_path: Path, capfd: pytest.CaptureFixture[str], build: Callable[[Path], Path],
                           message: str) -> None:
    """Same message as a typed exception; nothing printed, not even by onnx's C++ code."""
    src = build(tmp_path / "in")
    with pytest.raises(BadInputError, match=re.escape(message)) as info:
        bnfold.fold(src)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == ExitCode.BAD_INPUT
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_truncation_at_every_tenth_is_bad_input() -> None:
    data = conv_bn_model()[0].SerializeToString()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        with pytest.raises(BadInputError):
            bnfold.fold(data[:cut])


def _torchscript_bytes() -> bytes:
    torch = torch_or_skip()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    return buf.getvalue()


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the test's own torch.jit calls
def test_torchscript_archive_given_to_the_onnx_library_is_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(_torchscript_bytes())
    with pytest.raises(BadInputError, match="zip archive"):
        bnfold.fold(src)


@pytest.mark.torch
def test_onnx_given_where_torchscript_is_expected_is_bad_input(tmp_path: Path) -> None:
    torch_or_skip()
    from bnfold.torch import fold_torchscript

    src = save(conv_bn_model()[0], tmp_path / "model.pt")
    digest = listing(tmp_path)
    with pytest.raises(BadInputError, match="not a TorchScript archive"):
        fold_torchscript(src, tmp_path / "out.pt")
    assert listing(tmp_path) == digest


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the test's own torch.jit calls
def test_torchscript_archive_named_onnx_is_recognised_by_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI decides by content, not by suffix: a TorchScript archive called .onnx folds as TorchScript."""
    src = tmp_path / "model.onnx"
    src.write_bytes(_torchscript_bytes())
    digest = src.read_bytes()
    got = run_cli([str(src), "-o", str(tmp_path / "out.pt"), "-q"], capsys)
    assert got.code == ExitCode.OK, got.err
    assert src.read_bytes() == digest
    from bnfold.torch import is_torchscript

    assert is_torchscript(tmp_path / "out.pt")
