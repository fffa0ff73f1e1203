"""The torch ops (``torch.ops.blrdeploy.*``): the seam that eager, torch.compile, torch.export and autograd share."""

import pytest
import torch
from helpers import assert_rel_close

from blrdeploy import BlastLinear, LowRankLinear, MonarchLinear
from blrdeploy.structures import ops

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


# ---------------------------------------------------------------------- eager calls that skip the dispatcher (#23)


class _SeesEverything(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _FunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_dispatch_free_only_where_nothing_else_would_act():
    """A layer call skips torch's dispatcher (ops.dispatch_free, then the CUDA implementation directly) only where
    the dispatcher would do nothing else: never under autograd, autocast, a compiler or tracer, a tensor subclass,
    a dispatch or function mode, or a functorch transform. Checked here on CPU tensors: the predicate leaves the
    device to its caller."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    free = ops.dispatch_free
    x, w = torch.randn(3, 4), torch.randn(4, 4)
    assert free(x, w, None)
    w.requires_grad_(True)
    assert not free(x, w, None)  # autograd must record the op
    with torch.no_grad():
        assert free(x, w, None)
    w.requires_grad_(False)
    torch.set_autocast_enabled("cuda", True)
    try:
        assert not free(x, w, None)  # autocast casts the inputs first (the op's autocast registration)
    finally:
        torch.set_autocast_enabled("cuda", False)
    with _SeesEverything():
        assert not free(x, w, None)
    with _FunctionMode():
        assert not free(x, w, None)
    with FakeTensorMode() as mode:
        assert not free(mode.from_tensor(x), w, None)
    assert torch.func.vmap(lambda row: torch.tensor(float(free(row, w, None))))(x).sum() == 0
    traced = torch.jit.trace(lambda t: t * (2.0 if free(t) else 1.0), (x,), check_trace=False)
    assert torch.equal(traced(x), x)  # traced with the predicate false
    compiled = torch.compile(lambda t: t * (2.0 if free(t) else 1.0), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x)  # the compiler saw a constant False, read no probe, kept one graph
    assert free(x, w, None)  # and nothing above leaked out


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("i", range(3))
def test_gpu_direct_call_matches_the_dispatched_op(i, monkeypatch):
    """An eager no-grad call goes straight to the kernels and gives what the dispatched op gives; a call that
    needs autograd is dispatched (the op's backward exists only there)."""
    layer = _layers(torch.bfloat16, "cuda")[i]
    x = torch.randn(3, 48, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dispatched = torch.compile(layer, backend="eager")(x)  # the compiler always dispatches
        calls = []
        real = ops._on_kernels
        monkeypatch.setattr(ops, "_on_kernels", lambda *a, **k: calls.append(1) or real(*a, **k))
        direct = layer(x)
    assert calls == [1]
    assert_rel_close(direct.float(), dispatched.float(), 1e-6, "direct call")
    layer.requires_grad_(True)
    assert layer(x).grad_fn is not None
