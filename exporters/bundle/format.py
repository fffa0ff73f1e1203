"""The bundle format: its constants and file layout, the manifest (with the sha256 of every file and its own), the
archive, and opening and checking a bundle. What every other module of the package reads and writes by."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from blrdeploy.conversion.checkpoint import read_format_file
from blrdeploy.files import atomic_file, atomic_write_text, file_sha256
from blrdeploy.measure import devices

# 2: the manifest carries its own checksum; 3: the grouped GEMM takes a norm's row scale and BLAST layers with
# b_out <= 4 run fused V+S above 64 tokens, so a version-2 bundle lacks kernels this launcher asks for; 4: the
# many-token S mix walks token tiles (a STAGES constexpr) in tiles chosen by N, which a version-3 bundle lacks
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
SELF_SUM = "manifest_sha256"  # the manifest's own checksum, over its canonical JSON without this field
CHECKPOINT = "checkpoint"
SAMPLE_INPUT, SAMPLE_EXPECTED = "sample/input.safetensors", "sample/expected.safetensors"
ONNX_FILE = "onnx/model.onnx"


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, truncated, of another format, or for another GPU."""


class ChecksumError(BundleError):
    """A file of the bundle does not match the checksum its manifest records."""


def kernels_dir(arch: int) -> str:
    """Where the cubins for one architecture live, relative to the bundle."""
    return f"kernels/sm_{arch}"


def spec_stem(spec) -> str:
    """The file name (without .cubin / .json) of a kernel specialization: named by its content, so a retune that
    keeps a spec keeps its files."""
    digest = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec.kernel}-{digest}"


# ------------------------------------------------------------------------------------------------ writing


def canonical_sum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(root: Path, manifest: dict, leaving: set[str] = frozenset()) -> None:
    """Checksums every file under root (but the manifest and those ``leaving``), fsyncs them, then writes
    manifest.json with its own checksum in one atomic replace: the single commit point of a bundle."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
        and p.relative_to(root).as_posix() not in leaving
    )  # fmt: skip
    for p in files:
        with p.open("rb") as f:
            os.fsync(f.fileno())
    manifest["files"] = {p.relative_to(root).as_posix(): file_sha256(p) for p in files}
    manifest[SELF_SUM] = canonical_sum(manifest)
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def archive_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".tar.gz")


def make_archive(bundle: Path) -> Path:
    """BUNDLE.tar.gz beside the directory, written atomically; members are under ``BUNDLE/``."""
    bundle = Path(bundle)
    dest = archive_path(bundle)
    with atomic_file(dest) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name)
    return dest


def is_archive_of(archive: Path, bundle: Path) -> bool:
    """Whether ``archive`` is one :func:`make_archive` wrote of a bundle named as ``bundle``: every member under
    ``BUNDLE/`` and a manifest among them. Only such a file may be removed when the bundle it copied is replaced."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return False
    top = bundle.name
    return f"{top}/{MANIFEST}" in names and all(n == top or n.startswith(f"{top}/") for n in names)


# ------------------------------------------------------------------------------------------------ reading


def _extract(archive: Path) -> Path:
    """Extracts a bundle archive into a temporary directory (removed at exit) and returns the folder holding its
    manifest (the archive's one top folder, or its root). A truncated or corrupt archive, or a member that is not
    a plain file or folder inside it, is a BundleError."""
    tmp = Path(tempfile.mkdtemp(prefix="blrdeploy-bundle-"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            for m in tar.getmembers():
                parts = [p for p in PurePosixPath(m.name).parts if p != "."]
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise BundleError(f"{archive}: member {m.name!r} is not a plain file inside the bundle folder")
                if parts:
                    members.append(m)
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)  # noqa: S202 (members checked above)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{archive} is truncated or corrupt: {type(e).__name__}: {e}") from None
    if (tmp / MANIFEST).is_file():
        return tmp
    found = [d for d in tmp.iterdir() if (d / MANIFEST).is_file()]
    if len(found) != 1:
        raise BundleError(f"{archive} holds no bundle: no {MANIFEST} at its root or in one top folder")
    return found[0]


def open_bundle(path: str | Path) -> tuple[Path, dict]:
    """(bundle directory, manifest) of a bundle directory or archive; checks the format, not the checksums."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"no such bundle: {path}")
    if path.is_file():
        path = _extract(path)
    try:
        manifest = read_format_file(
            path / MANIFEST, "a blrdeploy bundle", FORMAT_VERSION, (), BundleError
        )  # a manifest that does not parse: unusable (exit 2), not a bundle whose files failed a check
    except BundleError as exc:
        if "format version" in str(exc):
            raise BundleError(f"{exc}: package the checkpoint again with this blrdeploy") from None
        raise
    if manifest.get(SELF_SUM) != canonical_sum(manifest):  # before trusting any field of it
        raise ChecksumError(f"{MANIFEST} does not match its own checksum: the manifest was changed or corrupted")
    for key in ("target", "dtype", "files", "kernels", "launch_configs", "checkpoint", "sample", "buckets"):
        if key not in manifest:
            raise BundleError(f"{path / MANIFEST} lacks the {key!r} field")
    return path, manifest


def bundle_files(path: Path) -> set[str]:
    """The files the bundle at ``path`` holds by its own manifest (a BundleError when ``path`` is not a bundle of
    ours, or its manifest was changed): what ``package --overwrite`` may replace."""
    root, manifest = open_bundle(path)
    return {MANIFEST, *manifest["files"]}


def verify_files(root: Path, manifest: dict) -> int:
    """Every file the manifest lists has its recorded sha256, and the manifest its own; returns the file count.
    Raises ChecksumError naming the first file that differs or is missing."""
    if manifest.get(SELF_SUM) != canonical_sum(manifest):
        raise ChecksumError(f"{MANIFEST} does not match its own checksum: the manifest was changed or corrupted")
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise ChecksumError(f"{rel} is missing from the bundle")
        if file_sha256(p) != digest:
            raise ChecksumError(f"{rel} does not match its sha256 in the manifest: corrupted or modified")
    return len(manifest["files"])


def read_listed(root: Path, manifest: dict, rel: str) -> bytes:
    """A file's bytes, checked against the manifest (which must list it): what is launched is what was verified."""
    digest = manifest["files"].get(rel)
    if digest is None:
        raise ChecksumError(f"{rel} is named by the manifest's kernels but not among its checksummed files")
    try:
        data = (root / rel).read_bytes()
    except OSError:
        raise ChecksumError(f"{rel} is missing from the bundle") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumError(f"{rel} does not match its sha256 in the manifest: corrupted or modified")
    return data


def target_of(manifest: dict) -> devices.Device:
    try:
        return devices.Device.from_json(manifest["target"], "the bundle's target")
    except (TypeError, ValueError) as e:
        raise BundleError(str(e)) from None
