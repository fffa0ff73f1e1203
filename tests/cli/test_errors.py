"""One line and exit code 2, never a traceback, for what a user can act on: a full disk (safetensors' SafetensorError
and the OSError of any other write), a missing optional package, no CUDA GPU; and nothing written when a write
fails (#24 items 7, 8, 9). The mapping itself is ``blrdeploy.cli.common.error_line``."""

import errno
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

import blrdeploy
from blrdeploy import files
from blrdeploy.cli import app
from blrdeploy.cli import bundle as bundle_cli
from blrdeploy.cli import convert as convert_cli
from blrdeploy.cli.common import error_line
from blrdeploy.conversion import checkpoint
from blrdeploy.exporters.bundle import run as bundle_run
from blrdeploy.measure import bench

runner = CliRunner()

# What safetensors raises when the disk fills during save_file (seen on a 1 MB tmpfs).
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def assert_one_line(result, message: str, code: int = 2) -> None:
    """The command ended itself with ``error: message`` as its only error line: no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not an escaped exception
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [f"error: {message}"]


def _tiny_checkpoint(path: Path) -> Path:
    checkpoint.save(bench.resolve("gpt2-tiny", dtype=torch.float32).variants[1].build(), path)
    return path


# ------------------------------------------------------------------------------------------------ item 7: disk full


def test_convert_on_a_full_disk_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """Either write of a conversion failing for want of space (the weights through safetensors, blr_config.json
    through Path.write_text) ends in one line naming the output; no partial directory, nor the folder made for it,
    is left."""
    out = tmp_path / "made" / "out"
    before = _tree(tmp_path)

    def full_safetensors(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    write_text = Path.write_text

    def full_blr_config(self, *args, **kwargs):
        if self.name == checkpoint.BLR_CONFIG:
            raise OSError(errno.ENOSPC, "No space left on device")  # a failed write names no file
        return write_text(self, *args, **kwargs)

    for target, writer in [(checkpoint, ("save_file", full_safetensors)), (Path, ("write_text", full_blr_config))]:
        with monkeypatch.context() as m:
            m.setattr(target, *writer)
            result = runner.invoke(app, ["convert", "gpt2-tiny", "--steps", "2", "-o", str(out)])
        assert_one_line(result, f"cannot write {out}: No space left on device")
        assert _tree(tmp_path) == before, writer[0]


def test_run_output_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(bundle_run, "save_file", full)
    out = tmp_path / "o.safetensors"
    result = runner.invoke(app, ["run", str(ckpt), "--device", "cpu", "--repeat", "0", "--output", str(out)])
    assert_one_line(result, f"cannot write {out}: No space left on device")


def test_failed_writes_name_the_file_asked_for(tmp_path, monkeypatch):
    """Not a hidden temp file: atomic_write_text's rename, a file inside atomic_directory's temp directory."""
    target = tmp_path / "manifest.json"

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", src, dst)

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", full)
        with pytest.raises(OSError) as caught:
            files.atomic_write_text(target, "{}")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert _tree(tmp_path) == []  # the temp file went too
    out = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        with files.atomic_directory(out, False, checkpoint.checkpoint_files, checkpoint.CHECKPOINT) as tmp:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp / "sub" / "w.bin"))
    assert (caught.value.errno, caught.value.filename) == (errno.EDQUOT, str(out / "sub" / "w.bin"))
    assert _tree(tmp_path) == []


def test_error_line_maps_what_users_can_act_on_and_nothing_else():
    """The one place: ValueErrors (their first line), the operating system's errors, safetensors', a missing
    optional package (with the extra that installs it), torch's no-GPU errors; None (a defect, its traceback
    kept) for the rest."""
    assert error_line(ValueError("first\nsecond")) == "first"
    assert error_line(OSError(errno.ENOSPC, "No space left on device", "out")) == (
        "cannot write out: No space left on device"
    )
    assert error_line(OSError(errno.ENOSPC, "No space left on device")) == (
        "cannot write the output: No space left on device"
    )
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "x.json")) == "x.json: Permission denied"
    assert error_line(SafetensorError(DISK_FULL)) == "cannot write the output: No space left on device"
    assert error_line(SafetensorError("Error while deserializing header: HeaderTooLarge")) == (
        "safetensors: Error while deserializing header: HeaderTooLarge"
    )
    missing = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    assert error_line(missing) == "this needs the matplotlib package: pip install 'blrdeploy[plot]'"
    assert error_line(ModuleNotFoundError("No module named 'blrdeploy.nothing'", name="blrdeploy.nothing")) is None
    assert error_line(AssertionError("Torch not compiled with CUDA enabled")) == "no CUDA GPU is available"
    for defect in (AssertionError("shapes differ"), RuntimeError("boom"), KeyError("x"), TypeError("t")):
        assert error_line(defect) is None, defect


def test_commands_keep_their_interrupt_message_and_defects_their_traceback(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_cli, "convert_job", interrupted)
    result = runner.invoke(app, ["convert", "gpt2-tiny", "-o", str(tmp_path / "out")])
    assert_one_line(result, "interrupted: nothing was written", code=130)

    def defect(*args, **kwargs):
        raise ValueError("a defect: not a RunError")

    monkeypatch.setattr(bundle_cli.bundle, "run_model", defect)  # run's user errors are RunErrors; the rest defects
    result = runner.invoke(app, ["run", str(tmp_path), "--device", "cpu"])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


# ------------------------------------------------------------------------------------------------ item 8: no [hf]


def test_builtin_models_without_transformers_say_how_to_install_it(tmp_path, monkeypatch):
    """Installed without the [hf] extra, a built-in model's config cannot be built: every command that builds one
    says so in one line, as the checkpoint paths do, and writes nothing."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails as if not installed
    monkeypatch.chdir(tmp_path)  # the default convert writes ./gpt2-mini-blast
    hint = "this model needs the transformers package: pip install 'blrdeploy[hf]'"
    for args in (
        ["convert"],  # the default model, gpt2-mini
        ["convert", "--dry-run"],
        ["convert", "gpt2-tiny", "--dry-run", "--json"],
        ["bench", "gpt2-tiny", "--device", "cpu"],
        ["roofline", "gpt2-tiny", "--target", "jetson"],
    ):
        assert_one_line(runner.invoke(app, args), hint)
    assert _tree(tmp_path) == []


# ------------------------------------------------------------------------------------------------ item 9: no CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine with no GPU")
def test_load_on_cuda_without_a_gpu_is_one_line(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(blrdeploy.CheckpointError, match="no CUDA GPU is available") as caught:
        blrdeploy.load(ckpt, device="cuda")
    assert "\n" not in str(caught.value)
    with pytest.raises(blrdeploy.CheckpointError, match="no CUDA GPU is available"):
        blrdeploy.load(ckpt, device=torch.device("cuda", 0), dtype=torch.bfloat16)
