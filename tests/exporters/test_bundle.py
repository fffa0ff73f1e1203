"""Device bundles (``blrdeploy.exporters.bundle``): packaging with no GPU, checksums, archives, the GPU-architecture
check, the verify and run library functions behind the commands, and that the packaged plan
(``blrdeploy.kernels.plan``) serves every token count (the shipped kernels' specializations, run under the
interpreter)."""

import ctypes
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import triton
from helpers import assert_rel_close
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from blrdeploy.cli import app
from blrdeploy.exporters import bundle
from blrdeploy.exporters.bundle import packaging
from blrdeploy.files import file_sha256
from blrdeploy.kernels import Config, ConfigTable, launch, runtime
from blrdeploy.kernels.cubin import CuLaunchAttribute, CuLaunchConfig, pdl_attributes
from blrdeploy.kernels.plan import launcher
from blrdeploy.measure import devices
from blrdeploy.measure.runner import RunError
from blrdeploy.structures.functional import blast_reference, lowrank_reference, monarch_reference

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_kernels():
    """A loaded bundle switches the process's kernels and config table: every test here starts and ends on
    the JIT kernels and the empty table."""
    backend, table = runtime.use(runtime.JitKernels(), None), launch.use_table(ConfigTable())
    yield
    runtime.use(*backend)
    launch.use_table(table)


REFERENCE = {"blast": blast_reference, "monarch": monarch_reference, "lowrank": lowrank_reference}


def _convert(tmp: Path, model: str, structure: str) -> Path:
    layers = tmp / "layers.json"
    layers.write_text(json.dumps({"*": {"num_blocks": 4, "rank": 16}}))
    out = tmp / f"{model}-{structure}"
    args = ["convert", model, "--structure", structure, "--layers", str(layers), "--steps", "5", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """gpt2-tiny BLAST for the Jetson (float16, every bucket, with an archive), llama-tiny Monarch for the A40
    (bfloat16, up to 256 tokens, no ONNX), and llama-tiny low-rank for the A40 in float16 up to 64 tokens."""
    tmp = tmp_path_factory.mktemp("bundles")
    made = {}
    cases = [
        ("jetson", "gpt2-tiny", "blast", ["--archive"]),
        ("a40", "llama-tiny", "monarch", ["--max-tokens", "256", "--no-onnx"]),
        ("a40-lowrank", "llama-tiny", "lowrank", ["--max-tokens", "64", "--no-onnx", "--dtype", "float16"]),
    ]
    for name, model, structure, extra in cases:
        ckpt = _convert(tmp, model, structure)
        out = tmp / f"bundle-{name}"
        target = name.split("-")[0]
        result = runner.invoke(app, ["package", str(ckpt), "--target", target, "-o", str(out), "--json", *extra])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["target"] == target and summary["kernels"] > 0
        made[name] = (ckpt, out)
    return made


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.parametrize("name,arch", [("jetson", 87), ("a40", 86)])
def test_cubins_are_elf_for_the_target(bundles, name, arch):
    _, out = bundles[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["arch"] == arch
    cubins = sorted((out / f"kernels/sm_{arch}").glob("*.cubin"))
    assert len(cubins) == len(manifest["kernels"]) > 0
    for cubin in cubins:
        assert cubin.read_bytes()[:4] == b"\x7fELF", cubin
        dump = subprocess.run([str(_cuobjdump()), "-elf", str(cubin)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert set(re.findall(r"\.target\s+sm_(\d+)", dump.stdout)) == {str(arch)}, dump.stdout[:500]
        descriptor = json.loads(cubin.with_suffix(".json").read_text())
        assert descriptor["arch"] == arch and descriptor["scratch_params"] >= 0
        assert runtime.Spec.from_json(descriptor["spec"]).kernel == descriptor["spec"]["kernel"]


def test_manifest_lists_every_file_and_plan(bundles):
    _, out = bundles["jetson"]
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert manifest["dtype"] == "float16" and manifest["onnx"] == {"file": "onnx/model.onnx"}
    assert manifest["buckets"] == [1, 16, 64, 256, 1024, 4096, 16384]
    assert {"blrdeploy", "torch", "triton"} <= set(manifest["tool_versions"])
    layers = {entry["name"] for entry in manifest["layers"]}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= layers
    for entry in manifest["layers"]:
        plan = manifest["plans"][entry["plan"]]
        assert set(plan) == {f"N{b}" for b in manifest["buckets"]}
        for per_bucket in plan.values():
            assert per_bucket["kernels"] and set(per_bucket["kernels"]) <= set(manifest["kernels"])
            assert all(c["source"] == "heuristic default" for c in per_bucket["configs"].values())
    table = ConfigTable.load(out / manifest["launch_configs"]["file"])
    assert len(table.entries) == sum(manifest["launch_configs"]["sources"].values())


def test_verify_bundle_passes_then_fails_on_any_flipped_byte(bundles, tmp_path):
    _, out = bundles["jetson"]
    result = runner.invoke(app, ["verify-bundle", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checks"][0]["ok"] is True
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    assert len(files) > 10
    for f in files:
        data = bytearray(f.read_bytes())
        original = bytes(data)
        at = len(data) // 2
        data[at] ^= 0x01
        f.write_bytes(bytes(data))
        try:
            result = runner.invoke(app, ["verify-bundle", str(copy)])
            assert result.exit_code in (1, 2), f"{f.relative_to(copy)}: {result.output}"
            assert "passed" not in result.output
        finally:
            f.write_bytes(original)
    assert runner.invoke(app, ["verify-bundle", str(copy)]).exit_code == 0


def test_bundle_of_another_format_version_is_unusable(bundles, tmp_path):
    _, out = bundles["a40"]
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = bundle.FORMAT_VERSION - 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify-bundle", str(old)])
    v = bundle.FORMAT_VERSION
    expected = f"format version {v - 1}; this blrdeploy reads {v}: package the checkpoint again"
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_archive_round_trip_and_truncation(bundles, tmp_path):
    _, out = bundles["jetson"]
    archive = bundle.archive_path(out)
    assert archive.is_file()
    result = runner.invoke(app, ["verify-bundle", str(archive)])
    assert result.exit_code == 0, result.output
    data = archive.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 50):
        truncated = tmp_path / f"cut{cut}.tar.gz"
        truncated.write_bytes(data[:cut])
        result = runner.invoke(app, ["verify-bundle", str(truncated)])
        assert result.exit_code == 2, result.output
        assert "truncated or corrupt" in result.output
        assert "Traceback" not in result.output


def test_archive_of_the_bundle_contents_is_accepted(bundles, tmp_path):
    """An archive made with ``tar -C BUNDLE -czf x.tar.gz .`` (members ./manifest.json, ...) works too."""
    _, out = bundles["jetson"]
    flat = tmp_path / "flat.tar.gz"
    subprocess.run(["tar", "-C", str(out), "-czf", str(flat), "."], check=True)
    result = runner.invoke(app, ["verify-bundle", str(flat)])
    assert result.exit_code == 0, result.output


def test_archive_with_escaping_member_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "x"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../outside")
    with pytest.raises(bundle.BundleError, match="not a plain file inside"):
        bundle.open_bundle(evil)


def test_wrong_gpu_is_refused_naming_both():
    with pytest.raises(bundle.BundleError, match=r"Jetson Orin Nano 8 GB \(sm_87\).*NVIDIA H100 80GB HBM3 \(sm_90\)"):
        bundle.check_gpu(devices.get("jetson"), 90, "NVIDIA H100 80GB HBM3")
    bundle.check_gpu(devices.get("h200"), 90, "NVIDIA H100 80GB HBM3")  # same architecture: accepted


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine with no GPU")
def test_load_bundle_on_cuda_without_gpu(bundles):
    with pytest.raises(bundle.BundleError, match="no CUDA GPU"):
        bundle.load_bundle(bundles["jetson"][1], "cuda")


def test_run_bundle_on_cpu_checks_the_sample(bundles, tmp_path):
    _, out = bundles["jetson"]
    result = runner.invoke(app, ["run", "--bundle", str(out), "--device", "cpu", "--repeat", "1", "--json",
                                 "--output", str(tmp_path / "o.safetensors")])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sample_check"]["ok"] and data["output_shape"] == [1, 16, 128]
    assert data["kernels"] == "PyTorch reference"
    assert load_file(str(tmp_path / "o.safetensors"))["output"].shape == (1, 16, 128)
    assert runner.invoke(app, ["run"]).exit_code == 2  # neither a checkpoint nor --bundle
    refused = runner.invoke(app, ["run", "--bundle", str(out), "--no-fuse-siblings"])
    assert refused.exit_code == 2 and "is for a checkpoint" in refused.output, refused.output


def test_verify_and_run_model_are_library_functions(bundles, tmp_path):
    """What verify-bundle and run print comes from these: the checks with an exit code, and the run's result."""
    ckpt, out = bundles["a40"]
    verified = bundle.verify(out)
    assert verified.code == 0 and verified.error is None and verified.target.name == "a40"
    assert verified.checks[0] == {"check": "checksums", "ok": True, "detail": verified.checks[0]["detail"]}
    missing = bundle.verify(tmp_path / "none")
    assert missing.code == 2 and missing.error == f"no such bundle: {tmp_path / 'none'}" and missing.checks == []
    outcome = bundle.run_model(bundle_dir=out, device="cpu", repeat=0)
    assert outcome.ok and outcome.result["sample_check"]["ok"] and outcome.result["forward_ms"] is None
    assert outcome.result["kernels"] == "PyTorch reference" and outcome.generation is None
    jit = bundle.run_model(ckpt, device="cpu", dtype="float32", repeat=1)
    assert jit.ok and "sample_check" not in jit.result and jit.result["dtype"] == "float32"
    with pytest.raises(RunError, match="--dtype must be one of float16, bfloat16, float32, got 'int8'"):
        bundle.run_model(ckpt, device="cpu", dtype="int8")
    with pytest.raises(RunError, match="--memory-limit caps GPU memory: it needs a CUDA GPU"):
        bundle.run_model(ckpt, device="cpu", memory_limit="8GB")


class _Interpreted:
    """A shipped variant launched under Triton's interpreter with exactly the spec's constexprs and launch
    config: what the cubin would compute, checkable on a CPU."""

    def __init__(self, spec, log):
        self.spec, self.log = spec, log

    def launch(self, grid, args):
        s = self.spec
        self.log.append(s)
        runtime.JitKernels().launch(s.kernel, grid, args, dict(s.constexprs), s.num_warps, s.num_stages, False)


def _shipped_under_interpreter(root: Path, manifest: dict, log: list):
    variants = {}
    for stem in manifest["kernels"]:
        spec = runtime.Spec.from_json(json.loads((root / f"{stem}.json").read_text())["spec"])
        variants[spec] = lambda device, spec=spec: _Interpreted(spec, log)
    return runtime.ShippedKernels(variants, max_tokens=manifest["buckets"][-1])


@pytest.mark.parametrize("name", ["jetson", "a40-lowrank"])
def test_packaged_plan_serves_every_token_count(bundles, name, gen):
    """Every BLR layer shape at token counts across the buckets, planned for the target, finds a shipped
    variant for every launch, and the variants compute the layer (float16, against float64)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the shipped specializations under the interpreter (CPU machines)")
    _, out = bundles[name]
    root, manifest = bundle.open_bundle(out)
    target = bundle.target_of(manifest)
    model, _ = bundle.load_bundle(out, "cpu")
    shapes = set(bundle.layer_shapes(model).values())
    log: list = []
    previous = launch.use_table(ConfigTable.load(root / manifest["launch_configs"]["file"]))
    try:
        with runtime.using(
            _shipped_under_interpreter(root, manifest, log), runtime.Target(target.arch, target.sm_count, target.pdl)
        ):
            for shape in sorted(shapes, key=lambda s: s.key):
                for n in (1, 2, 15, 16, 17, 63, 64, 65, 100):
                    if n > manifest["buckets"][-1]:
                        continue
                    x, *factors, bias = shape.tensors("cpu", torch.float16, n, seed=n)
                    y = launcher(shape.structure)(x, *factors, bias)
                    ref = REFERENCE[shape.structure](x.double(), *(f.double() for f in factors),
                                                     None if bias is None else bias.double())  # fmt: skip
                    assert_rel_close(y, ref, 5e-3, f"{shape.key} N={n}")
    finally:
        launch.use_table(previous)
    assert {s.kernel for s in log} >= {"gemm"}
    assert {s for s in log} <= {runtime.Spec.from_json(json.loads((root / f"{k}.json").read_text())["spec"])
                                for k in manifest["kernels"]}  # fmt: skip


def test_a_launch_no_shipped_kernel_serves_is_a_clear_error(bundles):
    _, out = bundles["a40"]  # Monarch: every launch is the grouped GEMM
    root, manifest = bundle.open_bundle(out)
    target = bundle.target_of(manifest)
    model, _ = bundle.load_bundle(out, "cpu")
    shape = next(iter(bundle.layer_shapes(model).values()))
    kernels = _shipped_under_interpreter(root, manifest, [])
    with runtime.using(kernels, runtime.Target(target.arch, target.sm_count, target.pdl)):
        with launch.forced(gemm=Config(32, 32, 32, 4, 2)):  # a config the bundle was not compiled for
            with pytest.raises(runtime.MissingKernel, match="no compiled kernel for gemm.*--allow-jit"):
                launcher(shape.structure)(*shape.tensors("meta", torch.bfloat16, 1))
            with pytest.raises(runtime.MissingKernel, match="has 1000 tokens, more than the 256 the bundle was"):
                launcher(shape.structure)(*shape.tensors("meta", torch.bfloat16, 1000))


def test_allow_jit_compiles_what_no_cubin_serves_with_a_warning(gen):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the JIT fallback under the interpreter (CPU machines)")
    kernels = runtime.ShippedKernels({}, allow_jit=True, where="test bundle")
    # one token: above it low-rank's stages run on cuBLAS, which needs no compiled kernel
    x, U, V = (torch.randn(*s, generator=gen).half() for s in ((1, 64), (48, 16), (64, 16)))
    with runtime.using(kernels, runtime.Target(87, 8, False)):
        with pytest.warns(UserWarning, match="test bundle has no compiled kernel for gemm.*JIT"):
            y = launch.lowrank_forward(x, U, V)
    assert kernels.jit_launches == 2
    assert_rel_close(y, lowrank_reference(x.double(), U.double(), V.double(), None), 5e-3, "JIT fallback")


def test_package_refuses_bad_input(bundles, tmp_path):
    ckpt, out = bundles["jetson"]
    cases = [
        (["--target", "tpu"], "unknown target 'tpu'; known: jetson, a40, h100, h200"),
        (["--target", "jetson", "--dtype", "int8"], "--dtype must be one of"),
        (["--target", "jetson", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--target", "jetson", "--tune"], "needs that GPU"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["package", str(ckpt), "-o", str(tmp_path / "new"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["package", str(ckpt), "--target", "jetson", "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not (tmp_path / "new").exists()


def test_package_refuses_nan_weights_naming_the_tensor(bundles, tmp_path):
    ckpt, _ = bundles["jetson"]
    bad = tmp_path / "nan"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith(".S"))
    tensors[name][0, 0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    cfg = json.loads((bad / "blr_config.json").read_text())
    cfg["weights"].update(bytes=weights.stat().st_size, sha256=file_sha256(weights))
    (bad / "blr_config.json").write_text(json.dumps(cfg))
    with pytest.raises(bundle.BundleError, match=re.escape(name) + ".*NaN"):
        bundle.package(bad, "jetson", tmp_path / "out", with_onnx=False, max_tokens=1)
    assert not (tmp_path / "out").exists()


def test_package_on_a_full_disk_is_one_line_and_writes_nothing(bundles, tmp_path, monkeypatch):
    """A write of the bundle failing for want of space (its weights through safetensors, its checkpoint's
    blr_config.json through Path.write_text) ends in one line naming the output, exit 2, with no partial directory
    left (#24 item 7)."""
    ckpt, _ = bundles["a40-lowrank"]
    out = tmp_path / "bundle"
    args = ["package", str(ckpt), "--target", "a40", "--max-tokens", "16", "--no-onnx", "--dtype", "float16"]

    def full_safetensors(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    write_text = Path.write_text

    def full_blr_config(self, *a, **k):
        if self.name == "blr_config.json":
            raise OSError(errno.ENOSPC, "No space left on device")  # a failed write names no file
        return write_text(self, *a, **k)

    for target, writer in [(packaging, ("save_file", full_safetensors)), (Path, ("write_text", full_blr_config))]:
        with monkeypatch.context() as m:
            m.setattr(target, *writer)
            result = runner.invoke(app, [*args, "-o", str(out)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (writer[0], result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: cannot write {out}: No space left on device"], (writer[0], result.output)
        assert "Traceback" not in result.output
        assert list(tmp_path.iterdir()) == [], writer[0]


def test_device_profiles(tmp_path, monkeypatch):
    assert devices.names()[:4] == ["jetson", "a40", "h100", "h200"]
    jetson = devices.get("jetson")
    assert (jetson.arch, jetson.sm_count, jetson.dtype, jetson.pdl) == (87, 8, "float16", False)
    assert devices.get("h100").pdl
    mine = {"name": "orin-agx", "description": "Jetson AGX Orin 64 GB", "arch": 87, "sm_count": 16,
            "memory_gb": 64, "bandwidth_gbs": 204.8, "fp16_tflops": 42.5}  # fmt: skip
    (tmp_path / "orin-agx.json").write_text(json.dumps(mine))
    assert devices.get(str(tmp_path / "orin-agx.json")).sm_count == 16
    monkeypatch.setenv("BLRDEPLOY_DEVICES", str(tmp_path))
    assert "orin-agx" in devices.names() and devices.get("orin-agx").bandwidth_gbs == 204.8
    (tmp_path / "bad.json").write_text(json.dumps({**mine, "arch": "sm87", "colour": 1}))
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        devices.get("bad")
    (tmp_path / "bad.json").write_text(json.dumps({**mine, "arch": "sm87"}))
    with pytest.raises(ValueError, match="arch must be a compute capability"):
        devices.get("bad")
    (tmp_path / "bad.json").write_text(json.dumps({**mine, "bandwidth_gbs": float("nan")}))  # JSON's NaN literal
    with pytest.raises(ValueError, match="bandwidth_gbs must be a positive finite number, got nan"):
        devices.get("bad")
    with pytest.raises(ValueError, match="unknown target"):
        devices.get("nope")


# ------------------------------------------------------------------------------------------------------- GPU


def _gpu_target():
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    return devices.Device("here", props.name, 10 * major + minor, props.multi_processor_count, 80, 3000, 900)


@pytest.mark.gpu
def test_bundle_runs_on_the_gpu_without_compiling_and_equals_jit(tmp_path):
    """Package for this GPU, run the bundle in a fresh process with an empty Triton cache: nothing compiles
    (the cache stays empty, no JIT launch), and the output equals the checkpoint run through the JIT path with
    the same (unfused) layers: stacked siblings and fused blocks sum in another order."""
    profile = tmp_path / "here.json"
    profile.write_text(json.dumps(_gpu_target().to_json()))
    for structure in ("blast", "monarch", "lowrank"):
        ckpt = _convert(tmp_path, "llama-tiny", structure)
        out = tmp_path / f"b-{structure}"
        bundle.package(ckpt, str(profile), out, dtype="bfloat16", tune=False, with_onnx=False, max_tokens=256)
        outputs = {}
        for label, args in (("bundle", ["--bundle", str(out)]), ("jit", [str(ckpt), "--no-fuse-siblings"])):
            cache = tmp_path / f"cache-{structure}-{label}"
            cache.mkdir()
            o = tmp_path / f"{structure}-{label}.safetensors"
            env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
            env.pop("TRITON_INTERPRET", None)
            proc = subprocess.run(
                [sys.executable, "-m", "blrdeploy", "run", *args, "--output", str(o), "--json", "--repeat", "2"],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-2000:]
            data = json.loads(proc.stdout)
            files = [p for p in cache.rglob("*") if p.is_file()]
            if label == "bundle":
                assert data["jit_launches"] == 0 and data["sample_check"]["ok"], data
                assert files == [], f"the bundle run wrote to the Triton cache: {files[:5]}"
            else:
                assert files, "the JIT run compiled nothing: the comparison proves nothing"
            outputs[label] = load_file(str(o))["output"]
        assert torch.equal(outputs["bundle"], outputs["jit"]), structure


@pytest.mark.gpu
def test_tune_rewrites_the_bundle_and_it_still_verifies(tmp_path):
    profile = tmp_path / "here.json"
    profile.write_text(json.dumps(_gpu_target().to_json()))
    ckpt = _convert(tmp_path, "llama-tiny", "monarch")
    out = tmp_path / "b"
    bundle.package(ckpt, str(profile), out, dtype="bfloat16", tune=False, with_onnx=False, max_tokens=64)
    result = runner.invoke(app, ["tune", "--bundle", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["measured_on"] == torch.cuda.get_device_name()
    result = runner.invoke(app, ["verify-bundle", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert isinstance(runtime.backend(), runtime.JitKernels), "verify-bundle left the process on the bundle"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(src.startswith("measured on") for src in manifest["launch_configs"]["sources"])


def test_launch_structs_match_the_cuda_driver_abi():
    """cuLaunchKernelEx reads these by layout (cuda.h, 64-bit): a wrong size or offset corrupts the launch."""
    assert ctypes.sizeof(CuLaunchAttribute) == 72 and CuLaunchAttribute.value.offset == 8
    assert ctypes.sizeof(CuLaunchConfig) == 56
    assert (CuLaunchConfig.hStream.offset, CuLaunchConfig.attrs.offset) == (32, 40)
    attrs = pdl_attributes()
    raw = bytes(ctypes.string_at(ctypes.addressof(attrs), 72))
    assert raw[:4] == (6).to_bytes(4, "little") and raw[8:12] == (1).to_bytes(4, "little") and not any(raw[12:])


def test_package_overwrite_replaces_only_a_bundle_it_can_read_whole(bundles, tmp_path):
    """A folder is a bundle of ours only when its manifest parses as ours and lists every file in it: a web app's
    manifest.json, or a user's file inside a real bundle, is refused before any compiling, and nothing is lost."""
    ckpt, _ = bundles["a40-lowrank"]
    webapp = tmp_path / "webapp"
    site = {"manifest.json": '{"name": "my app", "start_url": "/"}', "index.html": "<html>", "src/app.js": "1"}
    for rel, text in site.items():
        (webapp / rel).parent.mkdir(parents=True, exist_ok=True)
        (webapp / rel).write_text(text)
    args = ["package", str(ckpt), "--target", "a40", "--max-tokens", "16", "--no-onnx", "--dtype", "float16"]
    result = runner.invoke(app, [*args, "-o", str(webapp), "--overwrite"])
    assert result.exit_code == 2 and "neither empty nor a blrdeploy bundle" in result.output, result.output
    assert "compiling" not in result.output  # refused before the work
    assert {p.relative_to(webapp).as_posix(): p.read_text() for p in webapp.rglob("*") if p.is_file()} == site

    real = tmp_path / "real"
    assert runner.invoke(app, [*args, "-o", str(real)]).exit_code == 0
    (real / "my-notes.txt").write_text("keep me")
    result = runner.invoke(app, [*args, "-o", str(real), "--overwrite"])
    assert result.exit_code == 2 and "it holds my-notes.txt, which a blrdeploy bundle does not list" in result.output
    assert (real / "my-notes.txt").read_text() == "keep me"
    (real / "my-notes.txt").unlink()
    result = runner.invoke(app, [*args, "-o", str(real), "--overwrite"])  # a bundle of ours: replaced
    assert result.exit_code == 0, result.output
