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
"""
