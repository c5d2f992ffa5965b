"""The ir stage: read-only facts about a graph; nothing here changes a model.

Enters: an ``onnx.GraphProto`` (its tensors in memory or read through a ``TensorReader``). Leaves:
:class:`view.GraphView` (who produces and who consumes each tensor, which tensors are constants and
their values), shapes and ranks proven from the graph (:mod:`shapes`), constants computed by pure ops
(:mod:`evaluate`), fresh names (:mod:`names`), and the node helpers every stage reads nodes with
(:mod:`nodes`).
"""
