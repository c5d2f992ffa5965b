"""Long fuzz runs, outside CI (CI runs a few hundred examples of the same in tests/test_fuzz.py).

    python scripts/fuzz.py graphs --examples 5000            # random valid graphs through bnfold.fold
    python scripts/fuzz.py loader --cases 20000              # mutated model bytes through bnfold.fold
    python scripts/fuzz.py all --minutes 10                  # both, split over a time budget

graphs: hypothesis draws random valid graphs (tests/fuzz_graphs.py) in chunks of --chunk examples, each
chunk with its own seed; every fold must pass the oracle ``check_fold`` (checker, onnxruntime
equivalence, contract, determinism, fixed point). A failing chunk is shrunk by hypothesis and its minimal
model saved to --out as ``graph-<seed>.onnx`` with the error in ``graph-<seed>.txt``; the run goes on.

loader: each case takes a seed model (models/*.onnx, a model with an external data file, a few random
graphs), damages it (``fuzz_graphs.mutate``: bit flips, truncation, insertion, deletion, ...;
``fuzz_graphs.mutate_proto``: element types, dims, raw data, attributes, inputs, opsets, external-data
references) and calls ``bnfold.fold`` on the bytes and on a file holding them (the file loader is a
separate code path: it scans the protobuf wire format itself). The only acceptable outcomes are a
result or a ``BnfoldError``. Cases run in batches in a child process with a time limit and a memory
limit, so an interpreter crash or a hang is caught too; the case that was running is named, saved to
--out, and the batch resumes after it.

Exit status: 0 when nothing failed, 1 otherwise. One process at a time: the child runs while the parent
waits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

# the corpus for the loader fuzz: small shipped models (resnet_mini is 431 KB: used, but less often)
SEED_MODELS = (
    "conv_bn_constant_nodes.onnx",
    "legacy_ir3_bn.onnx",
    "legacy_bn_spatial0.onnx",
    "fp16_conv_bn.onnx",
    "fp16_bn_tiny_var.onnx",
    "bn_unfoldable.onnx",
)
_RANDOM_SEEDS = 24  # random graphs added to the loader corpus
_MEMORY_LIMIT = 4 << 30


# -- graphs ---------------------------------------------------------------------------------------------

def _graph_chunk(n: int, chunk_seed: int, max_steps: int) -> tuple[int, BaseException | None, object]:
    """Run ``n`` examples with one seed: (examples run, the error or None, the minimal failing case)."""
    from fuzz_graphs import FuzzCase, check_fold, graphs
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    last: list[FuzzCase] = []
    count = [0]

    @settings(max_examples=n, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @hypothesis_seed(chunk_seed)
    @given(graphs(max_steps))
    def prop(case: FuzzCase) -> None:
        count[0] += 1
        try:
            check_fold(case)
        except BaseException:
            last[:] = [case]
            raise

    try:
        prop()
    except Exception as exc:  # hypothesis replays the minimal failing example last
        return min(count[0], n), exc, last[0] if last else None
    return min(count[0], n), None, None


def fuzz_graphs(examples: int, seed: int, chunk: int, max_steps: int, out: Path, deadline: float) -> tuple[int, int]:
    """Returns (examples run, failing chunks)."""
    ran = failures = 0
    chunk_seed = seed
    while ran < examples and time.monotonic() < deadline:
        n = min(chunk, examples - ran)
        count, exc, case = _graph_chunk(n, chunk_seed, max_steps)
        if exc is not None:
            failures += 1
            base = out / f"graph-{chunk_seed}"
            out.mkdir(parents=True, exist_ok=True)
            text = "".join(traceback.format_exception(exc))
            if case is not None:
                Path(f"{base}.onnx").write_bytes(case.model.SerializeToString())  # type: ignore[attr-defined]
                text = f"{case.summary}\n\n{text}"  # type: ignore[attr-defined]
            Path(f"{base}.txt").write_text(text)
            print(f"graphs: FAIL (chunk seed {chunk_seed}): {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''} -> {base}.onnx", flush=True)
        ran += count
        chunk_seed += 1
        print(f"graphs: {ran} examples, {failures} failing chunk(s)", flush=True)
    return ran, failures


# -- loader ---------------------------------------------------------------------------------------------

Seed = tuple[bytes, dict[str, bytes]]
"""A corpus entry: the model's bytes, and the external data files that lie beside it."""


def _external_seed() -> Seed:
    import onnx
    from fuzz_graphs import sample_cases

    model = next(c.model for c in sample_cases(40, seed=777) if len(c.model.graph.initializer) >= 4)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
        return Path(tmp, "m.onnx").read_bytes(), {"m.weights": Path(tmp, "m.weights").read_bytes()}


def _corpus() -> list[Seed]:
    from fuzz_graphs import sample_cases

    seeds: list[Seed] = [((ROOT / "models" / name).read_bytes(), {}) for name in SEED_MODELS]
    seeds.append(((ROOT / "models" / "resnet_mini.onnx").read_bytes(), {}))
    seeds.append(_external_seed())
    seeds += [(c.model.SerializeToString(), {}) for c in sample_cases(_RANDOM_SEEDS, seed=12345)]
    return seeds


def _case(corpus: list[Seed], seed: int, index: int) -> Seed:
    """Case ``index``: a corpus model damaged at the byte level (odd cases) or field level (even)."""
    from fuzz_graphs import mutate, mutate_proto

    rng = np.random.default_rng([seed, index])
    # resnet_mini (index len(SEED_MODELS)) 1 time in 20: it is 100x bigger than the rest
    pick = int(rng.integers(0, len(corpus)))
    if pick == len(SEED_MODELS) and rng.random() > 0.05:
        pick = 0
    data, files = corpus[pick]
    if files and rng.random() < 0.1:  # a damaged data file instead
        name = next(iter(files))
        return data, {name: mutate(files[name], rng)}
    return (mutate_proto(data, rng) if index % 2 == 0 else mutate(data, rng)), files


def loader_worker(seed: int, start: int, count: int) -> int:
    """Child process: run cases start..start+count-1, each from bytes and from a file; one JSON line per
    event on stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    warnings.simplefilter("ignore")
    import bnfold
    from bnfold.errors import BnfoldError

    corpus = _corpus()
    outcomes = {"ok": 0, "error": 0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(start, start + count):
            print(json.dumps({"start": i}), flush=True)
            data, files = _case(corpus, seed, i)
            for leftover in folder.iterdir():
                leftover.unlink()
            (folder / "m.onnx").write_bytes(data)
            for name, content in files.items():
                (folder / name).write_bytes(content)
            for mode, source in (("bytes", data), ("path", folder / "m.onnx")):
                try:
                    bnfold.fold(source)
                    outcomes["ok"] += 1
                except BnfoldError:
                    outcomes["error"] += 1
                except BaseException as exc:  # everything else is a finding
                    tb = traceback.extract_tb(exc.__traceback__)
                    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
                    ours = [f"{Path(f.filename).name}:{f.lineno}" for f in tb if "/bnfold/" in f.filename]
                    message = str(exc).splitlines()[0][:300] if str(exc) else ""
                    print(json.dumps({"fail": i, "mode": mode, "type": type(exc).__name__, "message": message,
                                      "where": where, "bnfold": ours[-1:]}), flush=True)
    print(json.dumps({"done": outcomes}), flush=True)
    return 0


def fuzz_loader(
    cases: int, seed: int, batch: int, timeout: float, out: Path, deadline: float
) -> tuple[int, int, dict[str, int]]:
    """Returns (cases run, failures, outcome counts)."""
    failures: list[dict[str, object]] = []
    totals = {"ok": 0, "error": 0}
    corpus: list[Seed] | None = None
    i = 0
    while i < cases and time.monotonic() < deadline:
        n = min(batch, cases - i)
        cmd = [sys.executable, __file__, "_loader-worker", "--seed", str(seed), "--start", str(i), "--count", str(n)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            lines, rc, hung = proc.stdout.splitlines(), proc.returncode, False
            stderr = proc.stderr
        except subprocess.TimeoutExpired as exc:
            raw = exc.stdout or b""
            lines = (raw.decode() if isinstance(raw, bytes) else raw).splitlines()
            rc, hung, stderr = None, True, ""
        last_started, done = i - 1, False
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in event:
                last_started = event["start"]
            elif "fail" in event:
                failures.append(event)
                print(f"loader: FAIL case {event['fail']} ({event['mode']}): {event['type']}: {event['message']} "
                      f"at {event['where']} {event['bnfold']}", flush=True)
            elif "done" in event:
                done = True
                for k, v in event["done"].items():
                    totals[k] += v
        if done:
            i += n
        else:  # crashed or hung while running last_started: record it, resume after it
            if last_started < i:
                print(f"loader: worker failed before its first case (rc={rc}): {stderr[-2000:]}", flush=True)
                return i, len(failures) + 1, totals
            what = "hang" if hung else f"crash (exit status {rc})"
            failures.append({"fail": last_started, "type": what})
            print(f"loader: FAIL case {last_started}: {what}", flush=True)
            i = last_started + 1
        print(f"loader: {i} cases, {len(failures)} failure(s), outcomes {totals}", flush=True)
    if failures:
        out.mkdir(parents=True, exist_ok=True)
        if corpus is None:
            corpus = _corpus()
        for f in failures:
            idx = int(f["fail"])  # type: ignore[call-overload]
            data, files = _case(corpus, seed, idx)
            (out / f"loader-{seed}-{idx}.onnx").write_bytes(data)
            for name, content in files.items():
                (out / f"loader-{seed}-{idx}.{name}").write_bytes(content)
            (out / f"loader-{seed}-{idx}.json").write_text(json.dumps(f, indent=1))
    return i, len(failures), totals


# -- command line ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("graphs", help="random valid graphs through bnfold.fold")
    g.add_argument("--examples", type=int, default=5000)
    g.add_argument("--chunk", type=int, default=500)
    g.add_argument("--max-steps", type=int, default=12)
    ld = sub.add_parser("loader", help="mutated model bytes through bnfold.fold")
    ld.add_argument("--cases", type=int, default=20000)
    ld.add_argument("--batch", type=int, default=500)
    ld.add_argument("--timeout", type=float, default=120.0, help="seconds per batch")
    a = sub.add_parser("all", help="graphs then loader, within --minutes")
    a.add_argument("--minutes", type=float, default=10.0)
    w = sub.add_parser("_loader-worker")
    w.add_argument("--start", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    for p in (g, ld, a, w):
        p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
        p.add_argument("--out", type=Path, default=ROOT / "fuzz-failures")
    args = parser.parse_args(argv)
    if args.mode == "_loader-worker":
        return loader_worker(args.seed, args.start, args.count)
    t0 = time.monotonic()
    print(f"seed {args.seed}", flush=True)
    failed = 0
    if args.mode == "graphs":
        ran, failed = fuzz_graphs(args.examples, args.seed, args.chunk, args.max_steps, args.out, float("inf"))
        print(f"graphs: done: {ran} examples, {failed} failing chunk(s) in {time.monotonic() - t0:.0f} s")
    elif args.mode == "loader":
        ran, failed, totals = fuzz_loader(args.cases, args.seed, args.batch, args.timeout, args.out, float("inf"))
        print(f"loader: done: {ran} cases, {failed} failure(s), outcomes {totals} in {time.monotonic() - t0:.0f} s")
    else:
        half = t0 + args.minutes * 30
        ran_g, failed_g = fuzz_graphs(10**9, args.seed, 500, 12, args.out, half)
        ran_l, failed_l, totals = fuzz_loader(10**9, args.seed, 500, 120.0, args.out, t0 + args.minutes * 60)
        failed = failed_g + failed_l
        print(f"all: graphs {ran_g} examples / {failed_g} failing chunk(s); loader {ran_l} cases / {failed_l} "
              f"failure(s) {totals}; {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
