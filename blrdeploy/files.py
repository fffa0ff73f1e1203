"""The user's files: one output check before any work, one rule for --overwrite, and atomic writes.

Every command that writes goes through here, so each of them answers a bad output path the same way and before
minutes of work: an existing file or folder is replaced only with --overwrite, a folder only when it is ours (its
own manifest lists every file in it), a path under a file or in a folder that cannot be written is refused, and
missing folders are made (and removed again if the write fails). What is written appears whole or not at all, with
the permissions the user's umask gives a new file (not the 0600 of a temp file).

The lowest room beside ``version``: kernels save tables, conversion checkpoints, exporters bundles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from safetensors import SafetensorError


class OutputError(ValueError):
    """An output the command must not or cannot write: one line for the user, raised before any work."""


# ------------------------------------------------------------------------------------------------ checks


def check_output_file(path: str | Path, overwrite: bool, option: str = "--output", suffixes: tuple = ()) -> Path:
    """Refuses, before any work, a file output that cannot or must not be written: a directory, an existing file
    without ``overwrite``, a name without one of ``suffixes`` (the format is chosen by it), a path under a file or
    in a folder that is not writable. Missing folders are fine: the write makes them."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory: give a file path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    check_parent(path)
    return path


def check_output_dir(path: str | Path, overwrite: bool, owned_files: Callable[[Path], Collection[str]], what: str):
    """Refuses, before any work, a directory output that must not be replaced: an existing one without
    ``overwrite``, and even then anything but an empty directory or one of ours, whose own manifest (read by
    ``owned_files``, a ValueError when it is not ours) lists every file in it. A name alone proves nothing: a mistyped
    -o never deletes a user's folder or a file the user kept in ours."""
    path = Path(path)
    check_parent(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a directory")
    if not overwrite:
        raise OutputError(f"output directory {path} already exists; pass --overwrite to replace it")
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    if not files and not any(path.iterdir()):
        return
    try:
        owned = set(owned_files(path))
    except ValueError:
        raise OutputError(f"refusing to overwrite {path}: it is neither empty nor {what}") from None
    strangers = [f for f in files if f not in owned]
    strangers += [  # empty folders are the user's too
        d.relative_to(path).as_posix() + "/"
        for d in path.rglob("*")
        if d.is_dir() and not any(f.startswith(d.relative_to(path).as_posix() + "/") for f in files)
    ]
    if strangers:
        shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        raise OutputError(f"refusing to overwrite {path}: it holds {shown}, which {what} does not list")


def check_parent(path: str | Path) -> None:
    """The nearest existing folder above ``path`` is a folder we may write in (missing ones below it get made)."""
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write {path}: the folder {parent} is not writable")
            return


# ------------------------------------------------------------------------------------------------ writing


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file under the current umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def made_parents(path: Path) -> Iterator[None]:
    """Makes the missing folders above ``path``; removes those it made again when the body fails."""
    made = [p for p in path.parents if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                folder.rmdir()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` in one rename (fsynced file and folder): readers see the old or the new
    file, and a failed write leaves the old one, with no temp file or made folder behind."""
    path = Path(path)
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:  # the rename itself is durable before anything that relies on it (retune deletes old files next)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside ``path`` for a writer that wants a file name (tarfile, matplotlib, torch.save);
    on success it replaces ``path`` in one rename, on any error it is removed and ``path`` left as it was."""
    path = Path(path)
    with made_parents(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
        os.close(fd)
        try:
            os.chmod(tmp, new_file_mode())
            yield Path(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_directory(
    path: str | Path, overwrite: bool, owned_files: Callable[[Path], Collection[str]], what: str
) -> Iterator[Path]:
    """Yields a temp directory beside ``path``; on success it replaces ``path`` in one rename, on any error
    (Ctrl-C included) it is removed, with any folder made to hold it, and ``path`` is left as it was. ``path`` is
    checked as :func:`check_output_dir` does. A failed write (disk full; safetensors' SafetensorError too) is
    raised as an OSError naming ``path`` or the file in it, never the temp directory."""
    path = Path(path)
    check_output_dir(path, overwrite, owned_files, what)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    with made_parents(path):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            mode = new_file_mode()
            for f in tmp.rglob("*"):
                if f.is_file():
                    f.chmod(mode)  # as open() would have made it: safetensors and mkstemp write 0600
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
            tmp.chmod(mode | (mode & 0o444) >> 2)  # a folder: searchable wherever readable
            if path.exists():
                path.rename(old)
            tmp.rename(path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not path.exists():  # the swap failed half-way: put the previous output back
                old.rename(path)
            error = _said_of_output(exc, tmp, path)
            if error is None:
                raise
            raise error from exc
    shutil.rmtree(old, ignore_errors=True)


def safetensors_os_error(exc: SafetensorError, filename: str | Path | None = None) -> OSError | None:
    """The OSError inside a SafetensorError (safetensors reports a failed read or write as ``... (os error 28)``),
    about ``filename``; None when the error is not one of the operating system's (a corrupt header, say)."""
    found = re.search(r"\(os error (\d+)\)|code: (\d+)", str(exc))
    if found is None:
        return None
    code = int(found.group(1) or found.group(2))
    return OSError(code, os.strerror(code), None if filename is None else str(filename))


def _said_of_output(exc: BaseException, tmp: Path, path: Path) -> OSError | None:
    """A failed write inside the temp directory as the user should hear it: of the output they named, not of a hidden
    temp file, and with a file at all (a write that finds the disk full names none). None for any other error."""
    if isinstance(exc, SafetensorError) and "serializ" in str(exc):  # a failed write, not a corrupt file read
        exc = safetensors_os_error(exc)
    if not isinstance(exc, OSError):
        return None
    where = path
    if exc.filename is not None:
        try:
            where = path / Path(exc.filename).relative_to(tmp)
        except ValueError:
            return None  # a file outside the output (a source being read): its own name is the right one
    return OSError(exc.errno, exc.strerror or str(exc), str(where))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
