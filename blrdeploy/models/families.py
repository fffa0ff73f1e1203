"""Model families and built-in models: what to convert by default, the reference paper's settings, how to build
a model from its config with seeded weights, and seeded sample inputs to compare outputs on; and the one-line hint
for an optional package (transformers, diffusers) that a model needs and is not installed.

Everything here is data plus small builders; a new family is one ``Family`` entry.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# A (pattern, num_blocks, rank) triple: layers whose qualified name matches ``pattern`` (fnmatch) get (b, r).
LayerSetting = tuple[str, int, int]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values (transformers) or class names (diffusers)
    include: tuple[str, ...]  # default layers to convert (reference paper)
    exclude: tuple[str, ...] = ()
    sample: Callable = None  # (model, batch, seed, seq=16) -> kwargs for forward; seq only for token models
    tokens: bool = False  # a language model: fed token ids, so it has a sequence length and decodes
    siblings: tuple[tuple[str, ...], ...] = ()  # child names that read one input: fused on CUDA (conversion.siblings)
    swiglu_mlps: tuple[str, ...] = ()  # gated MLP classes, down(silu(gate(x)) * up(x)): their activation fused too
    blocks: tuple[str, ...] = ()  # pre-norm decoder layers: norms and residual adds fused too (conversion.blocks)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    family: str
    make_config: Callable[[], object]
    paper: dict[str, tuple[LayerSetting, ...]] = field(default_factory=dict)  # structure -> settings
    note: str = ""


# ------------------------------------------------------------------------------------------------ optional packages


def extra_of(package: str) -> str | None:
    """The blrdeploy extra that installs ``package`` (``hf`` for transformers), as the installed package's metadata
    says (pyproject's optional-dependencies); None when no user-facing extra does (``dev`` is for development)."""
    try:
        requires = importlib.metadata.requires("blrdeploy") or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return None
    for requirement in requires:
        name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
        extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", requirement)
        if name and extra and extra.group(1) != "dev" and name.group(1).lower() == package.lower():
            return extra.group(1)
    return None


def install_hint(package: str, who: str = "this") -> str:
    """The one-line error for an optional package that is not installed: ``this needs the transformers package:
    pip install 'blrdeploy[hf]'``."""
    extra = extra_of(package)
    return f"{who} needs the {package} package" + (f": pip install 'blrdeploy[{extra}]'" if extra else " installed")


# ------------------------------------------------------------------------------------------------ sample inputs


def token_inputs(model, batch: int, seed: int, seq: int = 16) -> dict:
    """Seeded token ids any model with a ``config.vocab_size`` takes (a family's, or one converted with --include)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", seq)
    seq = min(seq, limit)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def _image_inputs(model, batch: int, seed: int, seq: int = 0) -> dict:  # seq: fixed by the image size
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return {"pixel_values": torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g)}


def _latent_inputs(model, batch: int, seed: int, seq: int = 0) -> dict:  # seq: fixed by the latent size
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return {
        "hidden_states": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "class_labels": torch.randint(0, c.num_embeds_ada_norm, (batch,), generator=g),
    }


# ----------------------------------------------------------------------------------------------------- families

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama",
            ("llama",),
            include=("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"),
            sample=token_inputs,
            tokens=True,
            siblings=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
            swiglu_mlps=("LlamaMLP",),
            blocks=("LlamaDecoderLayer",),
        ),
        Family(
            "gpt2",
            ("gpt2",),
            include=("*.attn.c_attn", "*.mlp.c_fc", "*.mlp.c_proj"),
            sample=token_inputs,
            tokens=True,
        ),
        Family(
            "vit",
            ("vit",),
            # transformers >= 5 names (q/k/v_proj, mlp.fc1/fc2) and the 4.x names (query/key/value, intermediate,
            # output); the attention output projection stays dense, as in the reference paper.
            include=(
                "*.attention.q_proj",
                "*.attention.k_proj",
                "*.attention.v_proj",
                "*.mlp.fc1",
                "*.mlp.fc2",
                "*.attention.attention.query",
                "*.attention.attention.key",
                "*.attention.attention.value",
                "*.intermediate.dense",
                "*.output.dense",
            ),  # fmt: skip
            exclude=("*.attention.output.dense",),
            sample=_image_inputs,
            siblings=(("q_proj", "k_proj", "v_proj"), ("query", "key", "value")),
        ),
        Family(
            "dit",
            ("DiTTransformer2DModel",),
            include=("*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v", "*.ff.net.0.proj", "*.norm1.linear"),
            sample=_latent_inputs,
            siblings=(("to_q", "to_k", "to_v"),),  # attn1 only is converted: self-attention, one input
        ),
    ]
}


def family_of_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"unsupported architecture {model_type!r}; supported: {known}. "
        "Other models whose projections are nn.Linear or Conv1D convert with --include PATTERN."
    )


# ----------------------------------------------------------------------------------------------- built-in models


def _hf(config_class: str, **kw):
    """A deferred transformers config (transformers is an optional dependency: imported only when built)."""

    def make():
        try:
            import transformers  # deferred: an optional dependency that takes seconds to import
        except ImportError as exc:
            raise ValueError(install_hint("transformers", "this model")) from exc
        return getattr(transformers, config_class)(**kw)

    return make


def _dit(**kw):
    return lambda: {"_class_name": "DiTTransformer2DModel", **kw}


def _matched_rank(b: int, out: int, inn: int, blast_rank: int, multiple: int) -> int:
    """The rank of a structure with params r*(out+in) nearest the BLAST setting's params, in steps of ``multiple``."""
    raw = blast_rank * (out + inn + b * b) / (out + inn)
    return max(multiple, round(raw / multiple) * multiple)


def _paper(blast: tuple[tuple[str, int, int, int, int], ...], monarch: dict[str, int] | None = None):
    """Settings from (pattern, b, r, out, in) rows: BLAST as given; Monarch as given in ``monarch`` (pattern -> R)
    or else matched to BLAST's parameter count in steps of lcm(b, 16); low-rank matched likewise in steps of 16."""
    monarch = monarch or {}
    return {
        "blast": tuple((p, b, r) for p, b, r, _, _ in blast),
        "monarch": tuple(
            (p, b, monarch.get(p) or _matched_rank(b, o, i, r, math.lcm(b, 16))) for p, b, r, o, i in blast
        ),
        "lowrank": tuple((p, None, _matched_rank(b, o, i, r, 16)) for p, b, r, o, i in blast),
    }


_LLAMA_ATTN = ("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj")
_LLAMA_MLP = ("*.gate_proj", "*.up_proj", "*.down_proj")
_VIT_QKV = tuple(
    f"*.attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "attention.query", "attention.key", "attention.value")
)

BUILTIN: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            "llama-7b",
            "llama",
            _hf(
                "LlamaConfig",
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            ),  # fmt: skip
            paper=_paper(
                tuple((p, 16, 1024, 4096, 4096) for p in _LLAMA_ATTN)
                + tuple((p, 16, 1488, 11008, 4096) for p in _LLAMA_MLP),
                monarch={**{p: 1024 for p in _LLAMA_ATTN}, **{p: 1536 for p in _LLAMA_MLP}},
            ),
        ),
        BuiltinModel(
            "llama-3.2-1b",
            "llama",
            _hf(
                "LlamaConfig",
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                vocab_size=128256,
                max_position_embeddings=131072,
                rope_theta=500000.0,
                tie_word_embeddings=True,
            ),  # fmt: skip
            # The reference paper's per-layer table for this model is not available here: these keep the
            # Llama-7B preset's parameter ratios (0.52 attention, 0.51 MLP) at b=16.
            paper=_paper(
                (
                    ("*.q_proj", 16, 512, 2048, 2048),
                    ("*.o_proj", 16, 512, 2048, 2048),
                    ("*.k_proj", 16, 192, 512, 2048),
                    ("*.v_proj", 16, 192, 512, 2048),
                    ("*.gate_proj", 16, 816, 8192, 2048),
                    ("*.up_proj", 16, 816, 8192, 2048),
                    ("*.down_proj", 16, 816, 2048, 8192),
                )
            ),  # fmt: skip
            note="per-layer settings derived from the Llama-7B preset's ratios",
        ),
        BuiltinModel(
            "gpt2-s",
            "gpt2",
            _hf("GPT2Config", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
            paper=_paper(
                (
                    ("*.attn.c_attn", 6, 192, 2304, 768),
                    ("*.mlp.c_fc", 6, 192, 3072, 768),
                    ("*.mlp.c_proj", 6, 192, 768, 3072),
                )
            ),
        ),
        BuiltinModel(
            "vit-b-16",
            "vit",
            _hf(
                "ViTConfig",
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                image_size=224,
                patch_size=16,
                num_labels=1000,
            ),  # fmt: skip
            paper=_paper(
                tuple((p, 3, 128, 768, 768) for p in _VIT_QKV)
                + tuple((p, 3, 128, 3072, 768) for p in ("*.mlp.fc1", "*.intermediate.dense"))
                + tuple((p, 3, 128, 768, 3072) for p in ("*.mlp.fc2", "*.output.dense"))
            ),
        ),
        BuiltinModel(
            "dit-xl-2",
            "dit",
            _dit(
                num_attention_heads=16,
                attention_head_dim=72,
                in_channels=4,
                out_channels=8,
                num_layers=28,
                sample_size=32,
                patch_size=2,
                num_embeds_ada_norm=1000,
            ),  # fmt: skip
            # b=9, r=256 for attention and r=384 for the MLP and adaLN projections.
            paper=_paper(
                tuple((p, 9, 256, 1152, 1152) for p in ("*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v"))
                + (("*.ff.net.0.proj", 9, 384, 4608, 1152), ("*.norm1.linear", 9, 384, 6912, 1152))
            ),
        ),
        BuiltinModel(
            "gpt2-mini",
            "gpt2",
            _hf(
                "GPT2Config",
                n_embd=384,
                n_layer=4,
                n_head=6,
                vocab_size=1024,
                n_positions=256,
                bos_token_id=0,
                eos_token_id=0,
            ),
            note="the quick-start default: GPT-2's architecture at a size a CPU converts to BLAST in about 2 minutes",
        ),
        # Tiny variants: the same architectures at test size (every dim divisible by 2, 4 and 8).
        BuiltinModel(
            "llama-tiny",
            "llama",
            _hf(
                "LlamaConfig",
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=128,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),  # fmt: skip
        ),
        BuiltinModel(
            "gpt2-tiny",
            "gpt2",
            _hf(
                "GPT2Config",
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=128,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        BuiltinModel(
            "vit-tiny",
            "vit",
            _hf(
                "ViTConfig",
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                image_size=32,
                patch_size=8,
                num_labels=10,
            ),  # fmt: skip
        ),
        BuiltinModel(
            "dit-tiny",
            "dit",
            _dit(
                num_attention_heads=2,
                attention_head_dim=32,
                in_channels=4,
                out_channels=8,
                num_layers=2,
                sample_size=8,
                patch_size=2,
                num_embeds_ada_norm=10,
                norm_num_groups=2,
            ),  # fmt: skip
        ),
    ]
}


def builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN)}")
    return BUILTIN[name]
