"""bnfold.verify on folds: correct folds pass; broken folds (bias dropped, wrong axis, fp16 overflow,
bfloat16) are caught and localised to the folded pair.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from verify_models import (
    CPU,
    FAST,
    PAIRS,
    Pair,
    conv_layer,
    mlp,
    two_convs,
)

from bnfold.check import (
    Comparison,
    fold_candidates,
    localise,
    verify,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_correct_conv_fold_passes(dtype):
    orig, fold = two_convs(dtype)
    result = verify(orig, fold, fold_outputs=PAIRS, **FAST)
    assert isinstance(result, Comparison) and result and result.passed, result.summary
    assert result.providers == (CPU,) and result.seeds == (0, 1, 2) and len(result.runs) == 3
    assert result.localisation is None
    out = result.runs[0].outputs[0]
    assert out.name == "y" and out.shape == (1, 4, 32, 32) and out.dtype == np.dtype(dtype).name
    assert out.max_abs is not None and out.needed_atol is not None and out.needed_atol <= out.atol
    limit = 1e-5 if dtype is np.float32 else 1e-2  # relative to the output's scale
    assert out.max_abs < limit * max(1.0, out.ref_max_abs) and out.cosine > 0.9999
    assert result.inputs[0].shape == (1, 3, 32, 32) and result.inputs[0].defaulted_dims == (0, 2, 3)
    assert result.inputs[0].source == "normal(0, 1)" and result.inputs[0].shape_source == "ladder: size 32"
    assert result.summary.startswith("verified on CPU, 3 seed(s), 1 output(s)")


def test_correct_gemm_fold_passes_in_float64():
    orig, fold = mlp(np.float64)
    result = verify(orig, fold, **FAST)
    assert result.passed, result.summary
    out = result.runs[0].outputs[0]
    assert out.dtype == "float64" and out.rtol == 1e-9 and out.max_abs < 1e-13


@pytest.mark.parametrize("broken", [1, 2])
def test_bias_dropped_is_caught_and_localised(broken):
    orig, fold = two_convs(broken=broken, how="bias")
    result = verify(orig, fold, fold_outputs=PAIRS, **FAST)
    assert not result and len(list(result.failures())) == 3
    out = result.runs[0].outputs[0]
    assert out.max_abs > 0.1 and out.needed_atol > 100 * out.atol
    loc = result.localisation
    assert loc is not None and loc.provider == CPU and loc.seed == 0
    assert loc.first is not None and loc.first.output == f"bn{broken}"
    assert [c.output for c in loc.checks] == ["bn1", "bn2"]
    assert [c.diverges for c in loc.checks] == [broken == 1, True]  # downstream of a break diverges too
    assert loc.first.rule == "conv" and loc.first.folded_node == f"Conv 'conv{broken}'"
    assert loc.first.original_node == f"BatchNormalization 'bn{broken}'"
    # the fold's figures: the dropped shift is what it would have needed
    assert loc.first.comparison is not None and loc.first.comparison.max_abs > 0.1
    assert f"first diverging fold: 'bn{broken}' (conv)" in result.summary
    assert result.summary.startswith("verification failed on CPU seed 0, output 'y': ")


def test_wrong_axis_is_caught_and_localised():
    orig, fold = two_convs(broken=2, how="axis")
    result = verify(orig, fold, fold_outputs=PAIRS, seeds=(5,), **FAST)
    assert not result.passed and result.seeds == (5,)
    assert result.localisation is not None and result.localisation.first.output == "bn2"
    assert not result.localisation.checks[0].diverges  # bn1 is right
    assert result.runs[0].outputs[0].cosine < 0.999


def test_fp16_overflow_is_caught_and_localised():
    """A folded fp16 weight rounded to inf: the channel it scales reads only zeros, so the original stays
    finite while the folded model computes inf * 0 = NaN."""
    rng = np.random.default_rng(11)
    l1, l2 = conv_layer(rng, 3, 4), conv_layer(rng, 4, 4)
    l1.w[3], l1.b[3], l1.mean[3], l1.beta[3] = 0.0, 0.0, 0.0, -1.0  # channel 3 of relu1 is always 0
    l2.w[0] = 0.0
    l2.w[0, 3] = 100.0  # only reads the dead channel
    l2.gamma[0], l2.var[0], l2.mean[0] = 10.0, 1e-5, l2.b[0]  # scale 2236: 100 x 2236 > 65504
    orig, fold = two_convs(np.float16, broken=2, layers=(l1, l2))
    assert np.isinf(numpy_helper.to_array(fold.graph.initializer[2])).any()
    result = verify(orig, fold, fold_outputs=PAIRS, seeds=(0,), **FAST)
    out = result.runs[0].outputs[0]
    assert not result and out.nonfinite_mismatched > 0 and out.needed_atol is None
    assert "folded has NaN" in out.reason and "where the other model is finite" in out.reason
    assert result.localisation.first.output == "bn2"
    json.dumps(result.to_dict(), allow_nan=False)  # no inf/nan leaks into the report


def test_broken_gemm_in_float64_and_inferred_fold_outputs():
    orig, fold = mlp(np.float64, broken=True)
    assert fold_candidates(orig, fold) == ["bn1"]
    result = verify(orig, fold, **FAST)  # no fold list: inferred from the graphs
    assert not result and result.localisation.first.output == "bn1"


def test_localise_directly_and_subgraph_note():
    orig, fold = two_convs(broken=2, how="bias")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    pairs = [*PAIRS, Pair("conv", "Conv", "inner", graph="If_0/then_branch"), "nowhere"]
    loc = localise(orig, fold, pairs, feeds, CPU)
    assert loc.first.output == "bn2" and loc.error == ""
    notes = {c.output: c.note for c in loc.checks if c.comparison is None}
    assert notes == {
        "inner": "fold in subgraph If_0/then_branch cannot be exposed as a graph output",
        "nowhere": "tensor 'nowhere' is not produced in the folded model's main graph",
    }


def test_bfloat16_models_are_checked_widened_to_float32_and_a_wrong_fold_is_caught() -> None:
    """onnxruntime's CPU provider has no bf16 Conv: both models are widened exactly to float32."""
    from conv_cases import ConvCase, build_conv_bn
    from onnx import numpy_helper

    import bnfold

    case = ConvCase(2, 1, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), None, True,
                    np.dtype(ml_dtypes.bfloat16), 15, 1e-3, (5, 5), 3)
    model, _ = build_conv_bn(case)
    folded = bnfold.fold(model).model
    good = bnfold.verify(model, folded)
    assert good.passed and any("widened exactly to float32" in n for n in good.notes)
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    w = broken.graph.initializer[0]
    arr = numpy_helper.to_array(w).astype(np.float32)
    arr[1] *= 2.0  # one output channel scaled twice: what a fold on the wrong axis does to one channel
    w.CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), w.name))
    bad = bnfold.verify(model, broken)
    assert not bad.passed
    assert bad.localisation is not None and bad.localisation.first is not None
