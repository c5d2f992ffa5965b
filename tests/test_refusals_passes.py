"""Refusals made by the fold pass itself (bnfold/folding/passes.py): normalizations that are never
foldable, a BatchNormalization that cannot be read, a rule that fails on a malformed node, and an input
no node produces. One test per reason, asserting its text."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model, tensor
from onnx import helper
from refusal_graphs import bn, bn_inits, reasons, vi


@pytest.mark.parametrize(
    ("op", "inputs", "phrase"),
    [
        ("InstanceNormalization", ["x", "s", "b"], "InstanceNormalization computes its statistics from each input"),
        ("LpNormalization", ["x"], "LpNormalization divides by a norm computed from each input"),
    ],
)
def test_never_foldable_normalizations_are_reported(op: str, inputs: list[str], phrase: str) -> None:
    inits = [tensor("s", np.ones(3, np.float32)), tensor("b", np.zeros(3, np.float32))]
    model = make_model([helper.make_node(op, inputs, ["y"])], [vi("x", [1, 3, 4, 4])], [vi("y", None)],
                       inits[: len(inputs) - 1])
    got = reasons(model, check=True)
    assert len(got) == 1 and got[0].startswith(phrase)


def test_unreadable_batchnorm_is_refused_not_raised() -> None:
    inits = [tensor("W", np.ones((4, 3, 1, 1), np.float32)), *bn_inits(4)]
    node = bn("t", "y")
    node.attribute.append(helper.make_attribute("epsilon", "abc"))  # a string where a float belongs
    model = make_model([helper.make_node("Conv", ["x", "W"], ["t"]), node], [vi("x", [1, 3, 4, 4])],
                       [vi("y", None)], inits)
    assert reasons(model) == ["BatchNormalization (output 'y') could not be read (ValueError: could not convert "
                              "string to float: b'abc')"]


def test_rule_failing_on_a_malformed_node_is_a_refusal() -> None:
    inits = [tensor("W", np.ones((3, 4, 1, 1), np.float32)), *bn_inits(4)]
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["t"], group="x"), bn("t", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    (reason,) = reasons(model)
    assert reason.startswith("rule 'conv_transpose' could not analyse this pattern (ValueError: ")
    assert reason.endswith("left unfolded")


def test_input_produced_by_no_node_has_no_producer() -> None:
    model = make_model([bn("nowhere", "y")], [vi("x", [1, 3, 4, 4])], [vi("y", None)], bn_inits(3))
    assert reasons(model) == ["its input 'nowhere' is not produced by any node here: there is no producer to "
                              "fold into; no forward fold either: its output 'y' is a graph output"]
