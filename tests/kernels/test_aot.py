"""Every shipped launch config compiles ahead of time for sm_86, sm_87 and sm_90 (no GPU needed).

The interpreter accepts programs the compiler rejects (layouts, shared memory), so this is the check that what CI
ran under the interpreter is also what a GPU can run. The compiles run in a child process: with TRITON_INTERPRET
set (as the kernel tests need on a machine with no GPU) Triton compiles nothing.
"""

import json
import os
import subprocess
import sys

import pytest

from blrdeploy.kernels import aot, configs


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = "import json; from blrdeploy.kernels import aot; print(json.dumps(aot.check_shipped()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_shipped_config_compiles_for_every_arch(compiled):
    assert len(compiled) == len(aot.shipped())
    failed = [f"sm_{r['arch']} {r['kernel']} {r['config']}: {r['error']}" for r in compiled if "error" in r]
    assert not failed, "\n".join(failed)
    assert {r["arch"] for r in compiled} == set(aot.ARCHS)
    for r in compiled:
        assert r["elf"] and r["target_arch"] == r["arch"] and r["num_warps"] == r["config"]["num_warps"], r
        # Shared memory is checked when a kernel is loaded, not when it compiles: hold each to its chip's limit.
        assert r["shared"] <= configs.SHARED_LIMIT[r["arch"]], f"needs {r['shared']} B of shared memory: {r}"
        if r["kernel"] == "blast_mix_dot":  # the launcher picks mix tiles by this estimate: it must not be low
            c, k = r["config"], r["constexprs"]
            assert r["shared"] <= configs.mix_dot_shared(c["BM"], c["BN"], k["BJ"], k["BI"]), r
        if r["arch"] == 90 and r["kernel"] == "gemm" and r["config"]["BM"] >= 64:
            assert r["wgmma"], f"large-N tile without Hopper's warpgroup MMA: {r}"


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="no kernels for dtype"):
        aot.compile_variant(aot.Variant("gemm", "float64"), aot.shipped()[0][1], 90)
