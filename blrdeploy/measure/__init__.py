"""Running and measuring models: what ``bench``, ``roofline`` and ``run`` report.

- ``bench``: a converted model beside its dense twin under one harness (prefill, decode, memory, CUDA graphs).
- ``roofline``: predicted time per layer and path on a device profile, with the kernels' own dispatch rules.
- ``devices``: the device profiles (Jetson Orin Nano, A40, H100, ...) and user profile files.
- ``runner``: feeding a model, timing its forwards, capping GPU memory, generating text.

Imports ``conversion``, ``models``, ``structures`` and ``kernels``.
"""
