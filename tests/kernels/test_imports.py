"""What importing a piece of the kernels room costs: the launch configs, the dispatch rules and the dtype table are
read by planning, the roofline model and the CLI on machines without a GPU, so they must not load Triton.

Each check runs in a fresh interpreter: this one has long since imported Triton for the other kernel tests.
"""

import subprocess
import sys

import pytest

LIGHT = ("blrdeploy.kernels.configs", "blrdeploy.kernels.dispatch", "blrdeploy.kernels.dtypes")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_configs_dispatch_and_dtypes_do_not_load_triton():
    code = f"import sys, {', '.join(LIGHT)}; assert 'triton' not in sys.modules, sorted(sys.modules)"
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["blast_forward", "use_table", "tuning"])
def test_the_launchers_load_on_first_use(name):
    """The package's launcher names are still there: the first look-up imports the launchers (and Triton)."""
    code = (
        "import sys, blrdeploy.kernels as k; assert 'triton' not in sys.modules; "
        f"f = k.{name}; from blrdeploy.kernels import launch; assert f is getattr(launch, {name!r}); "
        f"assert 'triton' in sys.modules and {name!r} in dir(k)"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
