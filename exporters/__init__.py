"""Artifacts made from a converted checkpoint (installed as ``blrdeploy.exporters``).

- ``onnx``: the ONNX reference graph, one ``com.blrdeploy`` node per BLR layer.
- ``onnx_functions``: those nodes' bodies, as ONNX functions of standard ops (so onnxruntime needs no plugin).
- ``bundle/``: per-device bundles: the format, compiling, packaging, loading and running (its ``__init__`` lists them).
"""
