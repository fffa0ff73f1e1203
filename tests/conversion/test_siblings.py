"""Stacked sibling BLAST and low-rank layers (q/k/v, gate/up): the fused model computes what the unfused one does,
one op call per group, also under torch.compile, and a member called on its own input is still right."""

import copy

import pytest
import torch

from blrdeploy import ConvertConfig, convert, load, save
from blrdeploy.conversion.blocks import FusedPreNormBlock
from blrdeploy.conversion.checkpoint import read_blr_config
from blrdeploy.conversion.fusion import fuse_family
from blrdeploy.conversion.siblings import (
    SiblingOutput,
    Siblings,
    SwiGLUMLP,
    blr_layer_count,
    fuse_siblings,
    fuse_swiglu,
)
from blrdeploy.measure.bench import resolve
from blrdeploy.models.families import FAMILIES
from blrdeploy.models.sources import build_builtin
from blrdeploy.structures import functional
from blrdeploy.structures.modules import BlastLinear, LowRankLinear, MonarchLinear

LLAMA = FAMILIES["llama"].siblings


STRUCTURES = {"blast": BlastLinear, "lowrank": LowRankLinear}


def _tiny_llama(structure="blast"):
    model = resolve("llama-tiny", structure, dtype=torch.float32, seed=2, fuse_siblings=False).variants[1].build()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    return model, ids


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_fused_llama_matches_unfused(structure):
    model, ids = _tiny_llama(structure)
    fused = copy.deepcopy(model)
    groups = fuse_siblings(fused, LLAMA)
    # llama-tiny: q (64 out) differs from k/v (32 out, GQA), so per block one k+v group and one gate+up group
    assert [g.names for g in groups] == [("k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2
    assert all(g.structure == structure for g in groups)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, STRUCTURES[structure]) and isinstance(attn.k_proj, SiblingOutput)
    assert blr_layer_count(fused) == blr_layer_count(model) == 14
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())  # stored once
    with torch.no_grad():
        ref, out = model(ids).logits, fused(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert all(g._pending is None for g in groups)  # nothing held between forwards


def test_member_on_its_own_input_computes_alone():
    model, _ = _tiny_llama()
    mlp = model.model.layers[1].mlp
    gate, up = copy.deepcopy(mlp.gate_proj), copy.deepcopy(mlp.up_proj)
    fuse_siblings(model, LLAMA)
    x1, x2 = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp.up_proj(x1), up(x1))  # computes both, keeps gate(x1)
        torch.testing.assert_close(mlp.gate_proj(x2), gate(x2))  # another tensor: not the kept one
        torch.testing.assert_close(mlp.up_proj(x2), up(x2))
        torch.testing.assert_close(mlp.gate_proj(x1), gate(x1))


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_compiled_fused_mlp_has_no_graph_break_and_one_op(structure):
    model, _ = _tiny_llama(structure)
    fuse_siblings(model, LLAMA)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    explained = torch._dynamo.explain(mlp)(x)
    assert explained.graph_break_count == 0
    ops = [n for g in explained.graphs for n in g.graph.nodes if f"{structure}_linear" in str(n.target)]
    assert len(ops) == 2  # gate+up stacked, then down
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x))


def _swiglu_llama():
    model, ids = _tiny_llama()
    fused = copy.deepcopy(model)
    fuse_siblings(fused, LLAMA)
    assert fuse_swiglu(fused, ["LlamaMLP"]) == 2
    return model, fused, ids


def test_swiglu_mlp_matches_unfused_forward_and_backward():
    model, fused, ids = _swiglu_llama()
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in fused.model.layers)
    assert blr_layer_count(fused) == 14
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    mlp, ref_mlp = fused.model.layers[1].mlp, model.model.layers[1].mlp
    x = torch.randn(3, 64, requires_grad=True)
    (grad,) = torch.autograd.grad(mlp(x).square().sum(), x)
    (ref_grad,) = torch.autograd.grad(ref_mlp(x).square().sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_compiled_swiglu_mlp_is_two_ops_and_no_activation():
    _, fused, _ = _swiglu_llama()
    mlp = fused.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    explained = torch._dynamo.explain(mlp)(x)
    assert explained.graph_break_count == 0
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if "blrdeploy" in t] == ["blrdeploy.blast_linear", "blrdeploy.blast_linear_fused"]
    assert not any("silu" in t or "mul" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x))


def test_swiglu_only_where_down_is_blast_and_the_activation_is_silu():
    model, _ = _tiny_llama("lowrank")
    fuse_siblings(model, LLAMA)
    assert fuse_swiglu(model, ["LlamaMLP"]) == 0  # low-rank down: no fused first stage to load through
    model, _ = _tiny_llama()
    fuse_siblings(model, LLAMA)
    assert fuse_swiglu(model, ["GPT2MLP"]) == 0  # not a class the family names
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert fuse_swiglu(model, ["LlamaMLP"]) == 1  # the other layer only


def test_fusing_refuses_mismatched_members_and_skips_other_shapes():
    a, b = BlastLinear(32, 48, 4, 8), BlastLinear(32, 24, 4, 8)
    with pytest.raises(ValueError, match="one shape"):
        Siblings([a, b], ["a", "b"])
    with pytest.raises(ValueError, match="one shape"):
        Siblings([LowRankLinear(32, 48, 8), LowRankLinear(32, 48, 4)], ["a", "b"])
    parent = torch.nn.Module()
    parent.q, parent.k = a, b
    assert fuse_siblings(parent, [("q", "k")]) == [] and parent.q is a
    # one structure per group, and Monarch (no stacked kernel) stays as it is
    parent.q, parent.k, parent.v = BlastLinear(32, 48, 4, 8), LowRankLinear(32, 48, 8), MonarchLinear(32, 48, 4, 8)
    parent.o = MonarchLinear(32, 48, 4, 8)
    assert fuse_siblings(parent, [("q", "k", "v", "o")]) == []


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_saving_a_fused_model_writes_the_unfused_checkpoint(tmp_path, structure):
    model, ids = _tiny_llama(structure)
    save(model, tmp_path / "plain", source={"id": "llama-tiny"})
    fuse_family(model, "llama")  # stacked siblings, and for BLAST the SwiGLU MLPs and the fused blocks
    save(model, tmp_path / "fused", source={"id": "llama-tiny"})
    plain, again = load(tmp_path / "plain"), load(tmp_path / "fused")
    layers = [sorted(read_blr_config(tmp_path / d)["layers"], key=lambda e: e["name"]) for d in ("fused", "plain")]
    assert layers[0] == layers[1]
    assert not any(isinstance(m, Siblings) for m in again.modules())
    for (key, value), (key2, value2) in zip(plain.state_dict().items(), again.state_dict().items(), strict=True):
        assert key == key2 and torch.equal(value, value2), key
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_fusing_frees_the_old_factors_and_keeps_fit_errors(tmp_path):
    import gc
    import weakref

    model = build_builtin("llama-tiny").model
    convert(model, ConvertConfig(structure="blast", layers=(("*", 4, 16),), params_ratio=None, steps=2))
    save(model, tmp_path / "plain", source={"id": "llama-tiny"})
    old = [weakref.ref(layer.mlp.up_proj.U) for layer in model.model.layers]
    fuse_siblings(model, LLAMA)
    gc.collect()
    assert all(ref() is None for ref in old)  # stacked copies replace them: peak is one group, not all
    save(model, tmp_path / "fused", source={"id": "llama-tiny"})
    errors = [
        {e["name"]: e["relative_error"] for e in read_blr_config(tmp_path / d)["layers"]} for d in ("plain", "fused")
    ]
    assert errors[0] == errors[1] and all(v is not None for v in errors[0].values())


def test_load_fuses_on_request_and_equals_unfused(tmp_path):
    model = build_builtin("llama-tiny").model
    convert(model, ConvertConfig(structure="blast", layers=(("*", 4, 16),), params_ratio=None, steps=2))
    save(model, tmp_path / "c", source={"id": "llama-tiny"})
    plain, fused = load(tmp_path / "c"), load(tmp_path / "c", fuse_siblings=True)
    assert not any(isinstance(m, Siblings) for m in plain.modules())
    assert sum(isinstance(m, Siblings) for m in fused.modules()) == 4
    assert sum(isinstance(m, SwiGLUMLP) for m in fused.modules()) == 2
    assert sum(isinstance(m, FusedPreNormBlock) for m in fused.modules()) == 2
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_export_refuses_stacked_factors(structure, monkeypatch):
    """ONNX has one node per layer: a fused group is refused with a clear error, not exported wrong."""

    model, _ = _tiny_llama(structure)
    (group,) = fuse_siblings(model.model.layers[0].mlp, LLAMA)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="export the model before fuse_siblings"):
        group(x)
    single = model.model.layers[0].self_attn.q_proj  # unfused: still one node
    monkeypatch.setattr(functional, "_onnx_node", lambda op, *a: op)
    assert single(x) == {"blast": "BlastLinear", "lowrank": "LowRankLinear"}[structure]


def test_export_refuses_the_fused_op(monkeypatch):
    from blrdeploy.structures import functional

    down = _tiny_llama()[0].model.layers[0].mlp.down_proj
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with pytest.raises(ValueError, match="fused BLAST layer has no ONNX op: export the model before fuse_siblings"):
        functional.blast_linear_fused(torch.randn(1, 2 * down.in_features), down.U, down.S, down.V, swiglu_input=True)
