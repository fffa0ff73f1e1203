"""The conversion job behind ``blrdeploy convert``: open a model, plan, convert layer by layer, compare outputs
with the dense model on seeded inputs, write the checkpoint, and summarize. Also the checkpoint's record of its
source and the way back from that record to the dense model (``validate --against dense``)."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blrdeploy.conversion.allocate import allocate, resolve_allocation
from blrdeploy.conversion.calibration import (
    DEFAULT_DAMPING,
    DEFAULT_TOKENS,
    CalibrationOptions,
    batched,
    calibration_record,
    calibration_windows,
    collect_grams,
)
from blrdeploy.conversion.checkpoint import CHECKPOINT, checkpoint_files, save
from blrdeploy.conversion.convert import ConvertConfig, Plan, convert_layers, convert_layers_sequential, plan
from blrdeploy.conversion.sensitivity import output_sensitivity, sensitivity_batches
from blrdeploy.files import check_output_dir, file_sha256
from blrdeploy.models.families import BUILTIN, Family, LayerSetting, token_inputs
from blrdeploy.models.outputs import agreement, disagreement, model_output
from blrdeploy.models.sources import (
    Source,
    build_builtin,
    identify,
    instantiate,
    load_pretrained_dir,
    open_source,
    read_config,
    weight_files,
)

DEFAULT_MODEL = "gpt2-mini"
# the rest only in blr_config.json
_CALIBRATION_SUMMARY = ("path", "tokens", "windows", "seq_len", "damping", "sequential")


@dataclass
class Callbacks:
    layer: object = None  # (name, index, count) before each layer
    fit: object = None  # (step, steps, rel_error) during a BLAST fit
    calibration: object = None  # (tokens done, tokens in all) while the dense model runs on calibration text


def unique_params(model: nn.Module) -> tuple[int, int]:
    """(count, bytes) of the model's parameters, tied ones counted once."""
    seen, count, size = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            count += p.numel()
            size += p.numel() * p.element_size()
    return count, size


def load_layer_settings(path: Path) -> tuple[LayerSetting, ...]:
    """A JSON or YAML mapping ``pattern: {num_blocks: b, rank: r}`` (num_blocks omitted for low-rank)."""
    if not path.is_file():
        raise ValueError(f"no such layers file: {path}")
    text = path.read_text()
    is_yaml = path.suffix in (".yaml", ".yml")
    if is_yaml:
        try:
            import yaml  # deferred: PyYAML is optional, needed only for a YAML layers file
        except ImportError as exc:
            raise ValueError("reading a YAML layers file needs PyYAML: pip install pyyaml") from exc
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except Exception as exc:  # JSONDecodeError, YAMLError
        raise ValueError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must map layer-name patterns to {{num_blocks, rank}}")
    settings = []
    for pattern, entry in data.items():
        if not isinstance(entry, dict) or "rank" not in entry:
            raise ValueError(f"{path}: entry {pattern!r} needs at least 'rank' (and 'num_blocks' for blast/monarch)")
        settings.append((str(pattern), entry.get("num_blocks"), entry["rank"]))
    return tuple(settings)


def _meta_source(model_arg: str, allow_unknown: bool) -> Source:
    """The model's skeleton on the meta device: enough to plan and count, with no weights."""
    if model_arg in BUILTIN:
        return build_builtin(model_arg, device="meta")
    path = Path(model_arg)
    if not path.exists():
        raise ValueError(f"{model_arg!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing directory")
    config = read_config(path)
    library, class_name, family = identify(config, allow_unknown)
    return Source(instantiate(library, class_name, config, device="meta"), family, str(path), library, class_name)


def weights_fingerprint(path: Path) -> dict[str, dict]:
    """``{file name: {"bytes", "sha256"}}`` of a source directory's weight files. Every byte is hashed, streamed
    (sha256 ran at 1.5 GB/s on a 2-core CPU: about 10 s for a 7B model's 14 GB, beside a conversion of many
    minutes); names and sizes alone would not tell a fine-tune from the model it was tuned from."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in weight_files(path)}


def source_record(source: Source) -> dict:
    """blr_config.json's "source": a built-in by name; a directory by absolute path plus ``weights``, the
    fingerprint of its weight files, so that ``validate --against dense`` reopens that very model from any
    current directory and refuses it once it changed or is gone."""
    record = {
        "id": source.id, "family": source.family.name if source.family else None, "library": source.library,
        "class": source.class_name,
    }  # fmt: skip
    if source.builtin is None:
        path = Path(source.id).resolve()
        record.update(id=str(path), weights=weights_fingerprint(path))
    return record


def _check_fingerprint(path: Path, recorded: dict) -> None:
    """A ValueError naming the first weight file of ``path`` that is not as ``recorded``: names and sizes first
    (free), then the sha256 of each file."""
    changed = f"the source model {path} changed since it was converted:"
    try:
        now = {f.name: f for f in weight_files(path)}
        for name in sorted(set(recorded) | set(now)):
            if name not in now:
                raise ValueError(f"{changed} {name} is gone")
            if name not in recorded:
                raise ValueError(f"{changed} {name} is new")
            if now[name].stat().st_size != recorded[name]["bytes"]:
                raise ValueError(f"{changed} {name} is {now[name].stat().st_size} bytes, was {recorded[name]['bytes']}")
        for name in sorted(recorded):
            if file_sha256(now[name]) != recorded[name]["sha256"]:
                raise ValueError(f"{changed} {name} does not match its recorded sha256")
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"the source fingerprint recorded for {path} is malformed ({type(exc).__name__}: {exc})"
        ) from None


def open_recorded_source(record: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Source, bool]:
    """The dense model a checkpoint's "source" ``record`` names, and whether it is known to be the one converted.
    A built-in is rebuilt from its name and ``seed``. A directory recorded with its ``weights`` fingerprint is
    opened at its absolute path, after its weight files are checked against the fingerprint (a ValueError if it is
    gone or changed). A checkpoint written before fingerprints were recorded holds the path as typed at convert
    time: it is opened as before, relative to the current directory, and reported unchecked (False)."""
    source_id = record.get("id")
    if source_id in BUILTIN:
        source = build_builtin(source_id, seed=seed)
        return Source(source.model.to(dtype), source.family, source.id, source.library, source.class_name), True
    fingerprint = record.get("weights")
    path = Path(source_id) if source_id else None
    if fingerprint is not None:
        if not path.is_dir():
            raise ValueError(f"the source model {source_id} this checkpoint was converted from is gone")
        _check_fingerprint(path, fingerprint)
    elif path is None or not path.is_dir():
        raise ValueError(f"the source model {source_id!r} is neither built in nor an existing directory")
    return load_pretrained_dir(path, dtype=dtype, allow_unknown=True), fingerprint is not None


def _plan_summary(source: Source, the_plan: Plan) -> dict:
    params, size = unique_params(source.model)
    saved = sum(e.dense_params - e.params for e in the_plan.layers)
    return {
        "model": source.id,
        "family": source.family.name if source.family else None,
        "params_before": params,
        "params_after": params - saved,
        "compression": params / max(1, params - saved),
        "layers": [e.to_dict() for e in the_plan.layers],
        "skipped": the_plan.skipped,
        "allocation": the_plan.allocation,
    }


def run_convert(
    model_arg: str,
    output: Path | None,
    config: ConvertConfig,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_unknown: bool = False,
    callbacks: Callbacks | None = None,
    calibration: CalibrationOptions | None = None,
) -> dict:
    """``calibration``: fit each layer to its outputs on that text (its input Gram, collected by running the dense
    model once; with ``calibration.sequential`` block by block on the converted model's own inputs,
    ``conversion.sequential``) instead of its weights; the checkpoint records the text's sha256, the tokens and each
    layer's calibration output error. Every check on the text and the tokenizer runs before any fit.
    ``config.allocation`` spreads the ratio (``conversion.allocate``; auto: by loss-weighted sensitivity when there is
    calibration text, which costs one backward pass over part of it, else uniform), recorded as "allocation"."""
    callbacks = callbacks or Callbacks()
    allow_unknown = allow_unknown or config.include is not None
    if dry_run:
        source = _meta_source(model_arg, allow_unknown)
        the_plan = plan(source.model, config, source.family, source.builtin)
        record = allocate(source.model, the_plan, config, source.family)
        if calibration is not None and config.allocation == "auto" and the_plan.by_ratio:
            # the loss-weighted ranks need the weights and the text: a dry run shows the uniform ranks in their place
            record.update(method="sensitivity", note="ranks are set at conversion from the calibration text; the "
                          "plan shows each layer at the ratio")  # fmt: skip
        return {"dry_run": True, **_plan_summary(source, the_plan)}

    if output is not None:
        check_output_dir(output, overwrite, checkpoint_files, CHECKPOINT)  # fail before hours of work, not after
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    windows = None
    if calibration is not None:  # every check on the text before the model loads
        model_dir = None if model_arg in BUILTIN else model_arg
        model_config = read_config(Path(model_arg)) if model_dir is not None else {}
        fed = identify(model_config, allow_unknown)[2] if model_dir is not None else None
        if fed is not None and not fed.tokens:
            raise ValueError(f"--calibration runs the model on text; {fed.name} models are not fed tokens")
        text, windows = calibration_windows(model_dir, model_config, calibration.path, calibration.seq_len,
                                            calibration.tokens)  # fmt: skip
    source = open_source(model_arg, device=device, dtype=dtype, seed=config.seed, allow_unknown=allow_unknown)
    record = source_record(source) if output is not None else None  # fingerprints the weights just loaded
    model = source.model
    the_plan = plan(model, config, source.family, source.builtin)
    if config.allocation == "sensitivity" and not the_plan.by_ratio:  # before the calibration passes, not after
        raise ValueError(
            "--allocation sensitivity spreads --params-ratio over the layers it sets; every layer here has a fixed "
            "(b, r) from --preset or --layers"
        )
    grams = None
    sequential = calibration is not None and calibration.sequential
    weighted = resolve_allocation(config.allocation, windows is not None, bool(the_plan.by_ratio)) == "sensitivity"
    # --sequential collects its own statistics block by block; the dense Grams only when the allocation reads them
    if windows is not None and (weighted or not sequential):
        names = [e.name for e in the_plan.layers]
        grams = collect_grams(
            model, names, batched(windows), progress=callbacks.calibration, total_tokens=windows.numel()
        )
    params_before, bytes_before = unique_params(model)
    family: Family | None = source.family
    inputs = family.sample(model, 2, config.seed) if family and family.sample else None
    if inputs is None and isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int):
        inputs = token_inputs(model, 2, config.seed)  # a family we do not know (--include): token ids still check it
    reference = model_output(model, inputs) if inputs is not None else None

    groups = grams.groups() if grams is not None else []
    damping = calibration.damping if calibration is not None else DEFAULT_DAMPING
    sensitivities = None
    if windows is not None and weighted:
        sensitivities = output_sensitivity(model, [e.name for e in the_plan.layers], sensitivity_batches(windows))
    allocation = allocate(
        model, the_plan, config, family, grams, damping=damping, device=device, sensitivities=sensitivities
    )
    if sequential:
        grams = None  # the allocation's Grams are done with: free them before the block-by-block pass
        convert_layers_sequential(
            model, the_plan, config, batched(windows), device, callbacks.layer, callbacks.fit, damping=damping
        )
        groups = the_plan.shared_inputs
    else:
        convert_layers(model, the_plan, config, device, callbacks.layer, callbacks.fit, grams=grams, damping=damping)
    calibrated = None
    if calibration is not None:
        per_layer = [
            {"name": e.name, "relative_error": e.relative_error, "output_relative_error": e.output_relative_error}
            for e in the_plan.layers
        ]
        calibrated = calibration_record(text, windows, calibration.damping, per_layer, groups, sequential)

    params_after, bytes_after = unique_params(model)
    summary = {
        "model": source.id,
        "builtin": source.builtin is not None,
        "family": family.name if family else None,
        "structure": config.structure,
        "device": device,
        "params_before": params_before,
        "params_after": params_after,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "compression": params_before / params_after,
        "allocation": allocation,
        "layers_converted": len(the_plan.layers),
        "worst_relative_error": max(e.relative_error for e in the_plan.layers),
        "mean_relative_error": sum(e.relative_error for e in the_plan.layers) / len(the_plan.layers),
        "output_agreement": agreement(model_output(model, inputs), reference) if inputs is not None else None,
        "warnings": [],
        "calibration": None if calibrated is None else {k: calibrated[k] for k in _CALIBRATION_SUMMARY},
        "seconds": None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    warning = disagreement(summary["output_agreement"])
    if warning is not None:
        summary["warnings"].append(warning)
    if calibrated is not None:
        out_errors = [e.output_relative_error for e in the_plan.layers]
        summary["worst_output_relative_error"] = max(out_errors)
        summary["mean_output_relative_error"] = sum(out_errors) / len(out_errors)
    if output is not None:
        extra = {"conversion": config.to_dict(), "summary": {k: v for k, v in summary.items() if k != "seconds"}}
        extra["allocation"] = allocation
        if calibrated is not None:
            extra["calibration"] = calibrated
        tokenizer = None if source.builtin is not None else Path(source.id)
        save(model, output, source=record, extra=extra, overwrite=overwrite, tokenizer_from=tokenizer)
    summary["seconds"] = time.perf_counter() - t0
    summary["peak_host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    summary["layers"] = [e.to_dict() for e in the_plan.layers]
    summary["skipped"] = the_plan.skipped
    summary["output"] = None if output is None else str(output)
    return summary


def convert_job(
    model_arg: str | None = None,
    output: Path | None = None,
    *,
    structure: str = "blast",
    params_ratio: float | None = None,
    preset: str | None = None,
    layers_file: Path | None = None,
    include: tuple[str, ...] | list[str] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    steps: int = 300,
    seed: int = 0,
    skip_incompatible: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    callbacks: Callbacks | None = None,
    calibration: Path | None = None,
    calibration_tokens: int = DEFAULT_TOKENS,
    seq_len: int | None = None,
    damping: float | None = None,
    allocation: str = "auto",
    sequential: bool = False,
) -> dict:
    """``blrdeploy convert`` with its defaults: the model ``gpt2-mini``; ``params_ratio`` 0.5 unless a preset or a
    layers file chooses (b, r) instead; the output ``./<model>-<structure>``; a dry run plans on the meta device.
    ``calibration``: a text file, folder or .jsonl to fit the layers' outputs on (``calibration_tokens`` of it, in
    windows of ``seq_len``, default the model's context up to 2048; ``damping`` default 1e-2). ``allocation``:
    auto, uniform or sensitivity (``conversion.allocate``). ``sequential``: fit block by block on the converted model's
    own inputs (``conversion.sequential``; needs ``calibration``)."""
    model_arg = model_arg or DEFAULT_MODEL
    settings = load_layer_settings(layers_file) if layers_file is not None else ()
    ratio = params_ratio if params_ratio is not None else (None if preset or settings else 0.5)
    config = ConvertConfig(
        structure=structure, params_ratio=ratio, preset=preset, layers=settings,
        include=tuple(include) if include else None, exclude=tuple(exclude), steps=steps, seed=seed,
        skip_incompatible=skip_incompatible, allocation=allocation,
    )  # fmt: skip
    options = None
    if calibration is not None:
        damping = DEFAULT_DAMPING if damping is None else damping
        options = CalibrationOptions(calibration, calibration_tokens, seq_len, damping, sequential)
    elif sequential:
        raise ValueError("--sequential fits each layer on calibration text: give --calibration PATH")
    if output is None and not dry_run:
        output = Path(f"{Path(model_arg).name}-{structure}")
    return run_convert(
        model_arg, output, config, device="meta" if dry_run else device, dtype=dtype, overwrite=overwrite,
        dry_run=dry_run, callbacks=callbacks, calibration=options,
    )  # fmt: skip
