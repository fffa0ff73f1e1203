"""Comparisons: ONNX vs PyTorch, kernels vs reference, converted vs dense (installed as ``blrdeploy.validators``)."""
