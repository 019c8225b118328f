"""The host-overhead benchmark runs on the CPU and prints its table (its targets are checked, not asserted:
timings on a shared CI machine are not a pass/fail signal)."""

import subprocess
import sys

from peft_kernels.bench import overhead


def test_overhead_rows_and_table():
    rows = overhead.run(number=5)
    names = {(r.what, r.mode) for r in rows}
    assert ("LoRALinear", "fwd") in names and ("LoRALinear", "fwd+bwd") in names
    assert ("patched peft layer", "fwd+bwd") in names
    for module in ("LoRAConv1D", "BitFitLinear", "BitFitConv1D", "BitFitLayerNorm", "BitFitRMSNorm",
                   "BottleneckAdapter"):  # every module a patched model runs per layer has a row with a target
        assert {(module, "fwd"), (module, "fwd+bwd")} <= names, module
        assert all(r.target < float("inf") for r in rows if r.what == module)
    assert all(r.ours > 0 and r.anchor > 0 for r in rows)
    table = overhead.format_table(rows)
    assert "peft LoRA layer" in table and "ratio" in table


def test_overhead_cli_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "peft_kernels.bench", "overhead", "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "host time per call" in out.stdout and "LoRALinear" in out.stdout
