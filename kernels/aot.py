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

from .blast import blast_mix_dot_kernel, blast_mix_kernel, blast_vs_kernel, mix_tile
from .configs import Config
from .gemm import grouped_gemm_kernel
from .monarch import interleave_kernel, interleave_tile
from .runtime import KERNELS, Spec, jit_function

ARCHS = (86, 87, 90)
_TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Variant:
    """One specialization of a kernel besides its launch config: element types and the structural constexprs."""

    kernel: str  # "gemm", "blast_vs", "blast_mix", "blast_mix_dot" or "interleave"
    dtype: str = "bfloat16"  # operands and output
    constexprs: tuple[tuple[str, object], ...] = ()
    intermediate_fp32: bool = False  # blast_vs: float32 partials (split > 1)


def _signature(fn, dtype: str, overrides: dict[str, str]) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = overrides.get(p.name, f"*{_TRITON_DTYPES[dtype]}")
        else:
            sig[p.name] = "i32"
    return sig


def compile_variant(variant: Variant, config: Config, arch: int):
    """Compile for compute capability ``arch`` (e.g. 87); returns Triton's compiled kernel (``.asm["cubin"]``)."""
    if variant.dtype not in _TRITON_DTYPES:
        raise ValueError(f"no kernels for dtype {variant.dtype}; choose from {', '.join(_TRITON_DTYPES)}")
    constexprs = dict(variant.constexprs)
    overrides: dict[str, str] = {}
    if variant.kernel == "gemm":
        fn = jit_function(grouped_gemm_kernel)
        flags = ("HAS_BIAS", "WAIT", "LAUNCH_DEPS", "G_FAST")
        constexprs = {"A_CHUNK": 0, "A_SPLIT": 1, "PERM_M": 0, "PERM_B": 0, "RMS_SPLIT": 0, "EPS": 0.0,
                      **dict.fromkeys(flags, False), **constexprs}  # fmt: skip
        constexprs.update(BM=config.BM, BN=config.BN, BK=config.BK)
        if constexprs["A_SPLIT"] > 1:
            overrides["a_ptr"] = "*fp32"
        if constexprs["RMS_SPLIT"] > 0:
            overrides["sq_ptr"] = "*fp32"
    elif variant.kernel == "blast_mix":
        fn = jit_function(blast_mix_kernel)
        constexprs = {"B_OUT": 16, **constexprs}
        constexprs["BM"], constexprs["BR"] = mix_tile(constexprs["B_OUT"])
    elif variant.kernel == "blast_mix_dot":
        fn = jit_function(blast_mix_dot_kernel)
        constexprs = {"BJ": 16, "BI": 16, **constexprs, "BM": config.BM, "BR": config.BN}
    elif variant.kernel == "interleave":
        fn = jit_function(interleave_kernel)
        constexprs = {"B_P2": 16, **constexprs}
        constexprs["BM"], constexprs["BS"] = interleave_tile(constexprs["B_P2"])
    elif variant.kernel == "blast_vs":
        fn = jit_function(blast_vs_kernel)
        constexprs = {
            "B_OUT": 16, "LAUNCH_DEPS": False, "REDUCE": False, "SWIGLU": False, "RMS_NORM": False, "EPS": 0.0,
            **constexprs,
        }  # fmt: skip
        constexprs.update(BM=config.BM, BR=config.BN, BK=config.BK)
        if variant.intermediate_fp32:  # the launcher passes w itself where no reduction needs red and counters
            overrides.update(w_ptr="*fp32", red_ptr="*fp32", cnt_ptr="*fp32")
        if constexprs["REDUCE"]:
            overrides.update(red_ptr="*fp32", cnt_ptr="*i32")
        if constexprs["RMS_NORM"]:
            overrides.update(sq_ptr="*fp32")
    else:
        raise ValueError(f"unknown kernel {variant.kernel!r}")
    if "IEEE" in fn.arg_names:  # the kernels with a dot on the inputs' dtype: full-precision float32
        constexprs["IEEE"] = variant.dtype == "float32"
    src = ASTSource(fn, _signature(fn, variant.dtype, overrides), constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def shipped() -> list[tuple[int, Config, Variant]]:
    """Every (arch, config, variant) CI compiles: each config of each architecture's space, in one specialization
    that takes every addressing path (chunked A, permuted B rows, fused bias; float32 partials on the small-N side),
    plus the other dtypes once."""
    from .configs import MIX_DOT_STAGES, SMALL_N, VS_ACC_LIMIT, max_partials, mix_dot_tiles, space

    cases = []
    for arch in ARCHS:
        pdl = arch >= 90  # dependent launch (griddepcontrol) exists from sm_90 on
        for cfg in space("gemm", arch):
            c = (("A_CHUNK", 64), ("PERM_M", 64), ("PERM_B", 16), ("HAS_BIAS", True), ("G_FAST", True))
            if cfg.BM <= SMALL_N:  # a split producer's consumer, launched early
                c += (("A_SPLIT", max_partials(cfg.BM, arch)), ("WAIT", pdl), ("LAUNCH_DEPS", pdl))
                c += (("RMS_SPLIT", max_partials(cfg.BM, arch)), ("EPS", 1e-5))  # and scales rows after a norm
            cases.append((arch, cfg, Variant("gemm", "bfloat16", c)))
        for cfg in space("blast_vs", arch):
            b_out = min(16, VS_ACC_LIMIT // (cfg.BM * cfg.BN))  # the most output blocks the tile serves
            c = (("B_OUT", b_out), ("LAUNCH_DEPS", pdl), ("REDUCE", bool(cfg.reduce)))
            if cfg.split != 1:  # a norm over split programs stores its partial sums of squares
                c += (("RMS_NORM", True), ("EPS", 1e-5))
            cases.append((arch, cfg, Variant("blast_vs", "bfloat16", c, intermediate_fp32=cfg.split != 1)))
        mix_config = Config(*mix_tile(16), 0, 4, 3)  # the mix kernel's tile is fixed by b_out
        cases.append((arch, mix_config, Variant("blast_mix", "bfloat16")))
        for blocks in (16, 32):  # up to 16 and 32 blocks: the tiles the launcher may pick for them
            for bm, br, warps in mix_dot_tiles(arch, blocks, blocks):
                mix = Variant("blast_mix_dot", "bfloat16", (("BJ", blocks), ("BI", blocks), ("STAGES", MIX_DOT_STAGES)))
                cases.append((arch, Config(bm, br, 0, warps, MIX_DOT_STAGES), mix))
        bm, bs = interleave_tile(16)
        cases.append((arch, Config(bm, bs, 0, 4, 3), Variant("interleave", "bfloat16")))
    cases.append((90, space("gemm", 90, "large")[0], Variant("gemm", "float16")))
    cases.append((90, space("blast_vs", 90, "large")[0], Variant("blast_vs", "float32")))
    return cases


def check_shipped() -> list[dict]:
    """Compile everything :func:`shipped` lists; one summary per case (an ``error`` instead of a cubin when the
    compiler refuses). Run it in a process without TRITON_INTERPRET: under the interpreter nothing compiles."""
    results = []
    for arch, cfg, variant in shipped():
        row = {"arch": arch, "kernel": variant.kernel, "dtype": variant.dtype, "config": cfg.to_dict(),
               "constexprs": dict(variant.constexprs)}  # fmt: skip
        try:
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
    try:
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
