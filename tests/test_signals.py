"""Signals sent to a real ``python -m bnfold`` while it stages a model of tens of MB (issue 15, item 9).

SIGTERM and SIGHUP clean up like Ctrl-C (exit 128 + signal, staging folder removed, OUT as it was);
SIGKILL leaves a staging folder that the next run for the same OUT removes, saying so; folders of live
runs, of other hosts, and of unknown shape are never touched.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import ExitCode
from bnfold.io.signals import remove_stale_staging, staging_prefix

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")

N = 2048  # a 2048 x 2048 float Gemm: 16 MiB of weights, twice over (the input and the folded output)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, N).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, N).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["g"]),
        helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["b"]),
        helper.make_node("Gemm", ["b", "W2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, N])], inits)
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _start(src: Path, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "bnfold", str(src), "-o", str(out), "-q", "--seeds", "0,1,2,3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _staging(folder: Path, out: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")]


def _signal_while_staged(proc: subprocess.Popen[str], folder: Path, out: Path, sig: int) -> None:
    """Send ``sig`` once the run's staging folder exists (its write or its check is under way)."""
    deadline = time.monotonic() + 120
    while not _staging(folder, out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never staged its output"
        time.sleep(0.002)
    time.sleep(0.05)  # into the write of the tensors
    proc.send_signal(sig)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_cleans_up_and_exits_128_plus_signal(big_model: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous OUT")
    proc = _start(big_model, out)
    _signal_while_staged(proc, tmp_path, out, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == (f"bnfold: terminated ({signal.Signals(sig).name}); "
                                            "no partial output was left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
    assert out.read_bytes() == b"previous OUT"


def test_sigkill_leftover_is_removed_by_the_next_run(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous OUT")
    proc = _start(big_model, out)
    _signal_while_staged(proc, tmp_path, out, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = _staging(tmp_path, out)
    assert len(left) == 1 and f"-{proc.pid}." in left[0].name  # named after the killed run
    assert out.read_bytes() == b"previous OUT"
    again = _start(big_model, out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == ExitCode.OK, err
    assert f"removed {left[0]}, the staging folder of a run that was killed (pid {proc.pid})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Gemm", "Gemm"]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    del done
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_staging(folder: Path, name: str) -> Path:
    path = folder / name
    path.mkdir()
    (path / "o.onnx").write_bytes(b"half written")
    return path


def test_stale_staging_of_a_dead_run_is_removed(tmp_path: Path) -> None:
    pid = _dead_pid()
    prefix = staging_prefix("o.onnx").replace(f"-{os.getpid()}.", f"-{pid}.")
    stale = _fake_staging(tmp_path, prefix + "abc123.tmp")
    assert remove_stale_staging(tmp_path, "o.onnx") == [stale]
    assert not stale.exists()


def test_staging_of_a_live_run_is_kept(tmp_path: Path) -> None:
    parent = os.getppid()  # alive: the process that started pytest
    live = _fake_staging(tmp_path, staging_prefix("o.onnx").replace(f"-{os.getpid()}.", f"-{parent}.") + "x.tmp")
    assert remove_stale_staging(tmp_path, "o.onnx") == []
    assert live.exists()


def test_staging_of_another_host_is_kept(tmp_path: Path) -> None:
    other = _fake_staging(tmp_path, f".o.onnx.bnfold-elsewhere-{_dead_pid()}.abc.tmp")
    assert remove_stale_staging(tmp_path, "o.onnx") == []
    assert other.exists()


def test_staging_of_another_destination_is_kept(tmp_path: Path) -> None:
    pid = _dead_pid()
    other = _fake_staging(tmp_path, staging_prefix("p.onnx").replace(f"-{os.getpid()}.", f"-{pid}.") + "a.tmp")
    assert remove_stale_staging(tmp_path, "o.onnx") == []
    assert other.exists()


def test_folders_not_named_by_bnfold_are_kept(tmp_path: Path) -> None:
    legacy = _fake_staging(tmp_path, ".o.onnx.abc123.tmp")  # older bnfold, or anyone: not provably ours
    assert remove_stale_staging(tmp_path, "o.onnx") == []
    assert legacy.exists()


def test_stale_folder_holding_a_subfolder_is_kept(tmp_path: Path) -> None:
    pid = _dead_pid()
    odd = _fake_staging(tmp_path, staging_prefix("o.onnx").replace(f"-{os.getpid()}.", f"-{pid}.") + "b.tmp")
    (odd / "sub").mkdir()
    assert remove_stale_staging(tmp_path, "o.onnx") == []
    assert odd.exists()
