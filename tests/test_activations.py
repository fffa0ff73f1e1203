"""An MLP's GELU fused into its first BLAST layer: the fused model computes what the unfused one does (forward,
backward, compiled, pickled), its names and parameters unchanged, and nothing but a GELU is fused."""

import copy
import pickle

import pytest
import torch
from torch import nn

from blrdeploy import functional as F
from blrdeploy.activations import activation_kind, fuse_activations
from blrdeploy.bench import resolve
from blrdeploy.blocks import FusedBlastLinear
from blrdeploy.models import FAMILIES, main_output
from blrdeploy.modules import BlastLinear
from blrdeploy.siblings import fuse_family


def _model(name: str):
    model = resolve(name, "blast", dtype=torch.float32, seed=3, fuse_siblings=False).variants[1].build()
    with torch.no_grad():  # biases away from zero, so a GELU applied before the bias (or twice) shows
        for m in model.modules():
            if isinstance(m, BlastLinear) and m.bias is not None:
                m.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    feed = FAMILIES[FAMILIES_OF[name]].sample(model, 2, 0)
    return model, feed


FAMILIES_OF = {"vit-tiny": "vit", "gpt2-tiny": "gpt2", "dit-tiny": "dit"}
# The linear each family's MLP activation follows, and the activation it applies.
FIRST_LINEAR = {
    "vit-tiny": ("fc1", "gelu"),
    "gpt2-tiny": ("c_fc", "gelu_tanh"),
    "dit-tiny": ("net.0.proj", "gelu_tanh"),
}


@pytest.mark.parametrize("name", list(FAMILIES_OF))
def test_fused_gelu_matches_unfused_forward_and_backward(name):
    if name == "dit-tiny":
        pytest.importorskip("diffusers")
    model, feed = _model(name)
    alone = copy.deepcopy(model)
    assert fuse_activations(alone, FAMILIES[FAMILIES_OF[name]].activations) > 0
    assert [n for n, _ in alone.named_parameters()] == [n for n, _ in model.named_parameters()]  # names unchanged
    fused = copy.deepcopy(model)
    fuse_family(fused, FAMILIES_OF[name])
    linear, kind = FIRST_LINEAR[name]
    layers = [m for n, m in fused.named_modules() if n.endswith("." + linear)]
    assert layers and all(type(m) is FusedBlastLinear and m.activation == kind for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(main_output(fused(**feed)), main_output(model(**feed)), rtol=1e-5, atol=1e-5)
    for m in (model, fused):
        m.requires_grad_(True)
        main_output(m(**feed)).square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if n.endswith(linear + ".U")} for m in (model, fused)]
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["vit-tiny", "dit-tiny"])
def test_fused_gelu_compiles_once_and_pickles(name):
    if name == "dit-tiny":
        pytest.importorskip("diffusers")
    model, feed = _model(name)
    fuse_family(model, FAMILIES_OF[name])
    compiled = torch.compile(model)
    with torch.no_grad():
        first = main_output(compiled(**feed))
        with torch.compiler.set_stance("fail_on_recompile"):
            torch.testing.assert_close(main_output(compiled(**feed)), first)
        again = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(main_output(again(**feed)), main_output(model(**feed)))


def test_only_a_gelu_after_a_plain_blast_layer_is_fused():
    class MLP(nn.Module):
        def __init__(self, act: nn.Module, fc1: nn.Module):
            super().__init__()
            self.fc1, self.act = fc1, act

        def forward(self, x):
            return self.act(self.fc1(x))

    def blast():
        return BlastLinear(8, 12, num_blocks=2, rank=4)

    sites = [("MLP", "fc1", "act")]
    model = nn.Sequential(
        MLP(nn.GELU(approximate="tanh"), blast()), MLP(nn.ReLU(), blast()), MLP(nn.GELU(), nn.Linear(8, 12))
    )
    x = torch.randn(5, 8)
    expected = model[0](x).detach()
    assert fuse_activations(model, sites) == 1
    assert isinstance(model[0].act, nn.Identity) and model[0].fc1.activation == "gelu_tanh"
    assert isinstance(model[1].act, nn.ReLU) and type(model[1].fc1) is BlastLinear  # ReLU: not fused
    assert isinstance(model[2].act, nn.GELU)  # a dense fc1: not fused
    torch.testing.assert_close(model[0](x), expected)
    assert fuse_activations(model, sites) == 0  # never twice


def test_activation_kinds():
    assert activation_kind(nn.GELU()) == "gelu" and activation_kind(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_kind(nn.SiLU()) is None
    x = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(F.activate(x, "gelu_tanh"), nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="unknown activation"):
        F.activate(x, "swish")
