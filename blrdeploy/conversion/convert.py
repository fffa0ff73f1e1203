"""Swap a model's dense linears for BLR layers factorized from their weights, in place, layer by layer.

``convert(model, ConvertConfig(...), filter_fn=None)`` is the API; ``plan`` says what it would do without
touching a weight (it works on the meta device). Given calibration inputs (``calibration=`` token ids, or Grams
from ``conversion.calibration``), each layer is fitted to its outputs on them instead of its weights.
"""

from __future__ import annotations

import fnmatch
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from blrdeploy.conversion import sequential
from blrdeploy.conversion.allocate import ALLOCATIONS, allocate, resolve_allocation
from blrdeploy.conversion.calibration import Grams, batched, collect_grams
from blrdeploy.conversion.sensitivity import output_sensitivity, sensitivity_batches
from blrdeploy.models.families import BUILTIN, BuiltinModel, Family, LayerSetting
from blrdeploy.models.sources import family_of
from blrdeploy.structures import factorize as fz
from blrdeploy.structures import shapes
from blrdeploy.structures.budget import STRUCTURES, choose_blocks_and_rank, structure_params
from blrdeploy.structures.modules import BlastLinear, LowRankLinear, MonarchLinear, set_submodule

CONFIG_VERSION = 1
LayerProgress = Callable[[str, int, int], None]  # (layer name, layer index, layer count), before each layer


@dataclass
class ConvertConfig:
    """What to convert and how much. ``layers`` (pattern, b, r) entries win over ``preset``, which wins over
    ``params_ratio``. ``include=None`` takes the model family's default layers. ``allocation`` spreads
    ``params_ratio`` (``conversion.allocate``): ``uniform`` each layer at the ratio, ``sensitivity`` one budget for
    them all by measured sensitivity, ``auto`` the latter when calibration inputs are given."""

    structure: str = "blast"
    params_ratio: float | None = 0.5
    preset: str | None = None  # "paper": the reference paper's per-layer (b, r) for the built-in models
    layers: tuple[LayerSetting, ...] = ()
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    steps: int = 300
    seed: int = 0
    compute_dtype: str = "float32"  # of the fit; float64 costs 2-4x the time on a CPU for no visible gain here
    skip_incompatible: bool = False
    allocation: str = "auto"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; choose one of {', '.join(STRUCTURES)}")
        if self.params_ratio is not None and not 0 < self.params_ratio < 1:
            raise ValueError(f"params ratio must be in (0, 1), got {self.params_ratio}")
        if self.preset not in (None, "paper"):
            raise ValueError(f"unknown preset {self.preset!r}; the one preset is 'paper'")
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be float32 or float64, got {self.compute_dtype!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "sensitivity" and self.params_ratio is None:
            raise ValueError("--allocation sensitivity spreads --params-ratio, and none was given")
        self.layers = tuple(tuple(entry) for entry in self.layers)
        self.include = None if self.include is None else tuple(self.include)
        self.exclude = tuple(self.exclude)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConvertConfig:
        """Reads what to_dict wrote (e.g. blr_config.json's "conversion"); refuses other versions."""
        if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise ValueError(
                f"conversion config version {data.get('version')!r}; this blrdeploy reads {CONFIG_VERSION}"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown conversion config fields: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class LayerPlan:
    name: str
    kind: str  # "linear" or "conv1d" (GPT-2's Conv1D stores its weight transposed)
    in_features: int
    out_features: int
    bias: bool
    structure: str
    num_blocks: int | None
    rank: int
    params: int
    relative_error: float | None = None
    seconds: float | None = None
    output_relative_error: float | None = None  # on the calibration inputs, when calibrated
    estimated_output_error: float | None = None  # the sensitivity allocation's estimate, from its spectrum

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict:
        return {**asdict(self), "dense_params": self.dense_params, "ratio": self.params / self.dense_params}


@dataclass
class Plan:
    layers: list[LayerPlan]
    skipped: list[dict] = field(default_factory=list)  # {"name", "reason"}
    by_ratio: list[str] = field(default_factory=list)  # the layers params_ratio set (no preset or layers entry)
    allocation: dict | None = None  # conversion.allocate's record, once allocated
    shared_inputs: list[list[str]] = field(default_factory=list)  # a sequential conversion's groups of one input


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear whose weight is stored transposed)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[str, int, int]:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return "conv1d", in_features, out_features


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Storage of parameters reachable under more than one name (tied embeddings/heads): never converted."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def paper_settings(builtin_model: BuiltinModel | None, structure: str) -> tuple[LayerSetting, ...]:
    if builtin_model is None or structure not in builtin_model.paper:
        with_paper = [m.name for m in BUILTIN.values() if m.paper]
        raise ValueError(
            f"--preset paper has settings for {', '.join(with_paper)}; this model is not one of them. "
            "Use --params-ratio or a per-pattern layers file instead."
        )
    return builtin_model.paper[structure]


def plan(
    model: nn.Module,
    config: ConvertConfig,
    family: Family | None = None,
    builtin_model: BuiltinModel | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> Plan:
    include = config.include if config.include is not None else (family.include if family else None)
    if not include:
        raise ValueError("this architecture has no default layer list: name the layers with --include PATTERN")
    exclude = config.exclude + (family.exclude if family and config.include is None else ())
    preset = paper_settings(builtin_model, config.structure) if config.preset == "paper" else ()
    tied = _tied_weight_ids(model)
    result = Plan([])
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if not _matches(name, include) or _matches(name, exclude):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        if id(module.weight) in tied:
            result.skipped.append({"name": name, "reason": "weight is tied to another parameter"})
            continue
        kind, in_features, out_features = linear_dims(module)
        setting = next((s for s in config.layers + preset if fnmatch.fnmatchcase(name, s[0])), None)
        try:
            if setting is None:
                if config.params_ratio is None:
                    raise ValueError(f"layer {name}: no setting matches it and no --params-ratio was given")
                choice = choose_blocks_and_rank(out_features, in_features, config.params_ratio, config.structure)
                b, r = choice.num_blocks, choice.rank
                result.by_ratio.append(name)
            else:
                b, r = setting[1], setting[2]
                _check_setting(config.structure, in_features, out_features, b, r)
        except ValueError as exc:
            if not config.skip_incompatible:
                raise ValueError(f"layer {name} ({out_features}x{in_features}): {exc}") from None
            result.skipped.append({"name": name, "reason": str(exc)})
            continue
        params = structure_params(config.structure, out_features, in_features, b, r)
        bias = module.bias is not None
        result.layers.append(LayerPlan(name, kind, in_features, out_features, bias, config.structure, b, r, params))
    if not result.layers:
        raise ValueError(f"no layer matches the include patterns ({', '.join(include)})")
    return result


def _check_setting(structure: str, in_features: int, out_features: int, b, r) -> None:
    """The module constructors' shape checks, on the meta device."""
    if structure == "blast":
        BlastLinear(in_features, out_features, b, r, bias=False, device="meta")
    elif structure == "monarch":
        MonarchLinear(in_features, out_features, b, r, bias=False, device="meta")
    else:
        LowRankLinear(in_features, out_features, r, bias=False, device="meta")


def build_layer(
    entry: LayerPlan,
    weight: torch.Tensor,
    bias,
    config: ConvertConfig,
    fit_progress=None,
    gram: torch.Tensor | None = None,
    damping: float = fz.DEFAULT_DAMPING,
):
    """The BLR layer fitted to ``weight`` (out, in); with ``gram`` (the layer's input XᵀX, (in, in)), fitted to
    its outputs on those inputs instead (damped by ``damping`` times the Gram's mean diagonal)."""
    compute = getattr(torch, config.compute_dtype)
    if entry.structure == "blast":
        calibrated = {} if gram is None else {"gram": gram, "damping": damping}
        return BlastLinear.from_dense(
            weight, entry.num_blocks, entry.rank, bias=bias, steps=config.steps, seed=config.seed,
            progress=fit_progress, compute_dtype=compute, **calibrated,
        )  # fmt: skip
    if gram is None:
        if entry.structure == "monarch":
            return MonarchLinear.from_dense(weight, entry.num_blocks, entry.rank, bias=bias, compute_dtype=compute)
        return LowRankLinear.from_dense(weight, entry.rank, bias=bias, compute_dtype=compute)
    out, inn = weight.shape
    bias = None if bias is None else bias.detach().to(weight.device)
    if entry.structure == "monarch":
        layer = MonarchLinear(inn, out, entry.num_blocks, entry.rank, bias=bias is not None, device="meta")
        w1, w2, result = fz.monarch_whitened(weight, entry.num_blocks, entry.rank, gram, damping=damping,
                                             compute_dtype=compute)  # fmt: skip
        factors = {"w1": w1, "w2": w2}
    else:
        layer = LowRankLinear(inn, out, entry.rank, bias=bias is not None, device="meta")
        U, V, result = fz.lowrank_whitened(weight, entry.rank, gram, damping=damping, compute_dtype=compute)
        factors = {"U": U, "V": V}
    # from_dense's own last step (modules.py's from_dense takes no Gram for these two)
    return layer._adopt(factors, bias, weight.dtype, result)


def check_finite_tensors(model: nn.Module) -> None:
    """A ValueError naming the first floating-point parameter or buffer, in module order, that holds NaN/Inf. Run
    on the whole model before any fit: checked per layer, a NaN in the last layer cost the fits of all before it,
    and one outside the converted layers (an embedding, a norm) went into the checkpoint unreported."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        owned = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for attr, tensor in owned:
            if tensor is None or id(tensor) in seen or not tensor.is_floating_point():
                continue
            seen.add(id(tensor))  # a tied weight is checked (and named) once
            shapes.check_finite(tensor.detach(), f"layer {module_name} {attr}" if module_name else attr)


def convert_layers(
    model: nn.Module,
    the_plan: Plan,
    config: ConvertConfig,
    device: str | torch.device | None = None,
    layer_progress: LayerProgress | None = None,
    fit_progress=None,
    grams: Grams | None = None,
    damping: float = fz.DEFAULT_DAMPING,
) -> Plan:
    """Replaces each planned layer in place; fills in relative_error and seconds (and, with ``grams``, the
    calibration output_relative_error of each layer fitted to its inputs' Gram). The dense weight of a layer is
    dropped as soon as its replacement is in, so peak memory stays near one copy of the model; so is a Gram once
    the last layer reading it is done."""
    check_finite_tensors(model)
    if grams is not None:
        missing = [e.name for e in the_plan.layers if e.name not in grams]
        if missing:
            raise ValueError(f"no calibration Gram for layer {missing[0]}")
    for index, entry in enumerate(the_plan.layers):
        if layer_progress is not None:
            layer_progress(entry.name, index, len(the_plan.layers))
        gram = None if grams is None else grams[entry.name]
        convert_one(model, entry, config, device, fit_progress, gram=gram, damping=damping)
        del gram
        if grams is not None:
            grams.release(entry.name)
    return the_plan


def convert_one(
    model: nn.Module,
    entry: LayerPlan,
    config: ConvertConfig,
    device: str | torch.device | None = None,
    fit_progress=None,
    *,
    gram: torch.Tensor | None = None,
    damping: float = fz.DEFAULT_DAMPING,
    target: torch.Tensor | None = None,
) -> nn.Module:
    """Fits one planned layer and swaps it in (on the layer's own device and dtype); fills in the entry's
    relative_error (always against the dense weight), output_relative_error and seconds. ``target``: the matrix
    to fit instead of the dense weight (``conversion.sequential``'s compensated weight)."""
    dense = model.get_submodule(entry.name)
    home_device, home_dtype = dense.weight.device, dense.weight.dtype
    weight = dense.weight.detach()
    weight = weight.T if entry.kind == "conv1d" else weight
    compute = torch.device(device) if device is not None else home_device
    t0 = time.perf_counter()
    fitted = weight if target is None else target
    gram = None if gram is None else gram.to(compute)
    layer = build_layer(entry, fitted.to(compute), dense.bias, config, fit_progress, gram, damping)
    layer = layer.to(device=home_device, dtype=home_dtype)
    entry.seconds = time.perf_counter() - t0
    entry.relative_error = layer.fit_result.relative_error
    if target is not None:
        w = weight.double()
        entry.relative_error = float(torch.linalg.norm(layer.to_dense().detach().double() - w) / torch.linalg.norm(w))
    entry.output_relative_error = layer.fit_result.output_relative_error
    set_submodule(model, entry.name, layer)
    return layer


def convert_layers_sequential(
    model: nn.Module,
    the_plan: Plan,
    config: ConvertConfig,
    batches: list,
    device: str | torch.device | None = None,
    layer_progress: LayerProgress | None = None,
    fit_progress=None,
    damping: float = fz.DEFAULT_DAMPING,
) -> Plan:
    """``convert_layers`` block by block on calibration ``batches`` (``conversion.sequential``): each layer fitted
    on the inputs the already converted layers before it give, to the dense model's outputs. Each entry's
    output_relative_error is then against the dense model's output at that layer, drift included."""
    check_finite_tensors(model)
    entries = {e.name: e for e in the_plan.layers}
    done: list[str] = []

    def fit(name: str, target: torch.Tensor, gram: torch.Tensor) -> nn.Module:
        if layer_progress is not None:
            layer_progress(name, len(done), len(entries))
        done.append(name)
        return convert_one(model, entries[name], config, device, fit_progress, gram=gram, damping=damping,
                           target=target)  # fmt: skip

    def dense_weight(module: nn.Module) -> torch.Tensor:
        return module.weight.detach().T if _is_conv1d(module) else module.weight.detach()

    errors, groups = sequential.convert_sequential(
        model, list(entries), batches, fit, damping=damping, dense_weight=dense_weight
    )
    for name, error in errors.items():
        entries[name].output_relative_error = error
    the_plan.shared_inputs = groups
    return the_plan


def convert(
    model: nn.Module,
    config: ConvertConfig | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    *,
    device: str | torch.device | None = None,
    builtin_model: BuiltinModel | None = None,
    calibration: torch.Tensor | Grams | None = None,
    damping: float = fz.DEFAULT_DAMPING,
    sequential: bool = False,
) -> Plan:
    """Convert ``model`` in place (torchao's ``quantize_`` shape); returns what was done, per layer.

    ``calibration``: token ids (windows, seq_len) the dense model is run on first (or Grams collected already,
    :func:`conversion.calibration.collect_grams`): each layer is then fitted to its outputs on those inputs, and
    ``config.allocation="sensitivity"`` spreads the ratio by sensitivity (the plan's ``allocation`` records how).
    ``sequential``: fit block by block on the inputs the converted layers give (``conversion.sequential``; needs
    ``calibration`` as token ids)."""
    config = config or ConvertConfig()
    family = family_of(model)
    the_plan = plan(model, config, family, builtin_model, filter_fn)
    if sequential and not isinstance(calibration, torch.Tensor):
        raise ValueError("sequential conversion runs the model block by block: give calibration token ids")
    grams = calibration
    tokens = isinstance(calibration, torch.Tensor)
    weighted = resolve_allocation(config.allocation, tokens, bool(the_plan.by_ratio)) == "sensitivity"
    if tokens and (weighted or not sequential):
        grams = collect_grams(model, [e.name for e in the_plan.layers], batched(calibration))
    elif sequential:
        grams = None  # the sequential pass collects its own statistics
    sensitivities = None
    if tokens and weighted:
        names = [e.name for e in the_plan.layers]
        sensitivities = output_sensitivity(model, names, sensitivity_batches(calibration))
    allocate(model, the_plan, config, family, grams, damping=damping, device=device, sensitivities=sensitivities)
    if sequential:
        del grams
        return convert_layers_sequential(model, the_plan, config, batched(calibration), device, damping=damping)
    return convert_layers(model, the_plan, config, device, grams=grams, damping=damping)
