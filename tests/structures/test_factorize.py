"""Dense -> structured: planted structures are recovered, projections are optimal, BLAST beats low-rank where
the structure varies by block, and bad weights are refused."""

import math

import pytest
import torch
from helpers import assert_rel_close, rel_error

from blrdeploy import BlastLinear, LowRankLinear, MonarchLinear
from blrdeploy.structures import functional


def planted_blast(out, inn, b, r, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(b, out // b, r, generator=g, dtype=torch.float64)
    S = torch.randn(b, b, r, generator=g, dtype=torch.float64)
    V = torch.randn(b, inn // b, r, generator=g, dtype=torch.float64)
    return functional.blast_to_dense(U, S, V)


def svd_error_at_same_params(W, params):
    out, inn = W.shape
    return LowRankLinear.from_dense(W, params // (out + inn), bias=None).fit_result.relative_error


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blast_recovers_small_planted(seed):
    W = planted_blast(192, 256, 4, 8, seed)
    layer = BlastLinear.from_dense(W, 4, 8, steps=300, seed=seed)
    assert layer.fit_result.relative_error < 1e-6, layer.fit_result.history[-5:]
    assert rel_error(layer.to_dense(), W) < 1e-6  # the reported error is the real one


@pytest.mark.parametrize("out,inn,b,r,seed", [(512, 768, 4, 32, 0), (512, 768, 4, 32, 2), (1024, 1024, 8, 64, 0)])
def test_blast_beats_svd_4x_on_larger_planted(out, inn, b, r, seed):
    W = planted_blast(out, inn, b, r, seed)
    layer = BlastLinear.from_dense(W, b, r, steps=300, seed=seed)
    svd = svd_error_at_same_params(W, layer.num_params())
    assert layer.fit_result.relative_error * 4 <= svd, (layer.fit_result.relative_error, svd)


def test_blast_error_decreases_and_tol_stops_early():
    """From a random start (the default one solves a planted matrix at once, see test_blast_fit.py)."""
    W = planted_blast(96, 64, 4, 4, 3)
    layer = BlastLinear.from_dense(W, 4, 4, steps=300, tol=1e-9, init="random")
    hist = layer.fit_result.history
    assert hist[-1] < 1e-9 and layer.fit_result.steps < 300
    assert hist[10] < hist[0]


def test_blast_beats_lowrank_on_block_structure():
    """Block-diagonal full-rank blocks (plus noise) are BLAST-representable, hopeless for a global low rank."""
    g = torch.Generator().manual_seed(4)
    blocks = [torch.randn(64, 64, generator=g, dtype=torch.float64) for _ in range(4)]
    W = torch.block_diag(*blocks) + 0.05 * torch.randn(256, 256, generator=g, dtype=torch.float64)
    blast = BlastLinear.from_dense(W, 4, 64)
    svd = svd_error_at_same_params(W, blast.num_params())
    assert blast.fit_result.relative_error < 0.15 and svd > 0.5, (blast.fit_result.relative_error, svd)


def test_blast_beats_lowrank_on_block_varying_matrix():
    """A BLAST matrix whose total rank (4 x 48) exceeds what low-rank keeps at the same budget, plus noise."""
    W = planted_blast(256, 384, 4, 48, 5)
    W = W / W.norm() + 0.05 * torch.randn(256, 384, dtype=torch.float64) / math.sqrt(256 * 384)
    blast = BlastLinear.from_dense(W, 4, 48)
    svd = svd_error_at_same_params(W, blast.num_params())
    assert blast.fit_result.relative_error < 0.75 * svd, (blast.fit_result.relative_error, svd)


@pytest.mark.parametrize("init", ["random", "svd"])
def test_blast_inits_fit_a_gaussian_matrix_better_than_svd(init):
    W = torch.randn(128, 192, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    blast = BlastLinear.from_dense(W, 4, 32, steps=100, init=init)
    assert blast.fit_result.relative_error < svd_error_at_same_params(W, blast.num_params())


def test_monarch_projection_recovers_planted():
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(4, 16, 12, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 5, 16, generator=g, dtype=torch.float64)
    W = functional.monarch_to_dense(w1, w2)
    layer = MonarchLinear.from_dense(W, 4, 16)
    assert layer.fit_result.relative_error < 1e-6
    assert rel_error(layer.to_dense(), W) < 1e-6


@pytest.mark.parametrize("b,R", [(4, 8), (3, 9), (6, 12)])
def test_monarch_error_is_discarded_energy(b, R, gen):
    W = torch.randn(36, 48, generator=gen, dtype=torch.float64)
    layer = MonarchLinear.from_dense(W, b, R)
    true_err = rel_error(layer.to_dense(), W)
    blocks = W.view(36 // b, b, b, 48 // b).permute(1, 2, 0, 3)  # the (strided-row, contiguous-column) slices
    sigma = torch.linalg.svdvals(blocks)
    dropped = math.sqrt(float((sigma[..., R // b :] ** 2).sum()) / float((W**2).sum()))
    assert abs(true_err - dropped) < 1e-10
    assert abs(layer.fit_result.relative_error - true_err) < 1e-10


def test_lowrank_error_is_discarded_energy(gen):
    W = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    layer = LowRankLinear.from_dense(W, 7)
    sigma = torch.linalg.svdvals(W)
    dropped = math.sqrt(float((sigma[7:] ** 2).sum() / (sigma**2).sum()))
    assert abs(rel_error(layer.to_dense(), W) - dropped) < 1e-10
    assert abs(layer.fit_result.relative_error - dropped) < 1e-10


@pytest.mark.parametrize(
    "build",
    [
        lambda lin: BlastLinear.from_dense(lin, 2, 4, steps=5),
        lambda lin: MonarchLinear.from_dense(lin, 2, 4),
        lambda lin: LowRankLinear.from_dense(lin, 4),
    ],
)
def test_from_linear_copies_bias_and_dtype(build):
    lin = torch.nn.Linear(12, 8).to(torch.bfloat16)
    layer = build(lin)
    assert torch.equal(layer.bias, lin.bias)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert (layer.in_features, layer.out_features) == (12, 8)
    no_bias = build(torch.nn.Linear(12, 8, bias=False))
    assert no_bias.bias is None


def test_from_dense_output_matches_dense_layer(gen):
    lin = torch.nn.Linear(48, 32).double()
    layer = MonarchLinear.from_dense(lin, 4, 32)  # full rank per block: exact
    x = torch.randn(2, 5, 48, generator=gen, dtype=torch.float64)
    assert_rel_close(layer(x), lin(x), 1e-10)


@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.randn(4, 8, 2), r"must be 2-D \(out_features, in_features\), got shape \(4, 8, 2\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"has 1 NaN/Inf value\(s\), the first at index \(0, 1\)"),
        (torch.full((4, 4), float("inf")), r"has 16 NaN/Inf"),
        (torch.ones(4, 4, dtype=torch.int64), r"must be floating point"),
        ("weights.bin", r"expected a weight tensor of shape \(out, in\) or an nn.Linear, got str"),
    ],
)
def test_bad_weights_refused(weight, match):
    for build in (
        lambda w: BlastLinear.from_dense(w, 2, 1),
        lambda w: MonarchLinear.from_dense(w, 2, 2),
        lambda w: LowRankLinear.from_dense(w, 1),
    ):
        with pytest.raises(ValueError, match=match):
            build(weight)


def test_public_factorizers_check_shapes():
    from blrdeploy import blast_factorize, lowrank_svd, monarch_project

    W = torch.randn(16, 16)
    with pytest.raises(ValueError, match="valid ranks: multiples of 4 from 4 to 16"):
        monarch_project(W, 4, 10)
    with pytest.raises(ValueError, match=r"valid ranks: 1..16"):
        lowrank_svd(W, 40)
    with pytest.raises(ValueError, match="num_blocks=3 does not divide out_features=16"):
        blast_factorize(W, (3, 3), 4)


def test_bad_bias_and_blocks_refused():
    W = torch.randn(8, 12)
    with pytest.raises(ValueError, match=r"bias has shape \(7,\), expected \(8,\)"):
        LowRankLinear.from_dense(W, 2, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="bias given twice"):
        LowRankLinear.from_dense(torch.nn.Linear(12, 8), 2, bias=torch.zeros(8))
    with pytest.raises(ValueError, match=r"num_blocks=5 does not divide out_features=8; valid block counts: 1, 2, 4"):
        BlastLinear.from_dense(W, 5, 2)
    with pytest.raises(
        ValueError, match="init must be one of 'auto', 'lowrank', 'algebraic', 'svd', 'random', got 'zeros'"
    ):
        BlastLinear.from_dense(W, 2, 2, init="zeros")


@pytest.mark.gpu
def test_blast_fits_on_gpu():
    W = planted_blast(192, 256, 4, 8, 0).float().cuda()
    layer = BlastLinear.from_dense(W, 4, 8, seed=0)
    assert layer.U.is_cuda
    assert layer.fit_result.relative_error < 1e-4  # float32 arithmetic


def test_cg_s_step_matches_cholesky(monkeypatch):
    """The large-rank S solver (CG) reaches what the exact one does, on a planted and a Gaussian matrix."""
    from blrdeploy.structures import factorize as fz

    planted = planted_blast(192, 256, 4, 8, 1)
    gauss = torch.randn(128, 192, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = [
        BlastLinear.from_dense(W, 4, r, steps=150).fit_result.relative_error for W, r in ((planted, 8), (gauss, 32))
    ]
    monkeypatch.setattr(fz, "CHOLESKY_MAX_RANK", 0)
    cg = [BlastLinear.from_dense(W, 4, r, steps=150).fit_result.relative_error for W, r in ((planted, 8), (gauss, 32))]
    assert cg[0] < 1e-5, cg
    assert abs(cg[1] - exact[1]) < 0.01 * exact[1], (cg, exact)
