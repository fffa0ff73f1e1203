"""Running and measuring models: what ``bench``, ``roofline``, ``run`` and ``eval`` report.

- ``bench``: a converted model beside its dense twin under one harness (prefill, decode, memory, CUDA graphs).
- ``roofline``: predicted time per layer and path on a device profile, with the kernels' own dispatch rules.
- ``devices``: the device profiles (Jetson Orin Nano, A40, H100, ...) and user profile files.
- ``runner``: feeding a model, timing its forwards, capping GPU memory, generating text.
- ``evaluate``: a model's quality on real text beside its dense source (perplexity, top-1 agreement, KL; encoders'
  cosine; image and latent models' output error).

Imports ``conversion``, ``models``, ``structures`` and ``kernels``.
"""
