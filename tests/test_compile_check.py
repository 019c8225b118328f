"""The sm_90a compile check in CI (peft_kernels/triton/_compile_check.py), CPU only.

Compiles the quick set of every Triton kernel module's variants for Hopper with the installed Triton and with
Triton 3.6 (the GPU machine's; pip-installed with --no-deps into build/compile-check/, never into the venv),
each in its own process, and fails on the checker's rules: ptxas C7510-C7515 (serialized wgmma), spills in a
main GEMM config, shared memory over 227 KB in a config that is not pruned, a GEMM without wgmma, a TMA path
without bulk tensor copies. Reports go to benchmarks/results/compile/triton-<version>-quick.json.
``make compile-check`` runs the full set.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.compile_check

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compile"
SIDE_TRITON = "3.6.0"
SIDE_DIR = ROOT / "build" / "compile-check" / f"triton-{SIDE_TRITON}"


def _side_triton() -> Path:
    """Triton 3.6 in a side folder (cached across runs); skip when it cannot be installed (offline)."""
    if not (SIDE_DIR / "triton" / "__init__.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SIDE_DIR),
               f"triton=={SIDE_TRITON}"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            pytest.skip(f"cannot install triton=={SIDE_TRITON} into {SIDE_DIR}: {res.stderr[-500:]}")
    return SIDE_DIR


def _start(tag: str, pythonpath: Path | None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU, not the CPU
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(ROOT)])
    out = RESULTS / f"{tag}-quick.json"
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-m", "peft_kernels.triton._compile_check", "--quick", "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc, out


@pytest.fixture(scope="module")
def checks():
    """Both Triton versions compile at once (one process each: the CI machine has 2 cores)."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the compile check compiles for the GPU: run it without TRITON_INTERPRET")
    started = {"installed": _start(f"triton-{triton.__version__}", None)}
    try:
        started["side"] = _start(f"triton-{SIDE_TRITON}", _side_triton())
    except pytest.skip.Exception as e:
        started["side"] = e
    yield started
    for p in started.values():
        if not isinstance(p, BaseException) and p[0].poll() is None:
            p[0].kill()


def _result(started) -> dict:
    if isinstance(started, BaseException):
        pytest.skip(str(started))
    proc, out = started
    stdout, stderr = proc.communicate(timeout=1800)
    print(stdout)
    assert out.exists(), f"the compile check wrote no report: {stderr[-3000:]}"
    report = json.loads(out.read_text())
    rows = report["reports"]
    unchecked = [r["name"] for r in rows if r["failures"] and r["failures"][0].startswith("no compile_variants")]
    if unchecked:
        warnings.warn(f"Triton modules without compile_variants(), not checked: {unchecked}", stacklevel=1)
    failed = {r["name"]: r["error"] or r["failures"] for r in rows if r["name"] in report["failed"]}
    assert not failed, f"triton {report['triton']}: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
    assert proc.returncode == 0, stderr[-3000:]
    # The check compiled something, and what it reports is the compiler's (not defaults).
    checked = [r for r in rows if r["registers"] is not None]
    assert any(r["name"].startswith("lora.gemm_tma") for r in checked), [r["name"] for r in rows]
    assert all(r["registers"] > 0 and r["shared"] > 0 for r in checked if r["kind"] != "stream")
    return report


def test_compile_check_installed_triton(checks):
    import triton

    assert _result(checks["installed"])["triton"] == triton.__version__


def test_compile_check_triton_3_6(checks):
    assert _result(checks["side"])["triton"] == SIDE_TRITON


def test_seed_is_not_specialized():
    # A seed that happens to be 1 or a multiple of 16 must not compile a new kernel variant mid-training:
    # the JIT's own specialization (as the compile check reproduces it) keeps it a plain runtime int.
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the JIT's specialization, not the interpreter's")
    from peft_kernels.triton import lora as tk
    from peft_kernels.triton._compile_check import jit_variant

    for kern in (tk._gemm_lora_tma_kernel, tk._gemm_lora_ptr_kernel, tk._lora_down_kernel, tk._lora_da_kernel):
        # Nor a 16-bit keep threshold that is 1 or a multiple of 16 (p = 2**-16, p = 0.5 -> 32768).
        for seed, keep_t in ((1, 1), (32, 32768), (2**40, 3277)):
            v = jit_variant("probe", kern, {"seed": seed, "keep_t": keep_t, "inv_keep": 1.1}, {})
            for name in ("seed", "keep_t"):
                assert v.signature[name] in ("i32", "i64") and name not in v.divisible, (kern, name)
                assert name not in v.constexprs
        # ...whereas an ordinary int parameter is specialized (the probe is faithful).
        assert "inv_keep" in jit_variant("probe", kern, {"inv_keep": 1.0}, {}).signature
        assert jit_variant("probe", kern, {"M": 1}, {}).constexprs == {"M": 1}
