import json
import subprocess
import sys

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from blrdeploy import __version__
from blrdeploy.cli import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["factorize", "--help"])
    assert result.exit_code == 0 and "--params-ratio" in result.output


def test_version_and_import_load_no_torch():
    """``blrdeploy --version`` and ``import blrdeploy`` answer in milliseconds: torch (seconds) loads on first use."""
    code = (
        "import sys; sys.argv = ['blrdeploy', '--version']; import blrdeploy; from blrdeploy.__main__ import main; "
        "main(); print('torch' in sys.modules); blrdeploy.load; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["blrdeploy", __version__, "False", "True"]


def test_help_shows_no_value_for_a_flag():
    """Newer typer prints ``--json <bool>`` as if the flag took a value; ours take none."""
    for command in ([], *([name] for name in ("convert", "bench", "run", "package", "roofline", "export"))):
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output and "--help" in result.output, command


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    from blrdeploy.cli import common

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    for load, threads in ((0.2, 4), (1.6, 2), (3.9, 1), (12.0, 1)):
        monkeypatch.setattr(common.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert common.cpu_threads(None) == threads, load
    assert common.cpu_threads(3) == 3  # asked for: as asked, whatever the load
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert common.cpu_threads(None) == 2  # the user's own setting wins over the guess
    result = runner.invoke(app, ["--threads", "0", "info", "x"])
    assert result.exit_code == 2 and result.output.strip() == "error: --threads must be 1 or more, got 0"


def test_python_dash_m_equals_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "blrdeploy", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"blrdeploy {__version__}"


def test_factorize_demo_json():
    result = runner.invoke(app, ["factorize", "--shape", "96x64", "--steps", "40", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shape"] == [96, 64]
    assert [r["structure"] for r in data["results"]] == ["blast", "monarch", "lowrank"]
    for r in data["results"]:
        assert 0 < r["relative_error"] < 1 and 0.3 < r["ratio"] < 0.7


def test_factorize_table_from_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"layer.weight": torch.randn(48, 32), "other": torch.randn(3)}, str(path))
    result = runner.invoke(
        app, ["factorize", "--weights", str(path), "--tensor", "layer.weight", "--structure", "lowrank"]
    )
    assert result.exit_code == 0, result.output
    assert "lowrank" in result.output and "SQNR" in result.output


def test_factorize_transposed_conv1d_weight(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"c_fc.weight": torch.randn(32, 48)}, path)  # Conv1D stores (in, out)
    args = ["factorize", "--weights", str(path), "--tensor", "c_fc.weight", "--transpose", "--json"]
    result = runner.invoke(app, [*args, "--structure", "monarch"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shape"] == [48, 32]


def test_factorize_bad_inputs(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(8, 8), "v": torch.randn(8)}, str(good))
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(good.read_bytes()[:40])
    torch.save({"a": [1, 2]}, tmp_path / "obj.pt")
    nan = tmp_path / "nan.safetensors"
    save_file({"a": torch.full((8, 8), float("nan"))}, str(nan))
    cases = [
        (["--weights", str(tmp_path / "missing.safetensors"), "--tensor", "a"], "no such file"),
        (["--weights", str(corrupt), "--tensor", "a"], "cannot read"),
        (["--weights", str(good)], "name one with --tensor"),
        (["--weights", str(good), "--tensor", "b"], "no tensor 'b'"),
        (["--weights", str(good), "--tensor", "v"], "a 2-D weight is needed"),
        (["--weights", str(nan), "--tensor", "a"], "NaN/Inf"),
        (["--params-ratio", "1.5"], r"params ratio must be in (0, 1)"),
        (["--structure", "tt"], "unknown structure 'tt'"),
        (["--shape", "12by8"], "--shape must look like OUTxIN"),
        (["--shape", "-4x8"], "out_features must be a positive int"),
        (["--weights", str(tmp_path / "obj.pt"), "--tensor", "a"], "'a' in"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["factorize", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception


def test_convert_then_info(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "gpt2-tiny", "-o", str(out), "--steps", "10", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers_converted"] == 6 and summary["params_after"] < summary["params_before"]
    assert set(summary["output_agreement"]) == {"relative_error", "cosine_similarity"}
    result = runner.invoke(app, ["info", str(out), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["verified"] and len(info["layers"]) == 6
    assert info["model_params_after"] == summary["params_after"]
    table = runner.invoke(app, ["convert", "llama-tiny", "-o", str(tmp_path / "t"), "--structure", "monarch"])
    assert table.exit_code == 0, table.output
    assert "parameters:" in table.output and "cosine similarity" in table.output


def test_convert_dry_run_paper_preset():
    result = runner.invoke(app, ["convert", "llama-7b", "--preset", "paper", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params_before"] == 6_738_415_616 and 3.55e9 < data["params_after"] < 3.57e9


def test_convert_bad_inputs(tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (["no-such-model"], "neither a built-in model"),
        (["gpt2-tiny", "-o", str(tmp_path / "exists")], "already exists; pass --overwrite"),
        (["gpt2-tiny", "--params-ratio", "0"], "params ratio must be in (0, 1)"),
        (["gpt2-tiny", "--preset", "paper", "--dry-run"], "--preset paper has settings for"),
        (["gpt2-tiny", "--layers", str(tmp_path / "none.json")], "no such layers file"),
        (["gpt2-tiny", "--layers", str(tmp_path / "bad.json")], "cannot parse"),
        (["gpt2-tiny", "--dtype", "int8"], "--dtype must be one of"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["convert", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    result = runner.invoke(app, ["info", str(tmp_path / "exists")])
    assert result.exit_code == 2 and "no blr_config.json" in result.output


def test_tables_are_not_cut_when_output_is_not_a_terminal(tmp_path, monkeypatch):
    """In a pipe or a CI log (the runner's output is not a terminal) a table is as wide as its content: rich would
    cut it at 80 columns, or at a COLUMNS a CI sets, and a layer name would end in an ellipsis."""
    monkeypatch.setenv("COLUMNS", "80")
    names = [f"transformer.h.{i}.{layer}" for i in (0, 1) for layer in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    plan = runner.invoke(app, ["convert", "gpt2-tiny", "--dry-run"])
    out = tmp_path / "out"
    convert = runner.invoke(app, ["convert", "gpt2-tiny", "--steps", "2", "-o", str(out)])
    info = runner.invoke(app, ["info", str(out), "--verify"])
    for result in (plan, convert, info):
        assert result.exit_code == 0, result.output
        assert all(name in result.output for name in names), result.output
        assert "…" not in result.output, result.output
