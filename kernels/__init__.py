"""Triton kernels and their launchers (installed as ``blrdeploy.kernels``).

Kernels import nothing from the rest of blrdeploy; the structures call them through one op per structure.
"""
