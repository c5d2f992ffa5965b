"""The io stage: the only code that reads or writes model files.

Enters: a path, bytes or an ``onnx.ModelProto``. Leaves: a checked ``onnx.ModelProto`` whose large
tensors may stay on disk as external-data references (:func:`load.load_lazily`), with the
:class:`store.TensorStore` that reads them on demand. On the way out: a model (or bytes) written under
temporary names beside its target and renamed into place (:mod:`staging`, :mod:`save`), its tensor bytes
streamed, never all in memory.

``load`` (loading and validating), ``store`` (external data: reading, spilling new tensors),
``staging`` (a model written beside its target, committed by rename), ``save`` (atomic writes),
``wire`` (the protobuf wire format, to read and write without holding tensor bytes), ``dtypes``
(ONNX element types and numpy's).
"""
