"""Where dense models come from: built-in models (configs + seeded weights) and Hugging Face checkpoint
directories (transformers Auto classes; diffusers for DiT). Also rebuilds a model skeleton on the meta device
from a saved config, which is how converted checkpoints load without dense weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blrdeploy.models.families import (
    BUILTIN,
    FAMILIES,
    BuiltinModel,
    Family,
    builtin,
    family_of_model_type,
    install_hint,
)

# The class each family's built-ins are instantiated as.
BUILTIN_CLASS = {
    "llama": ("transformers", "LlamaForCausalLM"),
    "gpt2": ("transformers", "GPT2LMHeadModel"),
    "vit": ("transformers", "ViTForImageClassification"),
    "dit": ("diffusers", "DiTTransformer2DModel"),
}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' naming of next-token heads


def is_causal_lm(class_name: str) -> bool:
    """Whether a transformers class (by name) predicts the next token: eval scores its perplexity, heal distills
    its logits."""
    return class_name.endswith(CAUSAL_SUFFIXES)


@dataclass
class Source:
    model: nn.Module
    family: Family | None  # None: an architecture without built-in defaults (convert with --include)
    id: str  # built-in name or checkpoint path
    library: str
    class_name: str
    builtin: BuiltinModel | None = None


def _import_library(library: str):
    try:
        if library == "transformers":
            import transformers  # deferred: optional, and seconds to import

            return transformers
        import diffusers  # deferred: optional, and seconds to import

        return diffusers
    except ImportError as exc:
        raise ValueError(install_hint(library, "this model")) from exc


def model_class(library: str, class_name: str):
    lib = _import_library(library)
    cls = getattr(lib, class_name, None)
    if cls is None:
        raise ValueError(f"{library} {lib.__version__} has no model class {class_name!r}")
    return cls


def config_dict(model: nn.Module) -> dict:
    """The model's config as written to config.json."""
    config = model.config
    if hasattr(config, "to_dict"):
        data = config.to_dict()
        data.setdefault("architectures", [type(model).__name__])
        return data
    return {"_class_name": type(model).__name__, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}


def instantiate(library: str, class_name: str, config: dict, device="cpu", dtype: torch.dtype | None = None):
    """A model from its config dict with freshly initialized (or, on device='meta', no) weights."""
    cls = model_class(library, class_name)
    old_dtype = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if library == "transformers":
                cfg_cls = cls.config_class
                cfg = cfg_cls.from_dict({k: v for k, v in config.items() if k != "architectures"})
                model = cls(cfg)
            else:
                model = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    finally:
        torch.set_default_dtype(old_dtype)
    return model.eval()


def family_of(model: nn.Module) -> Family | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    try:
        return family_of_model_type(model_type)
    except ValueError:
        return None


def builtin_config(name: str) -> tuple[str, str, dict]:
    """(library, class name, config dict) a built-in model is instantiated from."""
    spec = builtin(name)
    library, class_name = BUILTIN_CLASS[spec.family]
    config = spec.make_config()
    config = config if isinstance(config, dict) else {**config.to_dict(), "architectures": [class_name]}
    return library, class_name, config


def build_builtin(name: str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> Source:
    spec = builtin(name)
    library, class_name, config = builtin_config(name)
    torch.manual_seed(seed)
    model = instantiate(library, class_name, config, device=device, dtype=dtype)
    return Source(model, FAMILIES[spec.family], name, library, class_name, spec)


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc


def identify(config: dict, allow_unknown: bool) -> tuple[str, str, Family | None]:
    """(library, class name, family) of a checkpoint from its config.json."""
    if "_class_name" in config:
        library, class_name = "diffusers", config["_class_name"]
        model_type = class_name
    else:
        library = "transformers"
        model_type = config.get("model_type")
        if not model_type:
            raise ValueError("config.json has neither model_type (transformers) nor _class_name (diffusers)")
        class_name = (config.get("architectures") or [None])[0] or "AutoModel"
    try:
        family = family_of_model_type(model_type)
    except ValueError:
        if not allow_unknown:
            raise
        family = None
    return library, class_name, family


def weight_files(path: Path) -> list[Path]:
    """A checkpoint directory's weight files (*.safetensors, *.bin; shards included), sorted by name."""
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def load_pretrained_dir(path: Path, device="cpu", dtype: torch.dtype | None = None, allow_unknown=False) -> Source:
    if not path.is_dir():
        raise ValueError(f"no such checkpoint directory: {path}")
    if (path / "blr_config.json").exists():
        raise ValueError(f"{path} is already a converted checkpoint: open it with blrdeploy.load, not convert")
    config = read_config(path)
    library, class_name, family = identify(config, allow_unknown)
    if not weight_files(path):
        raise ValueError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    cls = model_class(library, class_name)
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    if library == "transformers":
        kwargs["local_files_only"] = True
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except Exception as exc:  # corrupt/truncated weights raise many types; the message says what was wrong
        raise ValueError(f"cannot load the checkpoint in {path}: {type(exc).__name__}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # from_pretrained fills these with random values and only warns: converting them is meaningless
        raise ValueError(
            f"the weights in {path} lack {len(missing)} tensor(s) of {class_name}, e.g. {', '.join(missing[:3])}"
        )
    return Source(model.to(device).eval(), family, str(path), library, class_name)


def open_source(model: str, device="cpu", dtype: torch.dtype | None = None, seed=0, allow_unknown=False) -> Source:
    """A built-in model name or a checkpoint directory."""
    if model in BUILTIN:
        return build_builtin(model, device, dtype, seed)
    path = Path(model)
    if path.exists():
        return load_pretrained_dir(path, device, dtype, allow_unknown)
    raise ValueError(f"{model!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing directory")
