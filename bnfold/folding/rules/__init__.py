"""The fold rules, in the order they are tried. One module per producer; each opens with its spec.

A rule is a module with ``NAME`` (its command-line name) and ``match(ctx, norm) -> Fold | Skip | None``.
The list is explicit and ordered: no registration on import.
"""

from __future__ import annotations

from types import ModuleType

from bnfold.folding.rules import (
    affine,
    bn_conv,
    bn_gemm,
    concat,
    constants,
    conv,
    conv_transpose,
    gemm,
    instance_norm,
    layout,
    matmul,
)
from bnfold.folding.rules.base import RuleInfo

__all__ = ["PATTERN_RULES", "PRODUCER_RULES", "RULES", "rule_infos", "select_rules"]

PRODUCER_RULES: tuple[ModuleType, ...] = (conv, conv_transpose, gemm, matmul)
"""Rules that fold a normalization backward into the producer that computes its input."""
PATTERN_RULES: tuple[ModuleType, ...] = (affine, concat, instance_norm, layout, bn_conv, bn_gemm)
"""Rules that find a wider pattern and hand the fold to the producer rules (``FoldContext.producer_rules``)
or fold forward: the decomposed normalizations (``affine``: Mul/Add chains, found by its own source in
``passes.SOURCES``), the ones reached through layout ops, and the fold into the following Conv
(``bn_conv``)."""
RULES: tuple[ModuleType, ...] = PRODUCER_RULES + PATTERN_RULES + (constants,)
"""Every rule, in the order tried: producers first, then the pattern rules. ``constants``
(``const_weights``) matches no normalization: when selected, the pass runs it before matching."""


def rule_infos() -> list[RuleInfo]:
    """Name, one-line summary and full header of every rule, read from the rule modules themselves."""
    infos = []
    for module in RULES:
        doc = (module.__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else module.NAME
        summary = first.split(":", 1)[1].strip() if ":" in first else first
        infos.append(RuleInfo(name=module.NAME, summary=summary, doc=doc))
    return infos


def select_rules(only: frozenset[str] | None, skip: frozenset[str]) -> tuple[ModuleType, ...]:
    """The rules ``--only`` / ``--skip`` leave, in RULES order; an unknown name is a ValueError."""
    known = {m.NAME for m in RULES}
    unknown = ((only or frozenset()) | skip) - known
    if unknown:
        raise ValueError(f"unknown rule(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return tuple(m for m in RULES if (only is None or m.NAME in only) and m.NAME not in skip)
