import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Kernel tests then run on Triton's interpreter; it must be chosen before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh seeded generator per test: inputs differ between tests but each test is reproducible."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.fixture(autouse=True)
def fresh_launch_plans():
    """No launch plan outlives its test: a test may change what plans depend on (launch constants, SM counts)."""
    replay = sys.modules.get("blrdeploy.kernels.replay")  # not imported here: that would load Triton everywhere
    if replay is not None:
        replay.clear()
