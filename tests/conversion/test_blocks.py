"""Fused pre-norm blocks: the norms and residual adds of a Llama decoder layer run inside its BLAST layers, and the
model computes what the unfused one does (forward, backward, compiled), with no kernel left between the layers."""

import copy
import pickle

import torch

from blrdeploy.conversion.blocks import FusedBlastLinear, FusedPreNormBlock, fuse_blocks
from blrdeploy.conversion.fusion import fuse_family
from blrdeploy.conversion.siblings import Siblings, fuse_siblings, fuse_swiglu
from blrdeploy.measure.bench import resolve
from blrdeploy.structures.modules import BlastLinear, LowRankLinear


def _llama(structure="blast"):
    model = resolve("llama-tiny", structure, dtype=torch.float32, seed=2, fuse_siblings=False).variants[1].build()
    with torch.no_grad():  # norms away from their all-ones init, so a norm weight applied wrong shows
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(7)))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    return model, ids


def test_fused_blocks_match_unfused_forward_and_backward():
    model, ids = _llama()
    fused = copy.deepcopy(model)
    fuse_family(fused, "llama")
    for layer in fused.model.layers:
        assert isinstance(layer, FusedPreNormBlock) and type(layer).__name__ == "FusedLlamaDecoderLayer"
        attn = layer.self_attn
        # llama-tiny has GQA: q alone (its own norm), k+v stacked (the group's norm), o_proj adding the residual
        assert type(attn.q_proj) is FusedBlastLinear and attn.q_proj.norm == (layer.input_layernorm,)
        assert attn.k_proj.group.norm == (layer.input_layernorm,) and type(attn.o_proj) is FusedBlastLinear
        assert layer.mlp.gate_up.norm == (layer.post_attention_layernorm,) and layer.mlp.adds_residual
    assert dict(fused.named_parameters()).keys() >= {"model.layers.0.input_layernorm.weight"}
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    for m in (model, fused):
        m.requires_grad_(True)
        m(ids).logits.square().mean().backward()
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.U", "mlp.down_proj.V"):
        ref, got = (m.model.layers[1].get_parameter(name).grad for m in (model, fused))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
    assert all(layer.self_attn.o_proj.pending_residual is None for layer in fused.model.layers)  # none held


def test_compiled_fused_model_has_no_graph_break_and_no_norm_between_layers():
    model, ids = _llama()
    fuse_family(model, "llama")
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    ops = [t for t in targets if "blrdeploy" in t]
    assert ops == ["blrdeploy.blast_linear_fused"] * 10  # per layer: q, k+v, o (+h), gate+up, down (+h)
    assert sum("rsqrt" in t for t in targets) == 1  # the final norm only: the blocks' norms run inside the layers
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(ids).logits, model(ids).logits)


def test_only_blocks_whose_parts_are_all_fused_blast():
    model, _ = _llama("lowrank")
    fuse_family(model, "llama")  # low-rank: no SwiGLU MLP, so no fused block
    assert not any(isinstance(m, FusedPreNormBlock) for m in model.modules())
    model, ids = _llama()
    for layer in model.model.layers:  # low-rank gate/up before a BLAST down: SwiGLU yes, the norm in gate/up no
        layer.mlp.gate_proj, layer.mlp.up_proj = LowRankLinear(64, 128, 8), LowRankLinear(64, 128, 8)
    reference = copy.deepcopy(model)
    fuse_family(model, "llama")
    assert not any(isinstance(m, FusedPreNormBlock) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    model, ids = _llama()
    reference = copy.deepcopy(model)
    plain_o = torch.nn.Linear(64, 64, bias=False)
    model.model.layers[0].self_attn.o_proj = plain_o  # a dense o_proj cannot add the residual
    reference.model.layers[0].self_attn.o_proj = copy.deepcopy(plain_o)
    fuse_siblings(model, [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")])
    fuse_swiglu(model, ["LlamaMLP"])
    assert fuse_blocks(model, ["LlamaDecoderLayer"]) == 1  # the other layer
    assert fuse_blocks(model, ["LlamaDecoderLayer"]) == 0  # never twice
    assert type(model.model.layers[0].self_attn.q_proj) is BlastLinear
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_compiled_fused_model_compiles_once_and_pickles():
    model, ids = _llama()
    fuse_family(model, "llama")
    compiled = torch.compile(model)
    with torch.no_grad():
        first = compiled(ids).logits
        with torch.compiler.set_stance("fail_on_recompile"):  # no guard on state the forward itself changes
            for _ in range(2):
                torch.testing.assert_close(compiled(ids).logits, first)
        again = pickle.loads(pickle.dumps(model))
        assert type(again.model.layers[0]) is type(model.model.layers[0])
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_a_lone_fused_layer_without_its_block_is_plain():
    """o_proj called outside its block's forward (no residual set) is the plain layer."""
    model, _ = _llama()
    fuse_family(model, "llama")
    o = model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        plain = BlastLinear.forward(o, x)
        torch.testing.assert_close(o(x), plain)


def test_norms_stay_registered_once_where_they_were():
    model, _ = _llama()
    before = [n for n, _ in model.named_parameters(remove_duplicate=False) if "norm" in n]
    fuse_family(model, "llama")
    assert all(g.norm for g in model.modules() if isinstance(g, Siblings))
    assert [n for n, _ in model.named_parameters(remove_duplicate=False) if "norm" in n] == before
