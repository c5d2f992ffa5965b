"""The ``bnfold`` command: parse, call one library function, render, exit with a documented code.

``bnfold MODEL -o OUT`` is the main form (the ``fold`` verb is implied). Other verbs: ``rules``.
Errors are one line on stderr and an exit code from :class:`bnfold.errors.ExitCode`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bnfold import __version__
from bnfold.errors import BnfoldError, ExitCode

__all__ = ["cli", "main"]

_GROUP_OPTIONS = {"--help", "-h", "--version", "--rules"}


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a verb, is the model of the implied ``fold`` verb."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["fold", *args]
        return super().parse_args(ctx, args)


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


@click.group(cls=_DefaultGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
@click.option("--rules", "list_rules", is_flag=True, help="List the fold rules and exit.")
@click.pass_context
def cli(ctx: click.Context, list_rules: bool) -> None:
    """Fold BatchNormalization into the preceding Conv / ConvTranspose / Gemm / MatMul, exactly.

    \b
    bnfold MODEL.onnx -o OUT.onnx      fold, verify, write (the default verb)
    bnfold rules                       list the rules and their refusal reasons
    """
    if list_rules:
        ctx.invoke(rules_cmd)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command("fold")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the folded model "
              "(default: MODEL with '.folded' before the suffix). May equal MODEL: the write is atomic.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--dry-run", is_flag=True, help="Fold and report, write no model.")
@click.option("--initializers-as-constants", is_flag=True,
              help="Treat initializers also listed as graph inputs (IR < 4 models) as constants.")
@click.option("--only", "only", multiple=True, metavar="RULE", help="Run only these rules (repeatable).")
@click.option("--skip", "skip", multiple=True, metavar="RULE", help="Do not run these rules (repeatable).")
@click.option("--no-check", is_flag=True, help="Do not run onnx.checker on the input and output.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def fold_cmd(
    model: Path,
    output: Path | None,
    report_path: Path | None,
    dry_run: bool,
    initializers_as_constants: bool,
    only: tuple[str, ...],
    skip: tuple[str, ...],
    no_check: bool,
    quiet: bool,
) -> int:
    """Fold MODEL and write the result to -o OUT."""
    from bnfold.api import fold
    from bnfold.onnx_io import load_model, save_model
    from bnfold.report import fold_report, render_fold, write_json
    from bnfold.rules import RULES

    known = {m.NAME for m in RULES}
    for name in (*only, *skip):
        if name not in known:
            raise click.BadParameter(f"unknown rule {name!r}; known: {', '.join(sorted(known))}",
                                     param_hint="--only/--skip")
    out_path = output if output is not None else model.with_name(f"{model.stem}.folded{model.suffix or '.onnx'}")
    original = load_model(model)
    result = fold(
        original,
        initializers_as_constants=initializers_as_constants,
        only=only or None,
        skip=skip,
        check=not no_check,
    )
    written = False
    if not dry_run:
        save_model(result.model, out_path)
        written = True
    report = fold_report(
        result,
        input_path=str(model),
        output_path=None if dry_run else str(out_path),
        written=written,
        input_bytes=_file_bytes(model),
        output_bytes=_file_bytes(out_path) if written else result.model.ByteSize(),
    )
    report["dry_run"] = dry_run
    return _finish(report, report_path, quiet)


def _finish(report: dict[str, Any], report_path: Path | None, quiet: bool) -> int:
    from bnfold.report import render_fold, write_json

    code = int(report.get("exit_code", 0))
    if report_path is not None:
        write_json(report, report_path)
    if not quiet:
        render_fold(_console(), report)
    return code


def _file_bytes(path: Path) -> int | None:
    try:
        total = path.stat().st_size
        data = path.with_name(f"{path.name}.data")
        if data.exists():
            total += data.stat().st_size
        return total
    except OSError:
        return None


@cli.command("rules")
@click.option("--full", is_flag=True, help="Print each rule's whole header (Before / After / Conditions).")
def rules_cmd(full: bool = False) -> int:
    """List the fold rules: name, summary, and (with --full) conditions and refusal reasons."""
    from rich.table import Table

    from bnfold.rules import rule_infos

    console = _console()
    if full:
        for info in rule_infos():
            console.rule(info.name)
            console.print(info.doc, markup=False)
        return 0
    table = Table(title="bnfold rules (tried in this order)", header_style="bold")
    table.add_column("rule")
    table.add_column("summary")
    table.add_column("refuses when")
    for info in rule_infos():
        table.add_row(info.name, info.summary, _conditions(info.doc))
    console.print(table)
    return 0


def _conditions(doc: str) -> str:
    """The 'Conditions:' block of a rule header, as the refusal reasons a user may see."""
    lines = doc.splitlines()
    out: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("Conditions:"):
            inside = True
            continue
        if inside and line and not line.startswith(" "):
            break
        if inside and line.strip():
            out.append(line.strip())
    text = " ".join(out)
    return text.replace(" - ", "\n- ").strip()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps every outcome to an exit code, never a traceback."""
    err = _console(stderr=True)
    try:
        rv = cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("bnfold: interrupted; nothing was written", markup=False)
        sys.exit(ExitCode.INTERRUPTED)
    except BnfoldError as exc:
        err.print(f"bnfold: error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except MemoryError:
        err.print("bnfold: error: out of memory", markup=False)
        sys.exit(ExitCode.INTERNAL)
    except Exception as exc:  # a bug: still one line, with a hint for the report
        err.print(
            f"bnfold: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(set BNFOLD_DEBUG=1 for a traceback; please report)",
            markup=False,
        )
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        sys.exit(ExitCode.INTERNAL)
    sys.exit(int(rv or 0) if isinstance(rv, int) else 0)
