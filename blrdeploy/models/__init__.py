"""What blrdeploy knows about model families and where models come from; no structure code.

- ``families``: per family (Llama, GPT-2, ViT, DiT...) which linears convert, which layers fuse, what inputs it
  takes; the built-in models and the reference paper's per-layer preset.
- ``sources``: building a model from a built-in name, a Hugging Face or diffusers directory, or a saved config.
- ``outputs``: the shared yardstick: a family's seeded sample inputs, a model's main output, the numeric
  comparison (relative error, cosine) and the tolerances every room judges by.
- ``text``: real text (a .txt, .jsonl or a folder of them), the model's own tokenizer, token windows: what
  ``convert --calibration`` and ``eval`` both read.

Imports nothing else of blrdeploy but ``files``; transformers and diffusers load only when a model needs them.
"""
