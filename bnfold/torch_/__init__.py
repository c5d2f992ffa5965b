"""TorchScript support (internal). The public face is :mod:`bnfold.torchscript`.

Nothing here imports torch at module import time: torch is the optional ``bnfold[torch]`` extra.

* ``_runtime``  -- the torch import guard, archive sniffing, loading and saving
* ``jit_fold``  -- the BatchNorm fold as a pass over a frozen TorchScript graph (BN side, rewrite)
* ``producers`` -- Conv / ConvTranspose / Linear: layouts and the folded tensors
* ``ir``        -- reading TorchScript graphs (blocks, constants, uses, names)
* ``inputs``    -- shapes, seeded example inputs, output flattening, rank probing
* ``compare``   -- per-output metrics of two runs
* ``fold``      -- ``fold_torchscript``: archive in, archive out, verified
* ``export``    -- ONNX export keeping BatchNormalization, ``fold_torch``
* ``dynamo_export`` -- the dynamo ONNX exporter with BatchNormalization kept, legacy fallback
* ``program_fold``  -- the BatchNorm fold as a pass over a ``torch.export`` program graph (decide)
* ``program``   -- ``fold_exported_program``: ``.pt2`` in, ``.pt2`` out, verified (apply, save, check)
* ``program_pipeline`` -- the ``bnfold model.pt2`` branch of the pipeline
* ``module``    -- ``fold_module``: an eager ``nn.Module`` in, a folded copy out
* ``module_graph`` -- the module-call graph fold_module reads (torch.fx, or torch.export where fx fails)
"""
