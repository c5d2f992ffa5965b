"""The command line: parse options into one options object per stage, call one library function, render.

``bnfold MODEL -o OUT`` (the implied ``fold`` verb) calls :func:`bnfold.pipeline.fold_file`; ``verify``,
``latency`` and ``rules`` are the other verbs (:mod:`bnfold.cli.app`); shared options are defined once
(:mod:`bnfold.cli.options`). Errors are one line on stderr and an exit code from
:class:`bnfold.errors.ExitCode`.
"""

from __future__ import annotations

from bnfold.cli.app import cli, main

__all__ = ["cli", "main"]
