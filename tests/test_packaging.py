"""The generic folder names are importable only under the blrdeploy namespace."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["kernels", "exporters", "validators"])
def test_namespaced_not_top_level(name, tmp_path):
    code = f"import importlib.util as u, blrdeploy.{name}; print(u.find_spec('{name}') is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == "True"
