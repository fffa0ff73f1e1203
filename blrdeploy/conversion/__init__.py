"""Turning a model into its block low-rank form, and the converted checkpoint.

- ``convert``: ``ConvertConfig``, the per-layer plan ((b, r) for each linear) and the in-place swap.
- ``pipeline``: the job behind ``blrdeploy convert``: open a model, plan, convert layer by layer, compare outputs
  with the dense model, write the checkpoint.
- ``calibration``: the converted layers' input Gram matrices on real text, for fits to the layers' outputs.
- ``sequential``: ``--sequential``: block by block, each layer fitted on the converted model's own inputs to the
  dense model's outputs.
- ``sensitivity``: how much the loss reads each layer's output (one backward pass), the allocation's weights.
- ``allocate``: how ``--params-ratio`` is spread (``uniform`` per layer, or ``sensitivity``: one budget, ranks
  by each layer's whitened spectrum weighted by its loss sensitivity, siblings sharing one rank) and its record.
- ``heal``: ``blrdeploy heal``: a short distillation of a converted checkpoint toward its dense source on text
  (the BLR factors trained, resumable from a state file, the result written atomically as a checkpoint).
- ``checkpoint``: the checkpoint directory (its files as the README lists them): atomic save, ``load`` on the meta
  device, sha256 checks, ``describe`` (``blrdeploy info``).
- ``siblings``, ``blocks``, ``fusion``: launch-saving fusions applied on load (stacked sibling layers, SwiGLU and
  whole pre-norm blocks inside BLAST layers); ``fusion.fuse_family`` applies a family's in order.

Imports ``models`` and ``structures`` (never exporters, validators or the CLI).
"""
