"""Results -> the JSON report (stable schema) and the terminal tables (rich). The only printing code
besides the CLI; it prints only to the console it is given.

JSON schema ``bnfold.report/1`` (keys are only ever added, never renamed or removed, within a
major version)::

    {
      "schema": "bnfold.report/1",
      "bnfold_version": str,
      "input":  {"path": str|null, "bytes": int|null, "nodes": int, "batch_norms": int,
                 "format": "onnx"|"torchscript"|"exported_program"|"nn_module"},
      "output": {"path": str|null, "written": bool, "bytes": int|null, "nodes": int, "batch_norms": int},
      "folded":  [{"rule": str, "producer_op": str, "output": str, "norm_op": str, "graph": str}],
      "skipped": [{"output": str, "op_type": str, "reason": str, "graph": str}],
      "export": {"exporter": "dynamo"|"legacy", "note": str|null},   # only for torch input -> ONNX
      "verification": object|null,     # bnfold.verify Comparison.to_dict()
      "latency": object|null,          # bnfold.latency() LatencyReport.to_dict()
      "environment": object,           # bnfold.environment Environment.to_dict(): "python", "platform",
                                       # "onnx", "onnxruntime", "numpy", the machine, the providers
      "exit_code": int
    }
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Protocol

from rich.console import Console, RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from bnfold.environment import Environment
from bnfold.folding.result import FoldedPair, Skip

__all__ = ["SCHEMA", "FoldAccount", "doc_text", "fold_report", "render_fold", "render_rules", "write_json"]

SCHEMA = "bnfold.report/1"


class FoldAccount(Protocol):
    """What a report reads of a fold: an ONNX :class:`~bnfold.folding.FoldSummary` or a TorchScript fold."""

    @property
    def folded(self) -> Sequence[FoldedPair]: ...

    @property
    def skipped(self) -> Sequence[Skip]: ...

    @property
    def nodes_before(self) -> int: ...

    @property
    def nodes_after(self) -> int: ...

    @property
    def bn_before(self) -> int: ...

    @property
    def bn_after(self) -> int: ...


def fold_report(
    result: FoldAccount,
    *,
    input_path: str | None,
    output_path: str | None,
    written: bool,
    input_bytes: int | None,
    output_bytes: int | None,
    input_format: str = "onnx",
) -> dict[str, Any]:
    from bnfold._version import __version__

    return {
        "schema": SCHEMA,
        "bnfold_version": __version__,
        "input": {
            "path": input_path,
            "format": input_format,
            "bytes": input_bytes,
            "nodes": result.nodes_before,
            "batch_norms": result.bn_before,
        },
        "output": {
            "path": output_path,
            "written": written,
            "bytes": output_bytes,
            "nodes": result.nodes_after,
            "batch_norms": result.bn_after,
        },
        "folded": [asdict(p) for p in result.folded],
        "skipped": [asdict(s) for s in result.skipped],
        "verification": None,
        "latency": None,
        "environment": Environment.capture().to_dict(),
        "exit_code": 0,
    }


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report atomically (same guarantees as the model; ``"-"``: standard output)."""
    from bnfold.io.report_file import PendingReport

    PendingReport(path).write(report)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_fold(console: Console, report: dict[str, Any]) -> None:
    """The short summary: folds, normalizations left with reasons, nodes and size before/after."""
    inp, out = report["input"], report["output"]
    summary = Table(title="bnfold", show_header=True, header_style="bold")
    summary.add_column("")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_row("nodes", str(inp["nodes"]), str(out["nodes"]))
    summary.add_row("BatchNormalization", str(inp["batch_norms"]), str(out["batch_norms"]))
    summary.add_row("file size", _size(inp["bytes"]), _size(out["bytes"]))
    console.print(summary)
    folded = report["folded"]
    if folded:
        by_rule: dict[str, int] = {}
        for p in folded:
            key = f"{p['producer_op']} + {p['norm_op']}"
            by_rule[key] = by_rule.get(key, 0) + 1
        console.print(
            f"folded {len(folded)}: " + ", ".join(f"{n} x {k}" for k, n in sorted(by_rule.items()))
        )
    elif not report["skipped"]:
        console.print("nothing to fold: the model has no BatchNormalization")
    else:
        console.print("nothing folded")
    if report["skipped"]:
        left = Table(title=f"left in the graph ({len(report['skipped'])})", header_style="bold")
        left.add_column("node output")
        left.add_column("op")
        left.add_column("reason")
        for s in report["skipped"]:
            where = f"{s['graph']}: " if s["graph"] else ""
            left.add_row(where + s["output"], s["op_type"], s["reason"])
        console.print(left)
    for note in report.get("notes", ()):
        console.print(f"note: {note}")
    for check in report.get("fold_checks", ()):
        if check["verified_by"] in ("per fold", "none"):
            how = "checked alone" if check["verified_by"] == "per fold" else f"NOT checked: {check['note']}"
            console.print(f"fold {check['output']!r}: {how}")
    if out["written"]:
        console.print(f"wrote {out['path']}")
    elif out["path"] is None or not out["written"]:
        console.print("dry run: nothing written" if report.get("dry_run") else "nothing written")


def render_rules(full: bool = False) -> list[RenderableType]:
    """The fold rules: a table (name, summary, refusal conditions), or with ``full`` each rule's header."""
    from bnfold.folding.rules import rule_infos

    if full:
        return [part for info in rule_infos() for part in (Rule(info.name), doc_text(info.doc))]
    table = Table(title="bnfold rules (tried in this order)", header_style="bold")
    table.add_column("rule", no_wrap=True)
    table.add_column("summary")
    table.add_column("refuses when")
    for info in rule_infos():
        table.add_row(info.name, doc_text(info.summary), doc_text(_conditions(info.doc)))
    return [table]


def doc_text(doc: str) -> Text:
    """A rule header as terminal text: its reStructuredText literals (````W'````) shown as code, no backticks."""
    text = Text()
    for i, part in enumerate(doc.split("``")):
        text.append(part, style="cyan" if i % 2 else "")
    return text


def _conditions(doc: str) -> str:
    """The 'Conditions:' block of a rule header, as the refusal reasons a user may see."""
    out: list[str] = []
    inside = False
    for line in doc.splitlines():
        if line.startswith("Conditions:"):
            inside = True
            continue
        if inside and line and not line.startswith(" "):
            break
        if inside and line.strip():
            out.append(line.strip())
    return " ".join(out).replace(" - ", "\n- ").strip()
