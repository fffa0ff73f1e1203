"""Reports on a converted checkpoint's outputs (installed as ``blrdeploy.validators``).

- ``onnx``: ``validate`` against onnxruntime on the ONNX reference, against the dense model it came from, or the GPU
  path against the float64 reference; every check collected, with the first diverging layer.
"""
