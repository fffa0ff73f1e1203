"""The ops' hand-written backward (``blrdeploy.structures.gradients``) against autograd through the float64
reference, on odd shapes, leading dims, a non-contiguous output gradient and every subset of wanted gradients."""

import itertools

import pytest
import torch
from helpers import assert_rel_close

from blrdeploy.structures import functional, gradients

# (name, reference, gradient function, factor shapes from (in, out, blocks, rank))
CASES = {
    "blast": (
        functional.blast_reference,
        gradients.blast,
        lambda i, o, b, r: [(b[1], o // b[1], r), (b[1], b[0], r), (b[0], i // b[0], r)],
    ),
    "monarch": (
        functional.monarch_reference,
        gradients.monarch,
        lambda i, o, b, r: [(b[0], r * b[0], i // b[0]), (b[0], o // b[0], r * b[0])],
    ),
    "lowrank": (functional.lowrank_reference, gradients.lowrank, lambda i, o, b, r: [(o, r), (i, r)]),
}
# (in, out, (b_in, b_out), rank); Monarch uses b_in blocks on both sides and width rank * b_in
SHAPES = [(15, 21, (3, 7), 5), (12, 8, (2, 2), 3), (35, 10, (5, 5), 1), (6, 9, (3, 3), 7)]


def _inputs(name, shape, lead, bias):
    i, o, b, r = shape
    torch.manual_seed(hash((name, shape, lead)) % 2**31)
    factors = [torch.randn(s, dtype=torch.float64) for s in CASES[name][2](i, o, b, r)]
    x = torch.randn(*lead, i, dtype=torch.float64)
    grad = torch.randn(o, *lead, dtype=torch.float64).movedim(0, -1)  # non-contiguous, as a transposed view
    return x, factors, torch.randn(o, dtype=torch.float64) if bias else None, grad


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", [(4,), (2, 3), (0,)])
def test_gradients_match_the_reference(name, shape, lead):
    reference, grads_of, _ = CASES[name]
    x, factors, bias, grad = _inputs(name, shape, lead, bias=True)
    inputs = [x, *factors, bias]
    for needs in itertools.product((False, True), repeat=len(inputs)):
        if not any(needs):
            continue
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
        expected = torch.autograd.grad(reference(*leaves), [t for t in leaves if t.requires_grad], grad)
        got = grads_of(*inputs, grad, needs)
        assert len(got) == len(inputs)
        expected = iter(expected)
        for g, t, n in zip(got, inputs, needs, strict=True):
            if not n:
                assert g is None
                continue
            e = next(expected)
            assert g.shape == t.shape and g.dtype == t.dtype
            if e.count_nonzero() == 0:  # no tokens: every factor's gradient is exactly zero
                assert g.count_nonzero() == 0, f"{name} {shape} {lead} {needs}"
            else:
                assert_rel_close(g, e, 1e-12, f"{name} {shape} {lead} {needs}")


@pytest.mark.parametrize("name", CASES)
def test_the_op_backward_matches_the_reference_without_bias(name):
    """Through the op (its registered backward) with no bias, float64, and a leading batch of two dims."""
    reference, _, _ = CASES[name]
    op = {"blast": torch.ops.blrdeploy.blast_linear, "monarch": torch.ops.blrdeploy.monarch_linear,
          "lowrank": torch.ops.blrdeploy.lowrank_linear}[name]  # fmt: skip
    x, factors, _, grad = _inputs(name, SHAPES[0], (2, 3), bias=False)
    leaves = [t.requires_grad_() for t in (x, *factors)]
    got = torch.autograd.grad(op(*leaves, None), leaves, grad)
    expected = torch.autograd.grad(reference(*leaves, None), leaves, grad)
    for g, e in zip(got, expected, strict=True):
        assert_rel_close(g, e, 1e-12, name)


def test_stacked_siblings_keep_the_generic_backward():
    """A leading L on the factors (fused siblings) is not what the GEMM backward takes: the op still differentiates
    the reference there, and gets the same gradients."""
    torch.manual_seed(1)
    U, S, V = (
        torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(2, 2, 4, 3), (2, 2, 3, 3), (2, 3, 5, 3)]
    )
    x = torch.randn(7, 15, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.blrdeploy.blast_linear(*a, None), (x, U, S, V))
    A, B = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(2, 6, 3), (2, 15, 3)])
    assert torch.autograd.gradcheck(lambda *a: torch.ops.blrdeploy.lowrank_linear(*a, None), (x, A, B))


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_gpu_bfloat16_gradients_match_float64(name):
    """On a GPU in bfloat16 (heal's compute dtype; cuBLAS runs the GEMMs): within bfloat16's precision of float64 on
    the same rounded inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reference, grads_of, _ = CASES[name]
    x, factors, bias, grad = _inputs(name, (96, 72, (4, 6), 16), (3, 37), bias=True)
    inputs = [t.to("cuda", torch.bfloat16) for t in (x, *factors, bias)]
    got = grads_of(*inputs, grad.to("cuda", torch.bfloat16), (True,) * len(inputs))
    leaves = [t.double().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference(*leaves), leaves, grad.to("cuda").bfloat16().double())
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16
        assert_rel_close(g.double(), e, 3e-2, name)
