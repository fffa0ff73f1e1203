"""Forward == dense form for every structure, over random shapes, leading dims and dtypes."""

import pytest
import torch
from helpers import assert_rel_close

from blrdeploy import BlastLinear, LowRankLinear, MonarchLinear
from blrdeploy.structures import functional

# (out, in, num_blocks, rank): rectangular, b_out != b_in, odd block widths, r > block width
BLAST_SHAPES = [
    (12, 20, 4, 3),
    (30, 18, (5, 3), 7),
    (64, 48, (2, 6), 16),
    (7, 21, (7, 3), 5),
    (40, 24, (4, 2), 24),
    (5, 9, 1, 2),
]
MONARCH_SHAPES = [(12, 20, 4, 8), (30, 18, 3, 9), (64, 96, 4, 32), (18, 45, 9, 18), (6, 6, 1, 3)]
LOWRANK_SHAPES = [(12, 20, 3), (33, 7, 7), (1, 9, 1)]
LEADING = [(), (5,), (2, 3), (1, 1, 4)]


def _randomize(layer: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _layers(dtype=torch.float64):
    for out, inn, b, r in BLAST_SHAPES:
        yield BlastLinear(inn, out, b, r, dtype=dtype)
    for out, inn, b, r in MONARCH_SHAPES:
        yield MonarchLinear(inn, out, b, r, dtype=dtype)
    for out, inn, r in LOWRANK_SHAPES:
        yield LowRankLinear(inn, out, r, dtype=dtype)
    yield BlastLinear(20, 12, 4, 3, bias=False, dtype=dtype)
    yield MonarchLinear(20, 12, 4, 8, bias=False, dtype=dtype)
    yield LowRankLinear(20, 12, 3, bias=False, dtype=dtype)


@pytest.mark.parametrize("lead", LEADING)
def test_forward_equals_dense_float64(lead, gen):
    for layer in _layers():
        _randomize(layer, gen)
        x = torch.randn(*lead, 3, layer.in_features, generator=gen, dtype=torch.float64)
        ref = x @ layer.to_dense().T
        if layer.bias is not None:
            ref = ref + layer.bias
        assert_rel_close(layer(x), ref, 1e-12, repr(layer))


def test_blast_dense_blocks_match_definition(gen):
    layer = BlastLinear(20, 30, (5, 4), 6, dtype=torch.float64)
    _randomize(layer, gen)
    W = layer.to_dense()
    p, q = 6, 5
    for i in range(5):
        for j in range(4):
            block = layer.U[i] @ torch.diag(layer.S[i, j]) @ layer.V[j].T
            assert_rel_close(W[i * p : (i + 1) * p, j * q : (j + 1) * q], block, 1e-13, f"block ({i},{j})")


def test_monarch_matches_einsum_definition(gen):
    """The canonical forms (structures.functional's docstring), written out literally, against the module."""
    layer = MonarchLinear(20, 12, 4, 8, bias=False, dtype=torch.float64)
    _randomize(layer, gen)
    x = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    b, R = 4, 8
    h = torch.einsum("nkp,kqp->nkq", x.view(7, b, 5), layer.w1).reshape(7, b * R)
    h = h.view(7, R, b).transpose(1, 2)
    o = torch.einsum("nlr,lsr->nls", h, layer.w2)
    ref = o.transpose(1, 2).reshape(7, 12)
    assert_rel_close(layer(x), ref, 1e-13)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_reference_forward_low_precision(dtype, tol, gen):
    for layer64 in _layers():
        _randomize(layer64, gen)
        low = _copy_to(layer64, dtype)
        x = torch.randn(4, 3, layer64.in_features, generator=gen, dtype=torch.float64)
        out = low(x.to(dtype))
        assert out.dtype == dtype
        assert_rel_close(out, layer64(x), tol, f"{type(low).__name__} {dtype}")


def _copy_to(layer, dtype):
    import copy

    return copy.deepcopy(layer).to(dtype)


def test_counts():
    blast = BlastLinear(4096, 4096, 16, 1024)
    assert blast.num_params() == 1024 * (4096 + 4096 + 256)
    assert blast.num_params(include_bias=True) == blast.num_params() + 4096
    assert blast.flops(10) == 20 * blast.num_params()
    monarch = MonarchLinear(4096, 11008, 16, 1536, bias=False)
    assert monarch.num_params() == 1536 * (4096 + 11008)
    assert monarch.num_params() == sum(p.numel() for p in monarch.parameters())
    low = LowRankLinear(768, 3072, 64)
    assert low.num_params() == 64 * (768 + 3072)
    assert 0 < low.compression() < 1


def test_init_matches_linear_scale():
    torch.manual_seed(0)
    for layer in (BlastLinear(512, 512, 4, 64), MonarchLinear(512, 512, 4, 64), LowRankLinear(512, 512, 64)):
        var = float(layer.to_dense().detach().double().var())
        assert 0.5 < var * 3 * 512 < 2, f"{layer}: dense variance {var:.3e}, nn.Linear's is {1 / (3 * 512):.3e}"


def test_meta_device_init_has_no_storage():
    layer = BlastLinear(4096, 11008, 16, 1488, device="meta")
    assert all(p.is_meta for p in layer.parameters())


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: BlastLinear(30, 20, 7, 4),
            r"num_blocks=7 does not divide out_features=20; valid block counts: 1, 2, 4, 5, 10",
        ),
        (lambda: BlastLinear(30, 20, (4, 4), 4), r"does not divide in_features=30; valid block counts: 1, 2, 3, 5, 6"),
        (lambda: BlastLinear(30, 20, (4, 3, 1), 4), r"num_blocks must be an int or a pair"),
        (lambda: BlastLinear(30, 20, 2, 0), r"rank=0 is out of range for BLAST; valid ranks: 1..20"),
        (lambda: BlastLinear(30, 20, 2, 21), r"valid ranks: 1..20"),
        (
            lambda: MonarchLinear(30, 20, 4, 8),
            r"divide both out_features=20 and in_features=30; valid block counts: 1, 2, 5, 10",
        ),
        (lambda: MonarchLinear(30, 20, 5, 12), r"valid ranks: multiples of 5 from 5 to 20"),
        (lambda: MonarchLinear(30, 20, 5, 25), r"rank=25 is out of range"),
        (lambda: LowRankLinear(30, 20, 21), r"valid ranks: 1..20"),
        (lambda: LowRankLinear(0, 20, 1), r"in_features must be a positive int"),
    ],
)
def test_bad_shapes_name_valid_choices(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_input_width():
    with pytest.raises(ValueError, match="input has 7 features in its last dim, the layer expects 20"):
        BlastLinear(20, 12, 4, 3)(torch.randn(2, 7))


def test_functional_is_the_module_forward(gen):
    layer = BlastLinear(20, 12, 4, 3, dtype=torch.float64)
    _randomize(layer, gen)
    x = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    assert torch.equal(layer(x), functional.blast_linear(x, layer.U, layer.S, layer.V, layer.bias))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_reference_forward_cuda(dtype, tol, gen):
    for layer64 in _layers():
        _randomize(layer64, gen)
        low = _copy_to(layer64, dtype).cuda()
        x = torch.randn(4, 3, layer64.in_features, generator=gen, dtype=torch.float64)
        out = low(x.to(dtype).cuda())
        assert out.is_cuda and out.dtype == dtype
        assert_rel_close(out.cpu(), layer64(x), tol, f"{type(low).__name__} {dtype} cuda")
