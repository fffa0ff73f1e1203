"""Validation of a converted checkpoint: against its ONNX reference (onnxruntime, CPU), against the dense model
it came from, and GPU path against the float64 PyTorch reference.

Follows optimum's contract: check names, then shapes, then values; collect every failure; one line per check
with the error and the tolerance. ``Unusable`` is raised for inputs that cannot be validated at all (exit 2).
No check passes without a tolerance: the dense comparison, which has no default one, needs ``rtol``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from blrdeploy.conversion.checkpoint import CheckpointError, load, read_blr_config, verify
from blrdeploy.conversion.pipeline import open_recorded_source
from blrdeploy.exporters.onnx import META_CHECKPOINT, export_checkpoint
from blrdeploy.exporters.onnx_functions import DOMAIN, FUNCTIONS
from blrdeploy.models.families import FAMILIES
from blrdeploy.models.outputs import TOLERANCE, Check, compare, model_output, sample_inputs
from blrdeploy.structures.modules import BLRLinear

# What a checkpoint can be validated against: its ONNX reference, its dense source, the float64 CPU reference.
AGAINST = ("onnx", "dense", "reference")


class Unusable(ValueError):
    """The checkpoint or ONNX file cannot be validated: missing, corrupt, mismatched, or unknown ops."""


@dataclass
class Report:
    against: str
    checkpoint: str
    checks: list[Check] = field(default_factory=list)
    first_diverging_layer: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Passed: there were checks, and each one met a tolerance (a check without one is a measurement only)."""
        return bool(self.checks) and all(c.ok and c.tolerance is not None for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "against": self.against,
            "checkpoint": self.checkpoint,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "first_diverging_layer": self.first_diverging_layer,
            "notes": self.notes,
        }


def seeded_inputs(model: nn.Module, blr_config: dict):
    """(label, inputs) of the seeded cases: odd and even sizes, batch 1 included; seq only for token models."""
    family = FAMILIES.get(blr_config["source"].get("family") or "")
    if family is not None and family.tokens:
        cases = [("batch=1 seq=7", 1, 7), ("batch=2 seq=16", 2, 16), ("batch=3 seq=5", 3, 5)]
    else:
        cases = [("batch=1", 1, 0), ("batch=3", 3, 0)]
    for label, batch, seq in cases:
        yield label, sample_inputs(model, blr_config, batch=batch, seed=batch * 1000 + seq, seq=seq)


def _load_checkpoint(checkpoint: Path, device="cpu", dtype=torch.float32, check_sha256: bool = True):
    """The checkpoint's config and model, its weights checked against their recorded sha256 first (unless already
    checked): a validation of damaged weights would blame a layer for what the file did."""
    try:
        if check_sha256:
            verify(checkpoint)
        return read_blr_config(checkpoint), load(checkpoint, device=device, dtype=dtype)
    except CheckpointError as exc:
        raise Unusable(str(exc)) from exc


def validate(
    checkpoint: str | Path, against: str = "onnx", onnx_path: str | Path | None = None, rtol: float | None = None
) -> Report:
    """The report of ``checkpoint`` against one of AGAINST; ``onnx_path`` only with "onnx" (default: exported to a
    temporary file), ``rtol`` None for each check's default tolerance."""
    if against not in AGAINST:
        raise Unusable(f"--against must be one of {', '.join(AGAINST)}, got {against!r}")
    if against == "onnx":
        return validate_against_onnx(checkpoint, onnx_path, rtol)
    if against == "dense":
        return validate_against_dense(checkpoint, rtol)
    return validate_against_reference(checkpoint, rtol=rtol)


# ------------------------------------------------------------------------------------------------ against ONNX


def _open_onnx(path: Path, blr_config: dict):
    if not path.is_file():
        raise Unusable(f"no such ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise Unusable(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    recorded = meta.get(META_CHECKPOINT)
    if recorded is None:
        raise Unusable(f"{path} has no {META_CHECKPOINT} metadata: it was not exported by blrdeploy")
    if recorded != blr_config["weights"]["sha256"]:
        raise Unusable(
            f"{path} was exported from another checkpoint (weights sha256 {recorded[:12]}... != "
            f"{blr_config['weights']['sha256'][:12]}...)"
        )
    functions = {(f.domain, f.name) for f in proto.functions}
    for node in proto.graph.node:
        if node.domain == DOMAIN:
            if node.op_type not in FUNCTIONS:
                raise Unusable(f"{path}: node {node.name} uses unknown op {DOMAIN}::{node.op_type}")
            if (DOMAIN, node.op_type) not in functions:
                raise Unusable(f"{path}: the function body of {DOMAIN}::{node.op_type} is missing")
    return proto


def _ort_session(model_bytes_or_path, path_for_errors: Path):
    # deferred: only the ONNX check runs a session; the dense and reference checks need not import onnxruntime
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Unusable(f"onnxruntime cannot load {path_for_errors}: {str(exc).splitlines()[0]}") from exc


def validate_against_onnx(
    checkpoint: str | Path, onnx_path: str | Path | None = None, rtol: float | None = None
) -> Report:
    checkpoint = Path(checkpoint)
    cfg, model = _load_checkpoint(checkpoint)
    report = Report("onnx", str(checkpoint))
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_path is None:
            onnx_path = Path(tmp) / "model.onnx"
            export_checkpoint(checkpoint, onnx_path)
            report.notes.append("exported to a temporary file")
        onnx_path = Path(onnx_path)
        proto = _open_onnx(onnx_path, cfg)
        session = _ort_session(str(onnx_path), onnx_path)
        names = [i.name for i in session.get_inputs()]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to(device)
        tol = rtol if rtol is not None else TOLERANCE[torch.float32]
        first_failure = None
        for label, inputs in seeded_inputs(model, cfg):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise Unusable(f"{onnx_path} expects inputs {missing} that this checkpoint's model does not take")
            ref = model_output(model, inputs)
            out = torch.from_numpy(session.run(None, {n: inputs[n].numpy() for n in names})[0])
            check = compare(f"output {label}", out, ref, tol)
            report.checks.append(check)
            if not check.ok and first_failure is None:
                first_failure = inputs
        if first_failure is not None:
            report.first_diverging_layer = _first_diverging_layer(model, proto, first_failure, names, onnx_path, tol)
    return report


def _first_diverging_layer(model, proto, inputs, names, path, tol) -> str | None:
    """Runs both sides once more with every BLR layer's output exposed; the first layer beyond tolerance."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BLRLinear)]
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, name=n: captured.setdefault(name, (out - mod.bias) if mod.bias is not None else out)
        )
        for n, m in layers
    ]
    try:
        model_output(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    debug = onnx.ModelProto()
    debug.CopyFrom(proto)
    blr_outputs = [n.output[0] for n in debug.graph.node if n.domain == DOMAIN]
    for name in blr_outputs:
        debug.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    if path.with_name(path.name + ".data").exists():
        return None  # external-data models are not re-serialized for this diagnosis
    session = _ort_session(debug.SerializeToString(), path)
    results = session.run(blr_outputs, {n: inputs[n].cpu().numpy() for n in names})
    # hooks fire in execution order, which is the exported graph's node order
    for name, ort_out in zip(list(captured), results, strict=False):
        if not compare(name, torch.from_numpy(ort_out), captured[name].float().cpu(), tol).ok:
            return name
    return None


# ----------------------------------------------------------------------------------------------- against dense


def validate_against_dense(checkpoint: str | Path, rtol: float | None = None) -> Report:
    """Converted vs the dense model it came from, on seeded inputs: the approximation's quality. ``rtol`` is
    required: how far a conversion may drift is the user's choice (0.02 and 1.0 are both sane, for different
    compressions), so there is no default to pass against."""
    if rtol is None:
        raise Unusable(
            "--against dense needs --rtol: an approximation has no default tolerance to pass against "
            "(e.g. --rtol 0.1 accepts 10% relative error)"
        )
    checkpoint = Path(checkpoint)
    cfg, model = _load_checkpoint(checkpoint)
    seed = cfg.get("conversion", {}).get("seed", 0)
    try:
        source, checked = open_recorded_source(cfg["source"], seed=seed)
    except ValueError as exc:
        raise Unusable(str(exc)) from exc
    report = Report("dense", str(checkpoint))
    if not checked:
        report.notes.append(
            f"source {source.id} not checked to be the model converted: this checkpoint records no fingerprint "
            "of its source weights (written before blrdeploy recorded one)"
        )
    for label, inputs in seeded_inputs(model, cfg):
        report.checks.append(
            compare(f"output {label}", model_output(model, inputs), model_output(source.model, inputs), rtol)
        )
    return report


# ------------------------------------------------------------------------------------------- against reference


def validate_against_reference(
    checkpoint: str | Path, dtype: torch.dtype = torch.bfloat16, rtol: float | None = None
) -> Report:
    """The model's GPU path (the Triton kernels where they dispatch) vs the float64 PyTorch reference on CPU."""
    if not torch.cuda.is_available():
        raise Unusable("--against reference compares the GPU path with the CPU reference: it needs a CUDA GPU")
    checkpoint = Path(checkpoint)
    cfg, gpu_model = _load_checkpoint(checkpoint, device="cuda", dtype=dtype)
    _, ref_model = _load_checkpoint(checkpoint, device="cpu", dtype=torch.float64, check_sha256=False)
    report = Report("reference", str(checkpoint))
    for label, inputs in seeded_inputs(ref_model, cfg):
        ref_inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        gpu_inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        report.checks.append(
            compare(
                f"output {label} {str(dtype).removeprefix('torch.')}",
                model_output(gpu_model, gpu_inputs),
                model_output(ref_model, ref_inputs),
                rtol if rtol is not None else TOLERANCE[dtype],
            )
        )
    return report
