"""ONNX export and per-device bundles (installed as ``blrdeploy.exporters``)."""
