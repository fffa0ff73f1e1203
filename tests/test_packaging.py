"""The generic folder names are importable only under the blrdeploy namespace: installing blrdeploy adds no
top-level ``kernels``, ``exporters`` or ``validators`` module. (Another distribution may own such a name:
transformers 5.25 requires Hugging Face's ``kernels`` package, so the check is that no top-level module of that
name comes from our folder of that name, not that none exists.)"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["kernels", "exporters", "validators"])
def test_namespaced_not_top_level(name, tmp_path):
    code = f"import importlib.util as u, blrdeploy.{name}; s = u.find_spec('{name}'); print(s and s.origin)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    origin = out.stdout.strip()
    # not the folder of ours (CI's virtual environment lies inside the checkout, so the checkout itself may hold it)
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO / name), origin
    ours = subprocess.run([sys.executable, "-c", f"import blrdeploy.{name} as m; print(m.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()  # fmt: skip
    assert Path(ours).resolve().is_relative_to(REPO / name), ours  # the check above looks where ours really is
