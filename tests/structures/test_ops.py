"""The torch ops (``torch.ops.blrdeploy.*``): the seam that eager, torch.compile, torch.export and autograd share."""

import pytest
import torch
from helpers import assert_rel_close

from blrdeploy import BlastLinear, LowRankLinear, MonarchLinear

CUDA = torch.cuda.is_available()


def _layers(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    layers = [
        BlastLinear(48, 40, 4, 12, bias=True),
        MonarchLinear(48, 40, 4, 8, bias=False),
        LowRankLinear(48, 40, 10, bias=True),
    ]
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return [layer.to(device=device, dtype=dtype) for layer in layers]


@pytest.mark.parametrize("i", range(3))
def test_compile_fullgraph_matches_eager(i):
    layer = _layers()[i]
    x = torch.randn(2, 5, 48)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_rel_close(compiled(x), layer(x), 1e-6, "compiled")


@pytest.mark.parametrize("i", range(3))
def test_export_keeps_one_op_per_layer(i):
    layer = _layers()[i]
    program = torch.export.export(layer, (torch.randn(3, 48),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("blrdeploy." in t for t in targets) == 1, targets
    x = torch.randn(3, 48)
    assert_rel_close(program.module()(x), layer(x), 1e-6, "exported")


@pytest.mark.parametrize("i", range(3))
def test_backward_through_the_op(i):
    layer = _layers(torch.float64)[i]
    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    assert torch.autograd.gradcheck(lambda *args: layer(args[0]), params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("i", range(3))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_casts_the_factors_and_gives_float32_gradients(i, device):
    """float32 layers under bfloat16 autocast, fed bfloat16 (what a layer after attention gets): the op runs in
    bfloat16 on bfloat16 factors and the float32 factors get float32 gradients equal to the float64 ones of the
    same bfloat16-rounded computation, up to bfloat16's precision."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    layer = _layers(device=device)[i]
    x = torch.randn(6, 48, device=device).to(torch.bfloat16)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ref = _layers(torch.float64, device)[i]
    with torch.no_grad():
        for p, q in zip(ref.parameters(), layer.parameters(), strict=True):
            p.copy_(q.to(torch.bfloat16).double())
    ref(x.double()).square().sum().backward()
    for p, q in zip(ref.parameters(), layer.parameters(), strict=True):
        assert q.grad is not None and q.grad.dtype == torch.float32
        assert_rel_close(q.grad.double(), p.grad, 5e-2, "gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(3))
def test_gpu_reduce_overhead_replays_the_kernels(i):
    """CUDA graphs (torch.compile's reduce-overhead mode) capture the kernels' launches, dependent launches included,
    and replay them on new inputs."""
    layer = _layers(torch.bfloat16, "cuda")[i]
    layer64 = _layers(torch.float64, "cuda")[i]
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(1, 4, 48, device="cuda", dtype=torch.bfloat16)
        out = compiled(x).clone()
        assert_rel_close(out, layer64(x.double()), 2e-2, f"replay {step}")
