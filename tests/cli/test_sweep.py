"""The bad-input sweep of #24: every command x {missing path, empty dir, corrupt file, existing output, unwritable
output} ends in exit code 2 and one ``error:`` line, with no traceback and nothing written (a user file given as
the output survives unchanged).

Only the combinations that apply to a command are swept: a command without an output has no output cases. Inputs
are cheap stand-ins built per test; the one valid checkpoint (gpt2-tiny, lowrank) is built once per module. No
valid bundle is built (too slow for CI), so ``tune``, ``verify-bundle`` and ``run --bundle`` have no output cases
that need one (they have none anyway: tune writes in place, verify-bundle writes nothing)."""

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blrdeploy.cli import app

runner = CliRunner()

USER_TEXT = "the user's own file\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny real checkpoint, for the cases whose input must be valid to reach the output check."""
    path = tmp_path_factory.mktemp("sweep") / "ckpt"
    result = runner.invoke(app, ["convert", "gpt2-tiny", "--structure", "lowrank", "--steps", "2", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _inputs(tmp: Path, ckpt: Path) -> dict[str, str]:
    """The bad inputs (and the one good one) a case's arguments name as ``{key}``."""
    (tmp / "empty").mkdir()
    (tmp / "afile").write_text(USER_TEXT)  # a regular file: no path under it can be written, even by root
    (tmp / "garbage.safetensors").write_bytes(b"\x00garbage, not a tensor file\xff" * 4)
    (tmp / "garbage.onnx").write_bytes(b"\x00garbage, not an onnx model\xff" * 4)
    (tmp / "corrupt_ckpt").mkdir()
    (tmp / "corrupt_ckpt" / "blr_config.json").write_text("{not json")
    (tmp / "corrupt_ckpt" / "model.safetensors").write_bytes(b"\x00garbage")
    (tmp / "corrupt_model").mkdir()  # a Hugging Face model directory whose config.json is not JSON
    (tmp / "corrupt_model" / "config.json").write_text("{not json")
    (tmp / "corrupt_bundle").mkdir()
    (tmp / "corrupt_bundle" / "manifest.json").write_text("{not json")
    (tmp / "user_dir").mkdir()  # the user's own folder given as an output
    (tmp / "user_dir" / "keep.txt").write_text(USER_TEXT)
    (tmp / "user_file.txt").write_text(USER_TEXT)  # the user's own file given as an output
    (tmp / "user_figure.png").write_text(USER_TEXT)  # the same, named as roofline --png accepts
    return {
        "missing": str(tmp / "missing"),
        "empty": str(tmp / "empty"),
        "garbage": str(tmp / "garbage.safetensors"),
        "garbage_onnx": str(tmp / "garbage.onnx"),
        "corrupt_ckpt": str(tmp / "corrupt_ckpt"),
        "corrupt_model": str(tmp / "corrupt_model"),
        "corrupt_bundle": str(tmp / "corrupt_bundle"),
        "user_dir": str(tmp / "user_dir"),
        "user_file": str(tmp / "user_file.txt"),
        "user_png": str(tmp / "user_figure.png"),
        "unwritable": str(tmp / "afile" / "out"),
        "fresh": str(tmp / "fresh_out"),  # a good output path: the input cases must stop before writing it
        "ckpt": str(ckpt),
    }


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` with a digest of its content: what 'nothing written' compares."""
    tree = {}
    for root in roots:
        for p in root.rglob("*"):
            tree[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return tree


# Cheap settings for commands that would otherwise do real work once past their checks.
BENCH = ["--device", "cpu", "--modes", "eager", "--no-decode", "--budget", "0.01", "--batch", "1", "--seq", "8"]
CONVERT = ["--structure", "lowrank", "--steps", "2", "--device", "cpu"]
RUN = ["--device", "cpu", "--dtype", "float32", "--repeat", "0"]
HEAL = ["--data", "{garbage}", "--device", "cpu", "--steps", "1"]

CASES = [
    # factorize: its one input is --weights
    pytest.param(["factorize", "--weights", "{missing}"], id="factorize-missing_path"),
    pytest.param(["factorize", "--weights", "{empty}"], id="factorize-empty_dir"),
    pytest.param(["factorize", "--weights", "{garbage}"], id="factorize-corrupt_file"),
    # convert MODEL -o OUT
    pytest.param(["convert", "{missing}", *CONVERT, "-o", "{fresh}"], id="convert-missing_path"),
    pytest.param(["convert", "{empty}", *CONVERT, "-o", "{fresh}"], id="convert-empty_dir"),
    pytest.param(["convert", "{corrupt_model}", *CONVERT, "-o", "{fresh}"], id="convert-corrupt_file"),
    pytest.param(["convert", "gpt2-tiny", *CONVERT, "-o", "{user_dir}"], id="convert-existing_output_dir"),
    pytest.param(["convert", "gpt2-tiny", *CONVERT, "-o", "{user_file}"], id="convert-existing_output_file"),
    pytest.param(
        ["convert", "gpt2-tiny", *CONVERT, "-o", "{unwritable}"],
        id="convert-unwritable_output",
    ),
    # info CKPT
    pytest.param(["info", "{missing}"], id="info-missing_path"),
    pytest.param(["info", "{empty}"], id="info-empty_dir"),
    pytest.param(["info", "{corrupt_ckpt}"], id="info-corrupt_file"),
    # export CKPT -o OUT (no command's output in a missing folder is swept: every command makes the folder)
    pytest.param(["export", "{missing}", "-o", "{fresh}"], id="export-missing_path"),
    pytest.param(["export", "{empty}", "-o", "{fresh}"], id="export-empty_dir"),
    pytest.param(["export", "{corrupt_ckpt}", "-o", "{fresh}"], id="export-corrupt_file"),
    pytest.param(["export", "{ckpt}", "-o", "{user_dir}"], id="export-existing_output_dir"),
    pytest.param(["export", "{ckpt}", "-o", "{user_file}"], id="export-existing_output_file"),
    pytest.param(["export", "{ckpt}", "-o", "{unwritable}"], id="export-unwritable_output"),
    # validate CKPT --onnx ONNX
    pytest.param(["validate", "{missing}"], id="validate-missing_path"),
    pytest.param(["validate", "{empty}"], id="validate-empty_dir"),
    pytest.param(["validate", "{corrupt_ckpt}"], id="validate-corrupt_file"),
    pytest.param(["validate", "{ckpt}", "--against", "onnx", "--onnx", "{missing}"], id="validate-onnx_missing_path"),
    pytest.param(["validate", "{ckpt}", "--against", "onnx", "--onnx", "{empty}"], id="validate-onnx_empty_dir"),
    pytest.param(
        ["validate", "{ckpt}", "--against", "onnx", "--onnx", "{garbage_onnx}"], id="validate-onnx_corrupt_file"
    ),
    # bench MODEL -o OUT
    pytest.param(["bench", "{missing}", *BENCH, "-o", "{fresh}"], id="bench-missing_path"),
    pytest.param(["bench", "{empty}", *BENCH, "-o", "{fresh}"], id="bench-empty_dir"),
    pytest.param(["bench", "{corrupt_ckpt}", *BENCH, "-o", "{fresh}"], id="bench-corrupt_file"),
    pytest.param(["bench", "{ckpt}", *BENCH, "-o", "{user_dir}"], id="bench-existing_output_dir"),
    pytest.param(
        ["bench", "{ckpt}", *BENCH, "-o", "{user_file}"],
        id="bench-existing_output_file",
    ),
    pytest.param(["bench", "{ckpt}", *BENCH, "-o", "{unwritable}"], id="bench-unwritable_output"),
    # package CKPT -o OUT --target jetson
    pytest.param(["package", "{missing}", "--target", "jetson", "-o", "{fresh}"], id="package-missing_path"),
    pytest.param(["package", "{empty}", "--target", "jetson", "-o", "{fresh}"], id="package-empty_dir"),
    pytest.param(["package", "{corrupt_ckpt}", "--target", "jetson", "-o", "{fresh}"], id="package-corrupt_file"),
    pytest.param(["package", "{ckpt}", "--target", "jetson", "-o", "{user_dir}"], id="package-existing_output_dir"),
    pytest.param(["package", "{ckpt}", "--target", "jetson", "-o", "{user_file}"], id="package-existing_output_file"),
    pytest.param(
        ["package", "{ckpt}", "--target", "jetson", "-o", "{unwritable}"],
        id="package-unwritable_output",
    ),
    # verify-bundle BUNDLE
    pytest.param(["verify-bundle", "{missing}"], id="verify-bundle-missing_path"),
    pytest.param(["verify-bundle", "{empty}"], id="verify-bundle-empty_dir"),
    pytest.param(
        ["verify-bundle", "{corrupt_bundle}"],
        id="verify-bundle-corrupt_file",
    ),
    # eval MODEL --data TEXT (writes nothing: no output cases; the checkpoint here has no tokenizer, so its --data
    # cases stop at that, one line too: tests/cli/test_eval.py sweeps bad text on a model that has one)
    pytest.param(["eval", "{missing}", "--data", "{garbage}"], id="eval-missing_path"),
    pytest.param(["eval", "{empty}", "--data", "{garbage}"], id="eval-empty_dir"),
    pytest.param(["eval", "{corrupt_ckpt}", "--data", "{garbage}"], id="eval-corrupt_file"),
    pytest.param(["eval", "{ckpt}", "--data", "{missing}", "--device", "cpu"], id="eval-data_missing_path"),
    pytest.param(["eval", "{ckpt}", "--data", "{empty}", "--device", "cpu"], id="eval-data_empty_dir"),
    pytest.param(["eval", "{ckpt}", "--data", "{garbage}", "--device", "cpu"], id="eval-data_corrupt_file"),
    # heal CKPT --data TEXT -o OUT (the checkpoint has no tokenizer: the output cases must stop before the text)
    pytest.param(["heal", "{missing}", *HEAL, "-o", "{fresh}"], id="heal-missing_path"),
    pytest.param(["heal", "{empty}", *HEAL, "-o", "{fresh}"], id="heal-empty_dir"),
    pytest.param(["heal", "{corrupt_ckpt}", *HEAL, "-o", "{fresh}"], id="heal-corrupt_file"),
    pytest.param(["heal", "{ckpt}", *HEAL, "-o", "{user_dir}"], id="heal-existing_output_dir"),
    pytest.param(["heal", "{ckpt}", *HEAL, "-o", "{user_file}"], id="heal-existing_output_file"),
    pytest.param(["heal", "{ckpt}", *HEAL, "-o", "{unwritable}"], id="heal-unwritable_output"),
    pytest.param(["heal", "{ckpt}", "--data", "{missing}", "--device", "cpu", "-o", "{fresh}"], id="heal-data_missing"),
    # tune --bundle BUNDLE
    pytest.param(["tune", "--bundle", "{missing}"], id="tune-missing_path"),
    pytest.param(["tune", "--bundle", "{empty}"], id="tune-empty_dir"),
    pytest.param(["tune", "--bundle", "{corrupt_bundle}"], id="tune-corrupt_file"),
    # run CKPT | --bundle BUNDLE, --output OUT
    pytest.param(["run", "{missing}", *RUN, "--output", "{fresh}"], id="run-missing_path"),
    pytest.param(["run", "{empty}", *RUN, "--output", "{fresh}"], id="run-empty_dir"),
    pytest.param(["run", "{corrupt_ckpt}", *RUN, "--output", "{fresh}"], id="run-corrupt_file"),
    pytest.param(["run", "--bundle", "{missing}", "--device", "cpu"], id="run-bundle_missing_path"),
    pytest.param(["run", "--bundle", "{empty}", "--device", "cpu"], id="run-bundle_empty_dir"),
    pytest.param(["run", "--bundle", "{corrupt_bundle}", "--device", "cpu"], id="run-bundle_corrupt_file"),
    pytest.param(["run", "{ckpt}", *RUN, "--input", "{missing}"], id="run-input_missing_path"),
    pytest.param(["run", "{ckpt}", *RUN, "--input", "{garbage}"], id="run-input_corrupt_file"),
    pytest.param(["run", "{ckpt}", *RUN, "--output", "{user_dir}"], id="run-existing_output_dir"),
    pytest.param(
        ["run", "{ckpt}", *RUN, "--output", "{user_file}"],
        id="run-existing_output_file",
    ),
    pytest.param(["run", "{ckpt}", *RUN, "--output", "{unwritable}"], id="run-unwritable_output"),
    # roofline MODEL --target jetson --png PNG
    pytest.param(["roofline", "{missing}", "--target", "jetson"], id="roofline-missing_path"),
    pytest.param(["roofline", "{empty}", "--target", "jetson"], id="roofline-empty_dir"),
    pytest.param(["roofline", "{corrupt_ckpt}", "--target", "jetson"], id="roofline-corrupt_file"),
    pytest.param(
        ["roofline", "{ckpt}", "--target", "jetson", "--png", "{user_dir}"], id="roofline-existing_output_dir"
    ),
    pytest.param(
        ["roofline", "{ckpt}", "--target", "jetson", "--png", "{user_png}"],
        id="roofline-existing_output_file",
    ),
    pytest.param(
        ["roofline", "{ckpt}", "--target", "jetson", "--png", "{unwritable}"], id="roofline-unwritable_output"
    ),
    pytest.param(["roofline", "{ckpt}", "--target", "jetson", "--png", "{user_file}"], id="roofline-output_not_png"),
]


@pytest.mark.parametrize("args", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, ckpt, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a default output or stray file would land here and be seen
    paths = _inputs(tmp_path, ckpt)
    before = _snapshot(tmp_path, ckpt)

    result = runner.invoke(app, [a.format(**paths) for a in args])

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # ended itself: no escaped exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert _snapshot(tmp_path, ckpt) == before  # nothing written, the user's files unchanged
