"""The converted-checkpoint directory: config.json, blr_config.json, model.safetensors.

Written atomically (a sibling temp directory renamed into place, blr_config.json last); loaded by building the
model on the meta device, swapping in BLR modules and assigning the stored tensors, so no dense weight of a
converted layer is ever materialized.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from blrdeploy.conversion.fusion import fuse_family
from blrdeploy.conversion.siblings import Siblings
from blrdeploy.files import atomic_directory, file_sha256
from blrdeploy.models.sources import config_dict, family_of, instantiate, read_config
from blrdeploy.structures.modules import BlastLinear, BLRLinear, LowRankLinear, MonarchLinear, set_submodule
from blrdeploy.version import __version__

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
BLR_CONFIG = "blr_config.json"
CHECKPOINT = "a converted checkpoint"  # what --overwrite may replace, as its refusals name it
MODULES = {"blast": BlastLinear, "monarch": MonarchLinear, "lowrank": LowRankLinear}
# A source checkpoint's text side, carried along so a converted LLM still turns text into text (blrdeploy run).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json",
)  # fmt: skip


def copy_tokenizer(src: Path | None, dst: Path) -> list[str]:
    """Copies the tokenizer files ``src`` has into ``dst``; returns their names."""
    if src is None or not Path(src).is_dir():
        return []
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return copied


class CheckpointError(ValueError):
    """A converted checkpoint that is missing, incomplete, corrupt or from an unknown format version."""


def tool_versions(*more: str) -> dict:
    """Versions of blrdeploy, torch and the model libraries that are installed, plus the packages ``more`` names."""
    versions = {"blrdeploy": __version__, "torch": torch.__version__}
    for name in ("transformers", "diffusers", "safetensors", *more):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


def blr_layers(model: nn.Module) -> list[dict]:
    """One entry per BLR layer; the members of a stacked sibling group each get their own (as before fusing)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, BLRLinear):
            fit = module.fit_result
            members = [(name, module.structure, module.num_params(), None if fit is None else fit.relative_error)]
        elif isinstance(module, Siblings):
            params = sum(t[0].numel() for t in module.factors().values())
            members = [
                (path, module.structure, params, module.fit_errors[i]) for path, i in _sibling_members(name, module)
            ]
        else:
            continue
        for layer_name, structure, params, error in members:
            layers.append(
                {
                    "name": layer_name,
                    "structure": structure,
                    "in_features": module.in_features,
                    "out_features": module.out_features,
                    "num_blocks": getattr(module, "num_blocks", None),
                    "rank": module.rank,
                    "bias": module.bias is not None,
                    "params": params,
                    "relative_error": error,
                }
            )
    return layers


def _same_layers(own: list[dict], given: list[dict] | None) -> list[dict]:
    """``given`` where it names the model's BLR layers with their shapes, else ``own``; a mismatch is a defect."""
    if given is None:
        return own
    shape = ("name", "structure", "in_features", "out_features", "num_blocks", "rank", "bias", "params")
    own = json.loads(json.dumps(own))  # as read back: tuples (BLAST's (b_out, b_in)) become lists
    if sorted([e[k] for k in shape] for e in own) != sorted([e.get(k) for k in shape] for e in given):
        raise ValueError("save(layers=...) does not describe the model's BLR layers")
    return given


def _sibling_members(group_name: str, group) -> list[tuple[str, int]]:
    """(the member's module path, its index in the stack) for a Siblings group registered at ``group_name``."""
    parent = group_name.rpartition(".")[0]
    return [(f"{parent}.{name}" if parent else name, i) for i, name in enumerate(group.names)]


def _unstacked(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Stacked sibling factors written under their members' names, as an unfused model stores them."""
    for group_name, group in model.named_modules():
        if not isinstance(group, Siblings):
            continue
        for key in (*group.factor_names, "bias"):
            tensors.pop(f"{group_name}.{key}", None)
        for path, i in _sibling_members(group_name, group):
            for key, stacked in group.factors().items():
                tensors[f"{path}.{key}"] = stacked[i].detach().clone()
            if group.bias is not None:
                out = group.out_features
                tensors[f"{path}.bias"] = group.bias[i * out : (i + 1) * out].detach().clone()


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors, tied aliases -> kept name, non-persistent buffer names). Shared storage is written once."""
    state = model.state_dict(keep_vars=False)
    tensors, aliases, by_param = {}, {}, {}
    named = dict(model.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        param = named.get(key)
        if param is not None and id(param) in by_param:
            aliases[key] = by_param[id(param)]
            continue
        if param is not None:
            by_param[id(param)] = key
        tensors[key] = value.detach().contiguous()
    _unstacked(model, tensors)
    buffers = []
    for key, buf in model.named_buffers():
        if key not in state and buf is not None:  # non-persistent (e.g. rotary inv_freq): meta after a skeleton build
            tensors[key] = buf.detach().contiguous()
            buffers.append(key)
    return tensors, aliases, buffers


def checkpoint_files(path: Path) -> set[str]:
    """The files a converted checkpoint at ``path`` may hold, by its own blr_config.json; a CheckpointError when
    ``path`` is not a converted checkpoint."""
    cfg = read_format_file(path / BLR_CONFIG, "a converted checkpoint", FORMAT_VERSION, ("weights",), CheckpointError)
    return {"config.json", BLR_CONFIG, cfg["weights"]["file"], *TOKENIZER_FILES}


def save(
    model: nn.Module,
    path: str | Path,
    *,
    source: dict | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
    tokenizer_from: Path | None = None,
    layers: list[dict] | None = None,
) -> Path:
    """Write a converted model. ``source`` describes where it came from (id, family, library, class);
    by default it is read off the model. ``extra`` adds fields to blr_config.json (e.g. the conversion config).
    ``tokenizer_from``: a source checkpoint directory whose tokenizer files are copied along. ``layers``: the
    layer entries to record instead of the model's own (heal keeps the conversion's, fit errors included, for
    a model whose modules no longer carry them); they must describe the same modules."""

    path = Path(path)
    library = "diffusers" if type(model).__module__.startswith("diffusers") else "transformers"
    family = family_of(model)
    source = {
        "id": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "family": family.name if family else None,
        "library": library,
        "class": type(model).__name__,
        **(source or {}),
    }
    tensors, aliases, buffers = _tensors_to_save(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    with atomic_directory(path, overwrite, checkpoint_files, CHECKPOINT) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_dict(model), indent=2, default=str))
        copy_tokenizer(tokenizer_from, tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "blrdeploy_format": str(FORMAT_VERSION)})
        weights = tmp / WEIGHTS
        blr_config = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "dtypes": dtypes,
            "layers": _same_layers(blr_layers(model), layers),
            "tied": aliases,
            "non_persistent_buffers": buffers,
            "weights": {"file": WEIGHTS, "bytes": weights.stat().st_size, "sha256": file_sha256(weights)},
            "tool_versions": tool_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        # Written last: a directory without it was never finished and load refuses it.
        (tmp / BLR_CONFIG).write_text(json.dumps(blr_config, indent=2))
    return path


def read_format_file(
    path: Path, what: str, version: int, required: tuple[str, ...], error: type, corrupt: type | None = None
) -> dict:
    """A JSON file of ours: present (else ``error`` saying the folder is not ``what``), parseable (else
    ``corrupt``, default ``error``), of format ``version`` and with the ``required`` fields."""
    if not path.is_file():
        raise error(f"{path.parent} has no {path.name}: not {what}, or its write never finished")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise (corrupt or error)(f"{path} is corrupt: {exc}") from None
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != version:
        raise error(f"{path} has format version {found!r}; this blrdeploy reads {version}")
    missing = [key for key in required if key not in data]
    if missing:
        raise error(f"{path} lacks the {missing[0]!r} field")
    return data


def read_blr_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {path}")
    cfg = read_format_file(
        path / BLR_CONFIG, "a converted checkpoint", FORMAT_VERSION, ("source", "layers", "weights"), CheckpointError
    )
    weights = path / cfg["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(f"{path} is incomplete: {weights.name} is missing")
    size = weights.stat().st_size
    if size != cfg["weights"]["bytes"]:
        raise CheckpointError(f"{weights} is {size} bytes, {BLR_CONFIG} says {cfg['weights']['bytes']}: truncated?")
    return cfg


def verify(path: str | Path) -> None:
    """Full check of the weights against the recorded sha256 (load checks only the size)."""
    path = Path(path)
    cfg = read_blr_config(path)
    if file_sha256(path / cfg["weights"]["file"]) != cfg["weights"]["sha256"]:
        raise CheckpointError(f"{path / cfg['weights']['file']} does not match its recorded sha256")


def describe(path: str | Path, check_sha256: bool = False) -> dict:
    """What ``blrdeploy info`` shows: layers (each with its parameter ratio), parameters before/after, size, worst
    layer error, agreement, and how the ratio was allocated (None for checkpoints written before it was recorded).

    With ``check_sha256`` the weights file is also checked against its recorded digest (a CheckpointError if not).
    """
    cfg = read_blr_config(path)
    if check_sha256:
        verify(path)
    layers = [{**e, "ratio": e["params"] / max(1, e["in_features"] * e["out_features"])} for e in cfg["layers"]]
    errors = [e["relative_error"] for e in layers if e["relative_error"] is not None]
    summary = cfg.get("summary", {})
    return {
        "path": str(path),
        "source": cfg["source"],
        "format_version": cfg["format_version"],
        "layers": layers,
        "converted_layer_params_before": sum(e["in_features"] * e["out_features"] for e in layers),
        "converted_layer_params_after": sum(e["params"] for e in layers),
        "model_params_before": summary.get("params_before"),
        "model_params_after": summary.get("params_after"),
        "weights_bytes": cfg["weights"]["bytes"],
        "worst_relative_error": max(errors) if errors else None,
        "output_agreement": summary.get("output_agreement"),
        "allocation": cfg.get("allocation"),
        "healing": _healing_brief(cfg.get("healing")),
        "verified": check_sha256,
        "tool_versions": cfg.get("tool_versions"),
    }


def _healing_brief(record: dict | None) -> dict | None:
    """What ``info`` says of a healed checkpoint: steps, tokens, the loss and the agreement before and after."""
    if not record:
        return None
    agree = record.get("output_agreement") or {}
    return {
        "steps": (record.get("options") or {}).get("steps"),
        "tokens_seen": record.get("tokens_seen"),
        "trained": record.get("trained"),
        "loss": {k: (record.get("loss") or {}).get(k) for k in ("first", "last")},
        "cosine_before": (agree.get("before") or {}).get("cosine_similarity"),
        "cosine_after": (agree.get("after") or {}).get("cosine_similarity"),
    }


def blr_module(layer: dict) -> nn.Module:
    """The (weightless, meta-device) BLR module a blr_config.json layer entry describes."""
    cls = MODULES.get(layer.get("structure"))
    if cls is None:
        raise CheckpointError(f"layer {layer.get('name')}: unknown structure {layer.get('structure')!r}")
    try:
        args = [layer["in_features"], layer["out_features"]]
        if cls is not LowRankLinear:
            args.append(layer["num_blocks"])
        return cls(*args, layer["rank"], bias=layer["bias"], device="meta")
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"layer {layer.get('name')} of {BLR_CONFIG} is unusable: {exc}") from exc


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    fuse_siblings: bool | None = None,
) -> nn.Module:
    """Rebuild a converted model: skeleton on the meta device, BLR modules swapped in, tensors assigned. Each
    stored tensor is cast to ``dtype`` before it is moved to ``device``, one at a time: the device never holds more
    than the final weights (no float32 copy of a bfloat16 model, no dense weight) plus, while sibling layers are
    stacked, one group's factors. ``fuse_siblings`` (default: on CUDA) stacks the BLAST and low-rank layers of the
    model family's sibling groups (q/k/v, gate/up; see :mod:`blrdeploy.conversion.siblings`) and fuses its
    pre-norm blocks (:mod:`blrdeploy.conversion.blocks`), as :func:`~blrdeploy.conversion.fusion.fuse_family`
    does: fewer kernel launches, the same outputs up to float rounding."""

    path = Path(path)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # else torch's bare AssertionError
        raise CheckpointError(
            f"device={str(device)!r} asked for, but no CUDA GPU is available: load with device='cpu' for the "
            "PyTorch reference path"
        )
    cfg = read_blr_config(path)
    src = cfg["source"]
    model = instantiate(src["library"], src["class"], read_config(path), device="meta")
    for layer in cfg["layers"]:
        module = blr_module(layer)
        try:
            set_submodule(model, layer["name"], module)
        except (AttributeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"layer {layer.get('name')} of {BLR_CONFIG} is unusable: {exc}") from exc
    try:
        tensors = {}
        with safe_open(str(path / cfg["weights"]["file"]), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[key] = t.to(device)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path / cfg['weights']['file']}: {exc}") from exc
    buffers = {k: tensors.pop(k) for k in cfg.get("non_persistent_buffers", []) if k in tensors}
    state_keys = set(model.state_dict().keys())
    missing = sorted(state_keys - set(tensors) - set(cfg.get("tied", {})))
    unexpected = sorted(set(tensors) - state_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {src['class']}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # shapes in model.safetensors disagree with blr_config.json / config.json
        raise CheckpointError(f"{path}: the stored tensors do not fit the model: {str(exc).splitlines()[-1]}") from exc
    tensors.clear()  # the model holds them now; a reference here would keep fused layers' old factors alive
    for alias, target in cfg.get("tied", {}).items():
        set_submodule(model, alias, model.get_parameter(target))
    for key, value in buffers.items():
        owner, _, attr = key.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[attr] = value
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path} left tensors unset: {leftover[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    if fuse_siblings or (fuse_siblings is None and torch.device(device).type == "cuda"):
        fuse_family(model, src.get("family"))
    return model.eval()
