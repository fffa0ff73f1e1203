"""ONNX export with com.blrdeploy function ops, and validation against onnxruntime, dense and reference."""

import json
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from blrdeploy import ConvertConfig, convert, save
from blrdeploy.cli import app
from blrdeploy.conversion.pipeline import convert_job
from blrdeploy.exporters.onnx import META_CHECKPOINT, export_checkpoint
from blrdeploy.exporters.onnx_functions import DOMAIN
from blrdeploy.models.outputs import compare
from blrdeploy.models.sources import build_builtin
from blrdeploy.validators.onnx import Report, Unusable, validate_against_dense, validate_against_onnx

SETTINGS = {"blast": (("*", 4, 16),), "monarch": (("*", 4, 16),), "lowrank": (("*", None, 16),)}
OPS = {"blast": "BlastLinear", "monarch": "MonarchLinear", "lowrank": "LowRankLinear"}
runner = CliRunner()


def converted(tmp_path, name="gpt2-tiny", structure="blast", seed=0):
    model = build_builtin(name, seed=seed).model
    report = convert(model, ConvertConfig(structure, layers=SETTINGS[structure], params_ratio=None, steps=5))
    save(model, tmp_path / f"{name}-{structure}-{seed}", source={"id": name})
    return tmp_path / f"{name}-{structure}-{seed}", report


@pytest.mark.parametrize("structure", ["blast", "monarch", "lowrank"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "vit-tiny", "dit-tiny"])
def test_export_check_and_validate(name, structure, tmp_path):
    ckpt, report = converted(tmp_path, name, structure)
    path = export_checkpoint(ckpt, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.ir_version == 10
    assert {o.domain: o.version for o in proto.opset_import}[""] == 20
    assert {o.domain: o.version for o in proto.opset_import}[DOMAIN] == 1
    custom = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert len(custom) == len(report.layers) and {n.op_type for n in custom} == {OPS[structure]}
    assert [f.name for f in proto.functions if f.domain == DOMAIN] == [OPS[structure]]
    assert len([f for f in proto.functions if f.domain == DOMAIN][0].node) >= 3  # a real body, not a stub
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[META_CHECKPOINT] == json.loads((ckpt / "blr_config.json").read_text())["weights"]["sha256"]
    assert "torch.version" in meta and "blrdeploy.version" in meta
    result = validate_against_onnx(ckpt, path)
    assert result.ok and len(result.checks) >= 2
    assert all(c.relative_error <= 1e-4 for c in result.checks), [c.relative_error for c in result.checks]


def test_dynamic_axes(tmp_path):
    ckpt, _ = converted(tmp_path, "llama-tiny", "monarch")
    proto = onnx.load(str(export_checkpoint(ckpt, tmp_path / "m.onnx")))
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert proto.graph.input[0].name == "input_ids" and all(dims), dims


def _tamper(path, edit):
    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(path))


def test_missing_body_unknown_op_corrupt_and_foreign_files(tmp_path):
    ckpt, _ = converted(tmp_path)
    good = export_checkpoint(ckpt, tmp_path / "good.onnx")
    cases = {}
    no_body = tmp_path / "no_body.onnx"
    no_body.write_bytes(good.read_bytes())
    _tamper(no_body, lambda p: p.ClearField("functions"))
    cases[no_body] = "function body of com.blrdeploy::BlastLinear is missing"
    unknown = tmp_path / "unknown.onnx"
    unknown.write_bytes(good.read_bytes())
    _tamper(unknown, lambda p: [n.__setattr__("op_type", "FooLinear") for n in p.graph.node if n.domain == DOMAIN])
    cases[unknown] = "unknown op com.blrdeploy::FooLinear"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good.read_bytes()[:200])
    cases[corrupt] = "is not a readable ONNX model"
    other_ckpt, _ = converted(tmp_path, seed=1)
    cases[export_checkpoint(other_ckpt, tmp_path / "other.onnx")] = "exported from another checkpoint"
    for path, message in cases.items():
        with pytest.raises(Unusable, match=message):
            validate_against_onnx(ckpt, path)
        result = runner.invoke(app, ["validate", str(ckpt), "--onnx", str(path)])
        assert result.exit_code == 2, result.output
        assert message.split("::")[0] in result.output
        assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception


def test_weights_damaged_in_place_are_refused_before_validating(tmp_path):
    """Bytes overwritten without changing the file's size: the checkpoint is refused (exit 2), not validated."""
    ckpt, _ = converted(tmp_path)
    path = export_checkpoint(ckpt, tmp_path / "m.onnx")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-400:] = bytes(400)
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["validate", str(ckpt), "--onnx", str(path)])
    assert result.exit_code == 2 and "does not match its recorded sha256" in result.output, result.output


def test_export_to_a_directory_refused_cleanly(tmp_path):
    ckpt, _ = converted(tmp_path)
    (tmp_path / "dir.onnx").mkdir()
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "dir.onnx")])
    assert result.exit_code == 2 and "is a directory" in result.output
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_changed_weight_fails_and_is_localized(tmp_path):
    ckpt, report = converted(tmp_path, "gpt2-tiny", "blast")
    path = export_checkpoint(ckpt, tmp_path / "m.onnx")
    custom = [n for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN]
    target_node = custom[2]  # the third BLR layer in execution order

    def edit(proto):
        inits = {t.name: t for t in proto.graph.initializer}
        tensor = inits[target_node.input[2]]  # its S factor
        values = onnx.numpy_helper.to_array(tensor).copy()
        values.flat[0] += 1.0
        tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))

    _tamper(path, edit)
    result = validate_against_onnx(ckpt, path)
    assert not result.ok
    assert result.first_diverging_layer == report.layers[2].name
    cli = runner.invoke(app, ["validate", str(ckpt), "--onnx", str(path), "--json"])
    assert cli.exit_code == 1
    assert json.loads(cli.stdout)["first_diverging_layer"] == report.layers[2].name


def test_cli_export_validate_and_dense(tmp_path):
    ckpt, _ = converted(tmp_path, "vit-tiny", "monarch")
    out = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "v.onnx")])
    assert out.exit_code == 0 and "wrote" in out.output, out.output
    ok = runner.invoke(app, ["validate", str(ckpt), "--onnx", str(tmp_path / "v.onnx")])
    assert ok.exit_code == 0 and "✓" in ok.output and "passed" in ok.output, ok.output
    temp = runner.invoke(app, ["validate", str(ckpt), "--json"])  # exports to a temp dir itself
    assert temp.exit_code == 0 and json.loads(temp.stdout)["ok"]
    dense = validate_against_dense(ckpt, rtol=1.0)
    assert dense.ok and 0 < dense.checks[0].relative_error < 1 and dense.checks[0].cosine_similarity > 0.5
    strict = runner.invoke(app, ["validate", str(ckpt), "--against", "dense", "--rtol", "1e-9"])
    assert strict.exit_code == 1, strict.output
    bad = runner.invoke(app, ["validate", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no such checkpoint directory" in bad.output


def test_against_dense_never_passes_without_a_tolerance(tmp_path):
    """#24 item 5: without --rtol the dense comparison printed "✓ passed" at relative error ≈ 1. Now it asks for a
    tolerance (one line, exit 2) and a report passes only when it has checks and each met a tolerance."""
    ckpt, _ = converted(tmp_path)
    with pytest.raises(Unusable, match="needs --rtol"):
        validate_against_dense(ckpt)
    cli = runner.invoke(app, ["validate", str(ckpt), "--against", "dense"])
    assert cli.exit_code == 2 and "passed" not in cli.output, cli.output
    assert cli.output.strip().splitlines() == [cli.output.strip()] and "needs --rtol" in cli.output
    judged = runner.invoke(app, ["validate", str(ckpt), "--against", "dense", "--rtol", "2", "--json"])
    assert judged.exit_code == 0 and all(c["tolerance"] == 2 for c in json.loads(judged.stdout)["checks"])
    measured = compare("output", torch.ones(4), torch.full((4,), 2.0), None)  # relative error 0.5, no tolerance
    assert measured.ok and not Report("dense", "c", [measured]).ok and not Report("dense", "c").ok


def _save_gpt2_tiny(path: Path, seed: int) -> None:
    build_builtin("gpt2-tiny", seed=seed).model.save_pretrained(str(path))


def test_against_dense_opens_the_recorded_source_and_refuses_a_changed_one(tmp_path, monkeypatch):
    """#24 item 4: the source was recorded as typed ("hf") and resolved against the current directory, so validate
    failed elsewhere and, beside another model named "hf", compared against that one. Now convert records the
    absolute path and the sha256 of each weight file; validate opens that path from anywhere and refuses (one line,
    exit 2) weights that changed, even at the same size, or a source that is gone."""
    work, elsewhere, other = tmp_path / "work", tmp_path / "elsewhere", tmp_path / "other"
    elsewhere.mkdir()
    _save_gpt2_tiny(work / "hf", seed=1)
    _save_gpt2_tiny(other / "hf", seed=2)  # another model of the same name, same sizes
    monkeypatch.chdir(work)
    convert_job("hf", Path("ckpt"), structure="lowrank")
    ckpt = work / "ckpt"
    source = json.loads((ckpt / "blr_config.json").read_text())["source"]
    assert source["id"] == str((work / "hf").resolve()) and list(source["weights"]) == ["model.safetensors"]

    def dense(cwd: Path):
        monkeypatch.chdir(cwd)
        return runner.invoke(app, ["validate", str(ckpt), "--against", "dense", "--rtol", "10", "--json"])

    here = dense(work)
    assert here.exit_code == 0, here.output
    errors = [c["relative_error"] for c in json.loads(here.stdout)["checks"]]
    for cwd in (elsewhere, other):
        result = dense(cwd)
        assert result.exit_code == 0, result.output
        assert [c["relative_error"] for c in json.loads(result.stdout)["checks"]] == errors  # the same dense model

    _save_gpt2_tiny(work / "hf", seed=3)  # changed in place, byte count unchanged
    changed = dense(elsewhere)
    assert changed.exit_code == 2 and "changed since it was converted" in changed.output, changed.output
    assert "model.safetensors does not match its recorded sha256" in changed.output
    assert len(changed.output.strip().splitlines()) == 1
    (work / "hf").rename(work / "moved")
    gone = dense(elsewhere)
    assert gone.exit_code == 2 and "is gone" in gone.output and len(gone.output.strip().splitlines()) == 1

    # A checkpoint written before the fingerprint: the path as typed, resolved as before, with a note.
    (work / "moved").rename(work / "hf")
    cfg = json.loads((ckpt / "blr_config.json").read_text())
    cfg["source"] = {**{k: v for k, v in cfg["source"].items() if k != "weights"}, "id": "hf"}
    (ckpt / "blr_config.json").write_text(json.dumps(cfg))
    old = dense(work)
    assert old.exit_code == 0, old.output
    assert any("not checked" in note for note in json.loads(old.stdout)["notes"])


def test_export_never_clobbers_a_file_without_overwrite(tmp_path):
    """export -o onto an existing file (a user's notes, or an earlier export) is refused with one line before any
    work, and the file survives; --overwrite replaces it."""
    ckpt, _ = converted(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    refused = runner.invoke(app, ["export", str(ckpt), "-o", str(notes)])
    assert refused.exit_code == 2 and "already exists; pass --overwrite" in refused.output, refused.output
    assert notes.read_text() == "my notes"
    data = tmp_path / "m.onnx.data"  # an earlier large export's weights count as the output too
    data.write_text("weights")
    refused = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "m.onnx")])
    assert refused.exit_code == 2 and "m.onnx.data already exists" in refused.output
    assert data.read_text() == "weights" and not (tmp_path / "m.onnx").exists()
    replaced = runner.invoke(app, ["export", str(ckpt), "-o", str(notes), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert onnx.load(str(notes)).graph.node


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_against_reference_needs_gpu(tmp_path):
    ckpt, _ = converted(tmp_path)
    result = runner.invoke(app, ["validate", str(ckpt), "--against", "reference"])
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output


@pytest.mark.gpu
def test_against_reference_on_gpu(tmp_path):
    ckpt, _ = converted(tmp_path, "llama-tiny", "blast")
    result = runner.invoke(app, ["validate", str(ckpt), "--against", "reference", "--json"])
    assert result.exit_code == 0, result.output


def test_external_data_past_threshold(tmp_path, monkeypatch):
    import blrdeploy.exporters.onnx as exp

    monkeypatch.setattr(exp, "TWO_GB", 0)  # every model counts as large
    ckpt, _ = converted(tmp_path, "gpt2-tiny", "lowrank")
    path = export_checkpoint(ckpt, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 100_000
    graph = onnx.load(str(path), load_external_data=False).graph
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer if t.ByteSize() > 2048)
    onnx.checker.check_model(str(path), full_check=True)
    assert validate_against_onnx(ckpt, path).ok


def test_public_export_onnx_in_memory(tmp_path):
    import blrdeploy

    model = build_builtin("llama-tiny").model
    convert(model, ConvertConfig("lowrank"))
    path = blrdeploy.export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert sum(n.domain == DOMAIN for n in proto.graph.node) == 14


def test_a_check_reports_the_compared_tensor_shape():
    from blrdeploy.models.outputs import compare

    ref = torch.randn(1, 7, 128, dtype=torch.float64)
    check = compare("logits", ref + 1e-9, ref, 1e-6)
    assert check.shape == [1, 7, 128] and check.ok
    assert not compare("logits", ref[:, :6], ref, 1e-6).ok
