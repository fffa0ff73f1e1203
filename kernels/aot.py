"""Ahead-of-time compilation of the kernels for a GPU architecture, with no GPU present.

``triton.compile`` with a ``GPUTarget`` turns one specialization (dtypes, constexprs, launch config) into a cubin
and its metadata. CI compiles every shipped config this way for sm_86, sm_87 and sm_90, because the interpreter
accepts programs the compiler rejects; the bundle packager compiles each :class:`~.runtime.Spec` a model needs
with :func:`compile_spec` into a cubin and the descriptor :mod:`.cubin` launches it by.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import launch
from .configs import SMALL_N, VS_ACC_LIMIT, Config, max_partials, mix_dot_tiles, space
from .dispatch import PDL_MIN_ARCH
from .dtypes import DTYPES, NAMES, TRITON_NAMES
from .runtime import KERNELS, Spec, jit_function

ARCHS = (86, 87, 90)


@dataclass(frozen=True)
class Variant:
    """One specialization of a kernel besides its launch config: the element type, and the launcher's structural
    choices as keyword arguments of the kernel's constexpr builder in ``launch.py`` (``gemm_constexprs``,
    ``blast_vs_constexprs``, ``mix_constexprs``, ``mix_dot_constexprs``, ``interleave_constexprs``), so that what
    is compiled here is what the launchers launch."""

    kernel: str  # "gemm", "blast_vs", "blast_mix", "blast_mix_dot" or "interleave"
    dtype: str = "bfloat16"  # operands and output
    args: tuple[tuple[str, object], ...] = ()
    intermediate_fp32: bool = False  # blast_vs: float32 partials (split > 1)


def variant_constexprs(variant: Variant, config: Config) -> dict:
    """The constexprs the launchers pass for ``variant`` launched with ``config``."""
    if variant.dtype not in DTYPES:
        raise ValueError(f"no kernels for dtype {variant.dtype}; choose from {', '.join(NAMES)}")
    dtype, args = DTYPES[variant.dtype], dict(variant.args)
    if variant.kernel == "gemm":
        return launch.gemm_constexprs(config, dtype, **args)
    if variant.kernel == "blast_vs":
        return launch.blast_vs_constexprs(config, dtype, **args)
    if variant.kernel == "blast_mix":
        return launch.mix_constexprs(config, **args)
    if variant.kernel == "blast_mix_dot":
        return launch.mix_dot_constexprs(config, **args)
    if variant.kernel == "interleave":
        return launch.interleave_constexprs(config, **args)
    raise ValueError(f"unknown kernel {variant.kernel!r}")


def _signature(fn, dtype: str, overrides: dict[str, str]) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = overrides.get(p.name, f"*{TRITON_NAMES[dtype]}")
        else:
            sig[p.name] = "i32"
    return sig


def compile_variant(variant: Variant, config: Config, arch: int):
    """Compile for compute capability ``arch`` (e.g. 87); returns Triton's compiled kernel (``.asm["cubin"]``)."""
    constexprs = variant_constexprs(variant, config)
    # The pointers the launchers pass in float32 (split partials, sums of squares) or int32 (arrival counters).
    overrides: dict[str, str] = {}
    if variant.kernel == "gemm":
        if constexprs["A_SPLIT"] > 1:
            overrides["a_ptr"] = "*fp32"
        if constexprs["RMS_SPLIT"] > 0:
            overrides["sq_ptr"] = "*fp32"
    elif variant.kernel == "blast_vs":
        if variant.intermediate_fp32:  # the launcher passes w itself where no reduction needs red and counters
            overrides.update(w_ptr="*fp32", red_ptr="*fp32", cnt_ptr="*fp32")
        if constexprs["REDUCE"]:
            overrides.update(red_ptr="*fp32", cnt_ptr="*i32")
        if constexprs["RMS_NORM"]:
            overrides.update(sq_ptr="*fp32")
    fn = jit_function(KERNELS[variant.kernel])
    src = ASTSource(fn, _signature(fn, variant.dtype, overrides), constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def shipped() -> list[tuple[int, Config, Variant]]:
    """Every (arch, config, variant) CI compiles: each config of each architecture's space, in one specialization
    that takes every addressing path (chunked A, permuted B rows, fused bias; float32 partials on the small-N side),
    plus the other dtypes once."""
    cases = []
    for arch in ARCHS:
        pdl = arch >= PDL_MIN_ARCH
        for cfg in space("gemm", arch):
            a = (("a_chunk", 64), ("perm", (64, 16)), ("bias", True), ("g_fast", True))
            if cfg.BM <= SMALL_N:  # a split producer's consumer, launched early
                a += (("a_split", max_partials(cfg.BM, arch)), ("wait", pdl), ("launch_deps", pdl))
                a += (("rms_split", max_partials(cfg.BM, arch)), ("eps", 1e-5))  # and scales rows after a norm
            cases.append((arch, cfg, Variant("gemm", "bfloat16", a)))
        for cfg in space("blast_vs", arch):
            b_out = min(16, VS_ACC_LIMIT // (cfg.BM * cfg.BN))  # the most output blocks the tile serves
            a = (("b_out_pow2", b_out), ("launch_deps", pdl), ("reduce", bool(cfg.reduce)))
            if cfg.split != 1:  # a norm over split programs stores its partial sums of squares
                a += (("rms_norm", True), ("eps", 1e-5))
            cases.append((arch, cfg, Variant("blast_vs", "bfloat16", a, intermediate_fp32=cfg.split != 1)))
        # the mix kernel's tile is fixed by b_out
        cases.append((arch, launch.mix_config(16), Variant("blast_mix", "bfloat16", (("b_out_pow2", 16),))))
        for blocks in (16, 32):  # up to 16 and 32 blocks: the tiles the launcher may pick for them
            for tile in mix_dot_tiles(arch, blocks, blocks):
                mix = Variant("blast_mix_dot", "bfloat16", (("bj", blocks), ("bi", blocks)))
                cases.append((arch, launch.mix_dot_config(tile), mix))
        cases.append((arch, launch.interleave_config(16), Variant("interleave", "bfloat16", (("b_pow2", 16),))))
    cases.append((90, space("gemm", 90, "large")[0], Variant("gemm", "float16")))
    cases.append((90, space("blast_vs", 90, "large")[0], Variant("blast_vs", "float32", (("b_out_pow2", 16),))))
    return cases


def check_shipped() -> list[dict]:
    """Compile everything :func:`shipped` lists; one summary per case (an ``error`` instead of a cubin when the
    compiler refuses). Run it in a process without TRITON_INTERPRET: under the interpreter nothing compiles."""
    results = []
    for arch, cfg, variant in shipped():
        row = {"arch": arch, "kernel": variant.kernel, "dtype": variant.dtype, "config": cfg.to_dict()}
        try:
            row["constexprs"] = variant_constexprs(variant, cfg)
            compiled = compile_variant(variant, cfg, arch)
        except Exception as e:  # reported per case, so one failure does not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        else:
            row.update(
                elf=compiled.asm["cubin"][:4] == b"\x7fELF",
                target_arch=compiled.metadata.target.arch,
                num_warps=compiled.metadata.num_warps,
                shared=compiled.metadata.shared,
                wgmma="wgmma" in compiled.asm["ptx"],
            )
        results.append(row)
    return results


def _entry_params(ptx: str, name: str) -> int:
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError(f"no entry {name} in the compiled PTX")
    return match.group(1).count(".param")


def _default_fp_fusion() -> bool:
    try:  # deferred: a version probe; newer Tritons keep their settings in knobs, older ones read the environment
        from triton import knobs

        return bool(knobs.language.default_fp_fusion)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_DEFAULT_FP_FUSION", "1").lower() not in ("0", "", "false", "off", "no")


def compile_spec(spec: Spec, arch: int) -> tuple[bytes, dict]:
    """(cubin, launch descriptor) of one specialization for compute capability ``arch``. The descriptor holds
    what a launch needs (entry, warps, shared memory, dependent launch, parameter count) and the spec."""
    fn = jit_function(KERNELS[spec.kernel])
    signature: dict[str, str] = {}
    constexprs = dict(spec.constexprs)
    attrs = {}
    runtime = {name: (type_, hint) for name, type_, hint in spec.params}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        type_, hint = runtime[p.name]
        if hint == "1":
            signature[p.name], constexprs[p.name] = "constexpr", 1
            continue
        signature[p.name] = type_
        if hint == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    # FMA contraction as the JIT does it (Triton's default unless TRITON_DEFAULT_FP_FUSION=0), so a bundle
    # computes bit for bit what the JIT path computes.
    fp_fusion = _default_fp_fusion()
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": fp_fusion}
    if spec.launch_pdl:
        options["launch_pdl"] = True
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{spec.kernel} needs global scratch memory; the bundle launcher provides none")
    passed = sum(1 for t in signature.values() if t != "constexpr")
    descriptor = {
        "name": md.name,
        "arch": arch,
        "num_warps": md.num_warps,
        "shared": md.shared,
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "scratch_params": _entry_params(compiled.asm["ptx"], md.name) - passed,
        "triton": triton.__version__,
        "spec": spec.to_json(),
    }
    return compiled.asm["cubin"], descriptor
