"""The installed blrdeploy version: the lowest module of the package, so every room may record it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blrdeploy")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+unknown"
