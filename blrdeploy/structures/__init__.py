"""The structures themselves: the math of BLAST, Monarch and low-rank layers, and nothing about models.

- ``functional``: each structure's forward as a float reference, and the one seam (``torch.ops.blrdeploy.*``) the
  modules, ``torch.compile``, ``torch.export`` and the ONNX exporter all go through.
- ``ops``: those torch ops, sending CUDA calls to ``blrdeploy.kernels`` and the rest to the reference.
- ``modules``: ``BlastLinear``, ``MonarchLinear``, ``LowRankLinear`` (``BLRLinear`` is what they share).
- ``factorize``: fitting a dense matrix (BLAST's preconditioned gradient descent, Monarch's projection, SVD).
- ``budget`` and ``shapes``: parameter counts, the (b, r) choice for a budget, which dimensions a structure takes.
- ``allocation``: one parameter budget spread over many layers' ranks by their spectra (greedy marginal gain).
- ``tradeoffs``: one matrix, every structure at one budget (``blrdeploy factorize``).

Imports only ``blrdeploy.kernels`` (and torch, safetensors).
"""
