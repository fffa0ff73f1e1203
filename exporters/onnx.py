"""Export a converted model to ONNX with one com.blrdeploy node per BLR layer.

torch.onnx's exporter would inline a function it made itself, so each layer is emitted as an opaque node
(``torch.onnx.ops.symbolic``, see blrdeploy.structures.functional) and the function bodies are attached afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from blrdeploy.conversion.checkpoint import load, read_blr_config
from blrdeploy.exporters.onnx_functions import DOMAIN, DOMAIN_VERSION, FUNCTIONS, OPSET
from blrdeploy.files import check_output_file, made_parents
from blrdeploy.models.outputs import main_output, sample_inputs
from blrdeploy.models.sources import family_of
from blrdeploy.version import __version__

IR_VERSION = 10
TWO_GB = 2**31
META_CHECKPOINT = "blrdeploy.checkpoint_sha256"


class _MainOutput(nn.Module):
    """Exports one tensor (logits, a DiT's sample, or the last hidden state) with no KV cache. The inputs are
    positional (x0, x1, x2): torch.export's dynamic shapes do not match a **kwargs forward; the ONNX inputs are
    renamed to the model's own names after export."""

    MAX_INPUTS = 3

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        if len(names) > self.MAX_INPUTS:
            raise ValueError(f"export takes at most {self.MAX_INPUTS} model inputs, got {names}")
        self.model = model
        self.names = list(names)
        self.no_cache = "input_ids" in names and "use_cache" in model.forward.__code__.co_varnames

    def forward(self, x0, x1=None, x2=None):
        inputs = dict(zip(self.names, (x0, x1, x2), strict=False))
        return main_output(self.model(**inputs, **({"use_cache": False} if self.no_cache else {})))


def dynamic_axes(names: list[str]) -> tuple:
    """Batch is dynamic for every input; the sequence too for token ids."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return tuple({0: batch, 1: seq} if k == "input_ids" else {0: batch} for k in names)


def _rename_inputs(proto: onnx.ModelProto, names: list[str]) -> None:
    mapping = {f"x{i}": name for i, name in enumerate(names)}
    for value in proto.graph.input:
        value.name = mapping.get(value.name, value.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


def attach_functions(proto: onnx.ModelProto) -> list[str]:
    """Adds the FunctionProto of every com.blrdeploy op the graph uses; returns their names."""
    used = sorted({n.op_type for n in proto.graph.node if n.domain == DOMAIN})
    unknown = [op for op in used if op not in FUNCTIONS]
    if unknown:
        raise ValueError(f"graph uses unknown {DOMAIN} ops: {', '.join(unknown)}")
    have = {(f.domain, f.name) for f in proto.functions}
    for op in used:
        if (DOMAIN, op) not in have:
            proto.functions.append(FUNCTIONS[op]())
    imports = {o.domain: o for o in proto.opset_import}
    if DOMAIN not in imports:
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return used


@contextlib.contextmanager
def _quiet():
    """The exporter narrates each step on stdout and logs warnings about packages it does not need."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    inputs: dict | None = None,
    *,
    metadata: dict[str, str] | None = None,
    quiet: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` called as ``model(**inputs)`` (default: its family's seeded sample inputs); writes external
    data beside it past 2 GB. An existing file is replaced only with ``overwrite``."""
    path = Path(path)
    check_onnx_output(path, overwrite)
    if inputs is None:
        family = family_of(model)
        if family is None:
            raise ValueError(f"no sample inputs are known for {type(model).__name__}: pass inputs=")
        inputs = family.sample(model, 2, 0)
    names = list(inputs)
    wrapped = _MainOutput(model, names).eval()
    try:
        with torch.no_grad(), _quiet() if quiet else contextlib.nullcontext():
            program = torch.onnx.export(
                wrapped, tuple(inputs.values()), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_axes(names)
            )
    except Exception as exc:  # torch.export raises many types; its first line says what failed
        raise ValueError(f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
    proto = program.model_proto
    _rename_inputs(proto, names)
    proto.ir_version = IR_VERSION
    used = attach_functions(proto)
    if not used:
        raise ValueError("the model has no BLR layer: nothing would use a com.blrdeploy op")
    for key, value in {**(metadata or {})}.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(value)))
    large = sum(t.ByteSize() for t in proto.graph.initializer) > TWO_GB - 2**26
    data_name = path.name + ".data"
    # Both files are written and checked in a staging folder, then moved into place: a failed export never
    # leaves a half-written file or clobbers the data file of an earlier good one.
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    with made_parents(path):
        staging.mkdir()
        try:
            tmp = staging / path.name
            if large:
                onnx.save_model(
                    proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
                )
            else:
                onnx.save_model(proto, str(tmp))
            onnx.checker.check_model(str(tmp), full_check=True)
            if large:
                os.replace(staging / data_name, path.parent / data_name)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def check_onnx_output(path: Path, overwrite: bool) -> None:
    """Refuses, before any work, an output the export must not write: the .onnx or its external data (OUTPUT.data)
    already there without ``overwrite``, or any path blrdeploy.files refuses."""
    check_output_file(path, overwrite, "-o")
    check_output_file(path.with_name(path.name + ".data"), overwrite, "-o")


def export_checkpoint(checkpoint: str | Path, path: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Export a converted checkpoint directory; the ONNX metadata names the checkpoint's weights sha256."""
    check_onnx_output(Path(path), overwrite)  # before loading the model
    cfg = read_blr_config(checkpoint)
    model = load(checkpoint, device="cpu", dtype=torch.float32)
    inputs = sample_inputs(model, cfg, batch=2, seed=seed)
    metadata = {
        META_CHECKPOINT: cfg["weights"]["sha256"],
        "blrdeploy.source": cfg["source"].get("id") or "",
        "blrdeploy.version": __version__,
        "torch.version": torch.__version__,
        "onnx.version": onnx.__version__,
    }
    return export_onnx(model, path, inputs, metadata=metadata, overwrite=overwrite)
