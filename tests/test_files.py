"""blrdeploy.files: the one output check, the one --overwrite rule, atomic writes with the umask's permissions."""

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blrdeploy import files
from blrdeploy.cli import app
from blrdeploy.exporters.bundle.format import is_archive_of

runner = CliRunner()
USER_TEXT = "the user's own file\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_check_output_file_refuses_before_any_work(tmp_path):
    (tmp_path / "afile").write_text(USER_TEXT)
    (tmp_path / "kept.json").write_text(USER_TEXT)
    cases = {
        tmp_path: "is a directory",
        tmp_path / "kept.json": "already exists; pass --overwrite",
        tmp_path / "afile" / "out.json": "is a file, not a folder",
        tmp_path / "afile" / "deeper" / "out.json": "is a file, not a folder",
    }
    for path, said in cases.items():
        with pytest.raises(files.OutputError, match=said):
            files.check_output_file(path, overwrite=False)
    with pytest.raises(files.OutputError, match=r"must end in \.png"):
        files.check_output_file(tmp_path / "figure.txt", overwrite=True, option="--png", suffixes=(".png",))
    files.check_output_file(tmp_path / "kept.json", overwrite=True)  # asked for: allowed
    files.check_output_file(tmp_path / "new" / "folders" / "out.json", overwrite=False)  # made by the write
    assert (tmp_path / "kept.json").read_text() == USER_TEXT and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_file_refuses_a_folder_it_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(files.OutputError, match="is not writable"):
        files.check_output_file(locked / "out.json", overwrite=False)


def test_atomic_writes_have_the_umask_permissions_not_a_temp_files(tmp_path, umask_027):
    files.atomic_write_text(tmp_path / "a.json", "{}")
    with files.atomic_file(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    with files.atomic_directory(tmp_path / "d", False, lambda p: set(), "ours") as d:
        fd = os.open(d / "secret", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors writes
        os.close(fd)
    assert _mode(tmp_path / "a.json") == 0o640 and _mode(tmp_path / "b.bin") == 0o640
    assert _mode(tmp_path / "d" / "secret") == 0o640 and _mode(tmp_path / "d") == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "d"]  # no temp left


def test_failed_writes_remove_the_folders_they_made_and_keep_the_old_file(tmp_path):
    (tmp_path / "kept.json").write_text(USER_TEXT)
    with pytest.raises(RuntimeError), files.atomic_file(tmp_path / "kept.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), files.atomic_file(tmp_path / "new" / "deep" / "x.png"):
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), files.atomic_directory(tmp_path / "n" / "out", False, set, "ours"):
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]
    assert (tmp_path / "kept.json").read_text() == USER_TEXT


def test_only_an_archive_of_the_bundle_counts_as_one(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "kernels").mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    (bundle / "kernels" / "k.cubin").write_bytes(b"\0")
    ours = tmp_path / "ours.tar.gz"
    with tarfile.open(ours, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    users = tmp_path / "users.tar.gz"
    with tarfile.open(users, "w:gz") as tar:
        tar.add(bundle / "kernels", arcname="bundle/kernels")
        tar.add(tmp_path / "ours.tar.gz", arcname="elsewhere.tar.gz")
    (tmp_path / "text.tar.gz").write_text(USER_TEXT)
    assert is_archive_of(ours, bundle)
    assert not is_archive_of(ours, tmp_path / "other")  # another bundle's name
    assert not is_archive_of(users, bundle) and not is_archive_of(tmp_path / "text.tar.gz", bundle)


def test_package_archive_never_replaces_a_users_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = runner.invoke(app, ["convert", "gpt2-tiny", "--structure", "lowrank", "--steps", "2", "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    user_tar = tmp_path / "out.tar.gz"
    user_tar.write_text(USER_TEXT)
    for extra in ([], ["--overwrite"]):
        args = ["package", str(ckpt), "--target", "jetson", "-o", str(tmp_path / "out"), "--archive", *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and "out.tar.gz" in result.output, result.output
    assert user_tar.read_text() == USER_TEXT and not (tmp_path / "out").exists()


def test_overwrite_lets_a_command_replace_its_file_output(tmp_path):
    """Without --overwrite the sweep (tests/cli/test_sweep.py) shows each refusing; with it, each replaces."""
    ckpt = tmp_path / "ckpt"
    result = runner.invoke(app, ["convert", "gpt2-tiny", "--structure", "lowrank", "--steps", "2", "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    bench = ["--device", "cpu", "--modes", "eager", "--no-decode", "--budget", "0.01", "--batch", "1", "--seq", "8"]
    outputs = {
        "bench": (["bench", str(ckpt), *bench, "-o"], "out/b.json"),
        "run": (["run", str(ckpt), "--device", "cpu", "--dtype", "float32", "--repeat", "0", "--output"], "out/r.st"),
    }
    for name, (args, rel) in outputs.items():
        out = tmp_path / rel
        result = runner.invoke(app, [*args, str(out)])  # a missing folder is made
        assert result.exit_code == 0, (name, result.output)
        first = out.read_bytes()
        out.write_text(USER_TEXT)
        result = runner.invoke(app, [*args, str(out), "--overwrite"])
        assert result.exit_code == 0, (name, result.output)
        assert out.read_bytes() != USER_TEXT.encode() and len(out.read_bytes()) > 0, name
        if name == "bench":
            assert json.loads(out.read_text())["model"] == json.loads(first)["model"]
