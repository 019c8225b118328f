"""Compile every Triton kernel variant of the library for Hopper (sm_90a) on a machine without a GPU, and
report what the compiler did: registers, spills, shared memory, wgmma / TMA use, ptxas's serialization warnings.

Run: ``python -m peft_kernels.triton._compile_check [--quick] [--json PATH] [--only PREFIX]`` (exit status 1
when a rule below fails); ``make compile-check`` runs it with the installed Triton and with Triton 3.6 (the
GPU machine's) from a side folder, and ``tests/test_compile_check.py`` does the same in CI.

Protocol (every ``peft_kernels/triton/<op>.py`` implements it)::

    def compile_variants(quick: bool = False) -> list[Variant]: ...

returning one :class:`Variant` per (kernel, constexprs, num_warps, num_stages) that its launchers can launch
at the op's benchmark shapes (build them with :func:`jit_variant`, which specializes the example launch
arguments exactly as the JIT does -- ints equal to 1 become constexprs, multiples of 16 divisible -- since
that changes the code): every autotune config that survives the launcher's own pruning (shared-memory
estimate included -- a pruned config is simply not listed), the PEFT_KERNELS_TRITON_AUTOTUNE=0 fallbacks,
each dtype and each feature flag (bias, dropout, ...). ``quick=True`` (CI, every module together in a few
minutes on 2 cores): at most ~10 variants -- the main configs of one shape in bf16. Import inside the
function (``from ._compile_check import jit_variant``).

A Variant names:

* ``name``: unique row name, ``"<op>.<kernel>.<flags>.<dtype>.<tile>"``;
* ``kernel``: the ``@triton.jit`` function (an ``@triton.autotune`` wrapper is unwrapped);
* ``signature``: every non-constexpr parameter -> Triton type (``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"i64"``,
  ``"fp32"``); ``constexprs``: every constexpr parameter -> value (a missing name is reported as an error);
* ``divisible``: parameters the JIT would mark divisible by 16 at the benchmark shapes (aligned pointers,
  sizes and leading strides that are multiples of 16): this changes vectorization, so list them;
* ``num_warps``, ``num_stages``;
* ``kind``: ``"gemm"`` (must use wgmma), ``"gemm_tma"`` (wgmma + TMA bulk tensor copies), ``"attention"``
  (must use wgmma, spills reported), ``"stream"`` (memory-bound: reported only);
* ``main``: a main (fast-path) config of a GEMM: any spill fails it;
* ``smem_estimate``: the launcher's own shared-memory estimate, the one its pruning uses (a compiled figure
  more than 1 KB above it fails: the pruning could then let an over-limit config through).

Rules (each failing variant is listed with its reasons): a compile error; ptxas warnings C7510-C7515 (wgmma
serialized); spills in a ``main`` GEMM config; shared memory over 227 KB (the variant is not pruned, so it
could be picked and fail to launch) or over the variant's own ``smem_estimate``; a gemm/gemm_tma/attention
kernel without wgmma in its PTX; a gemm_tma kernel without ``cp.async.bulk.tensor``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SMEM_LIMIT = 232448  # 227 KB: Hopper's opt-in shared memory per block
SMEM_SLACK = 1024  # barriers and alignment the launchers' estimates may round away (differs across versions)
ARCH = 90
SERIALIZATION_WARNINGS = tuple(f"C{n}" for n in range(7510, 7516))
KINDS = ("gemm", "gemm_tma", "attention", "stream")


@dataclass
class Variant:
    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple[str, ...] = ()
    kind: str = "stream"
    main: bool = False
    smem_estimate: int | None = None


def jit_variant(name: str, kernel, args: dict[str, Any], constexprs: dict[str, Any], **fields) -> Variant:
    """A Variant specialized exactly as ``kernel[grid](**args, **constexprs)`` would be by the JIT: ``args``
    gives every runtime parameter as an example launch value -- a pointer as its type string (``"*bf16"``,
    taken as 16-byte aligned), an int as the value at the benchmark shape (1 becomes a constexpr, a multiple
    of 16 is marked divisible, unless the parameter is ``do_not_specialize``), a float as a float."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = _jit_fn(kernel)
    nospec = {p.name for p in fn.params if p.do_not_specialize}
    sig, cx, div = {}, dict(constexprs), []
    for n, v in args.items():
        if isinstance(v, str):  # pointer
            sig[n] = v
            div.append(n)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: argument {n}={v!r}: give a pointer type string, an int or a float")
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            ty, key = native_specialize_impl(BaseBackend, v, False, n not in nospec, True)
            if ty == "constexpr":
                cx[n] = key
            else:
                sig[n] = ty
                if key == "D":
                    div.append(n)
    return Variant(name=name, kernel=kernel, signature=sig, constexprs=cx, divisible=tuple(div), **fields)


@dataclass
class Report:
    name: str
    kernel: str
    kind: str
    main: bool
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    smem_estimate: int | None = None
    wgmma: int = 0  # wgmma.mma_async in the PTX
    hgmma_sass: int | None = None  # HGMMA in the SASS (None: no disassembler)
    depbar_after_hgmma: int | None = None  # HGMMA immediately waited on (WARPGROUP.DEPBAR.LE gsb0, 0x0)
    tma_copies: int = 0  # cp.async.bulk.tensor in the PTX
    ptxas_warnings: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    error: str | None = None
    failures: list[str] = field(default_factory=list)


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn  # Autotuner / Heuristics wrappers
    return kernel


def _build_source(v: Variant):
    from triton.compiler import ASTSource

    fn = _jit_fn(v.kernel)
    names = list(fn.arg_names)
    missing = [n for n in names if n not in v.signature and n not in v.constexprs]
    extra = [n for n in list(v.signature) + list(v.constexprs) if n not in names]
    if missing or extra:
        raise ValueError(f"{v.name}: signature/constexprs do not match {fn.__name__}: missing {missing}, extra {extra}")
    sig = {n: ("constexpr" if n in v.constexprs else v.signature[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in v.divisible}
    return ASTSource(fn=fn, signature=sig, constexprs=dict(v.constexprs), attrs=attrs), fn


def _sass(cubin: bytes) -> str | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=120)
        return res.stdout if res.returncode == 0 else None
    finally:
        os.unlink(f.name)


def _count_depbar_after_hgmma(sass: str) -> int:
    # Serialized wgmma: each HGMMA is followed (next instruction) by a wait for all groups.
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    n = 0
    for a, b in zip(lines, lines[1:]):
        if "HGMMA" in a and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in b:
            n += 1
    return n


def compile_variant(v: Variant) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_fn(v.kernel)
    rep = Report(name=v.name, kernel=getattr(fn, "__name__", "?"), kind=v.kind, main=v.main,
                 num_warps=v.num_warps, num_stages=v.num_stages, smem_estimate=v.smem_estimate)  # fmt: skip
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src, _ = _build_source(v)
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log (knobs.nvidia.dump_ptxas_log)
            ck = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                                options={"num_warps": v.num_warps, "num_stages": v.num_stages})  # fmt: skip
    except Exception as e:  # a compile error is a result, reported and failed
        rep.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
        rep.compile_s = time.perf_counter() - t0
        return rep
    rep.compile_s = time.perf_counter() - t0
    text = log.getvalue()
    m = re.search(r"Used (\d+) registers", text)
    rep.registers = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        rep.spill_stores, rep.spill_loads = int(m.group(1)), int(m.group(2))
    rep.ptxas_warnings = sorted({w for w in re.findall(r"\((C\d{4})\)", text)})
    rep.shared = int(ck.metadata.shared)
    ptx = ck.asm.get("ptx", "")
    rep.wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    rep.tma_copies = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    sass = _sass(ck.asm["cubin"]) if "cubin" in ck.asm else None
    if sass is not None:
        rep.hgmma_sass = sass.count("HGMMA")
        rep.depbar_after_hgmma = _count_depbar_after_hgmma(sass)
    return rep


def judge(rep: Report) -> list[str]:
    """The failed rules of one compiled variant (empty: it passes)."""
    if rep.error:
        return [f"compile error: {rep.error}"]
    out = []
    serial = [w for w in rep.ptxas_warnings if w in SERIALIZATION_WARNINGS]
    if serial:
        out.append(f"wgmma serialized (ptxas {', '.join(serial)})")
    if rep.main and rep.kind in ("gemm", "gemm_tma") and (rep.spill_stores or rep.spill_loads):
        out.append(f"spills in a main config ({rep.spill_stores} B stores, {rep.spill_loads} B loads)")
    if rep.shared is not None and rep.shared > SMEM_LIMIT:
        out.append(f"shared memory {rep.shared} B > {SMEM_LIMIT} B in a config that is not pruned")
    elif rep.shared is not None and rep.smem_estimate is not None and rep.shared > rep.smem_estimate + SMEM_SLACK:
        out.append(f"shared memory {rep.shared} B above the launcher's estimate {rep.smem_estimate} B (its pruning "
                   "could let an over-limit config through)")  # fmt: skip
    if rep.kind in ("gemm", "gemm_tma", "attention") and rep.wgmma == 0:
        out.append("no wgmma")
    if rep.kind == "gemm_tma" and rep.tma_copies == 0:
        out.append("TMA path without cp.async.bulk.tensor")
    return out


def collect(quick: bool, only: str | None = None) -> tuple[list[Variant], list[Report]]:
    """Variants of every module of peft_kernels.triton (and Reports for modules that fail to provide them)."""
    import peft_kernels.triton as pkg

    variants, errors = [], []
    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        if mod.startswith("_") or (only is not None and not only.startswith(mod + ".") and only != mod):
            continue
        try:
            module = importlib.import_module(f"peft_kernels.triton.{mod}")
            provider = getattr(module, "compile_variants", None)
            if provider is None:
                errors.append(Report(name=f"{mod}.*", kernel="-", kind="-", main=False, num_warps=0, num_stages=0,
                                     error=None, failures=["no compile_variants(): kernels not checked"]))  # fmt: skip
                continue
            got = list(provider(quick=quick))
        except Exception as e:
            errors.append(Report(name=f"{mod}.*", kernel="-", kind="-", main=False, num_warps=0, num_stages=0,
                                 error=f"{type(e).__name__}: {e}"[:400]))  # fmt: skip
            continue
        for v in got:
            if v.kind not in KINDS:
                raise ValueError(f"{v.name}: kind {v.kind!r} not in {KINDS}")
        variants += [v for v in got if only is None or v.name.startswith(only)]
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate variant names: {sorted(dup)[:5]}")
    return variants, errors


def _fmt(v, width):
    s = "-" if v is None else str(v)
    return s[:width].rjust(width)


def table(reports: list[Report]) -> str:
    head = f"{'variant':<62} {'regs':>4} {'spill':>6} {'smem':>6} {'wgmma':>5} {'ser':>4} {'tma':>4} {'s':>5}  result"
    rows = [head, "-" * len(head)]
    for r in reports:
        spill = None if r.spill_stores is None else (r.spill_stores or 0) + (r.spill_loads or 0)
        smem = None if r.shared is None else f"{r.shared // 1024}K"
        res = "ok" if not r.failures else "FAIL: " + "; ".join(r.failures)
        rows.append(f"{r.name[:62]:<62} {_fmt(r.registers, 4)} {_fmt(spill, 6)} {_fmt(smem, 6)} "
                    f"{_fmt(r.wgmma, 5)} {_fmt(r.depbar_after_hgmma, 4)} {_fmt(r.tma_copies, 4)} "
                    f"{r.compile_s:5.1f}  {res}")  # fmt: skip
    return "\n".join(rows)


def run(quick: bool = False, only: str | None = None, json_path: str | None = None, verbose: bool = True) -> dict:
    import triton

    # Fresh compiles (a cache hit skips ptxas and its log) and the ptxas log printed for parsing.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    variants, reports = collect(quick, only)
    for i, v in enumerate(variants):
        rep = compile_variant(v)
        rep.failures = judge(rep)
        reports.append(rep)
        if verbose:
            status = "ok" if not rep.failures else "FAIL"
            print(f"[{i + 1}/{len(variants)}] {v.name}: {status} ({rep.compile_s:.1f} s)", file=sys.stderr)
    result = {
        "triton": triton.__version__,
        "arch": f"sm_{ARCH}a",
        "quick": quick,
        "smem_limit": SMEM_LIMIT,
        "failed": [r.name for r in reports if r.failures and not r.failures[0].startswith("no compile_variants")],
        "reports": [asdict(r) for r in reports],
    }
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if verbose:
        print(f"Triton {triton.__version__}, sm_{ARCH}a, {len(variants)} variants")
        print(table(reports))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few main configs per kernel (CI)")
    ap.add_argument("--only", default=None, help="only variants whose name starts with this")
    ap.add_argument("--json", default=None, help="write the reports here")
    args = ap.parse_args(argv)
    result = run(quick=args.quick, only=args.only, json_path=args.json)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
