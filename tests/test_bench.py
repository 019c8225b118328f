"""The benchmark harness and CLI on the CPU (small sizes, few repetitions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peft_kernels.bench import Case, Settings, Skip, harness, report, run_cases, time_callable
from peft_kernels.bench import __main__ as cli

REQUIRED_KEYS = ("device", "torch", "triton", "transformers", "peft", "git_sha", "date_utc", "rows")


@pytest.fixture
def one_thread():
    # Steadier timings on a shared machine; restored so other tests keep their thread count.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_time_callable_trivial():
    calls = []
    ms = time_callable(lambda: calls.append(sum(range(1000))), "cpu", quick=True)
    assert 0 < ms < 1000
    assert len(calls) >= 4  # warm-up + repetitions
    assert harness.peak_memory_mb(lambda: None, "cpu") is None


def _raise(exc):
    def setup():
        raise exc

    return setup


def test_statuses_and_ratios():
    x = torch.randn(64, 64, requires_grad=True)
    cases = [
        Case("toy", "64x64", "floor", lambda: (lambda: (x * 2).sum().backward()), floor=True),
        Case("toy", "64x64", "slower", lambda: (lambda: (x @ x).sum().backward())),
        Case("toy", "64x64", "skip", _raise(Skip("needs a unicorn"))),
        Case("toy", "64x64", "missing", _raise(ImportError("No module named 'unicorn'"))),
        Case("toy", "64x64", "boom", _raise(RuntimeError("kernel exploded"))),
    ]
    rows = {r.variant: r for r in run_cases(cases, Settings("cpu", quick=True), progress=False)}
    assert rows["floor"].status == "ok" and rows["floor"].ratio == pytest.approx(1.0)
    assert rows["slower"].status == "ok" and rows["slower"].ratio > 0
    assert rows["skip"].status == "skipped" and rows["skip"].reason == "needs a unicorn"
    assert rows["missing"].status == "skipped" and "unicorn" in rows["missing"].reason
    assert rows["boom"].status == "error" and "kernel exploded" in rows["boom"].reason
    assert "RuntimeError" in rows["boom"].traceback
    table = report.format_table(list(rows.values()))
    assert "floor *" in table and "[1] skipped: needs a unicorn" in table and "error [3]" in table


def test_quick_cli_run_writes_table_json_and_plot(tmp_path, capsys, one_thread):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(["lora", "bias_only", "--device", "cpu", "--quick", "--threads", "1", "--no-progress",
                   "--json", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for needle in ("frozen_base *", "frozen_nobias *", "peft_fp32_adapters", "ours_auto_dropout0.05", "ratio"):
        assert needle in text

    data = json.loads(out.read_text())
    for key in REQUIRED_KEYS:
        assert key in data, key
    assert data["device_type"] == "cpu" and data["settings"]["quick"] is True
    rows = data["rows"]
    assert {r["family"] for r in rows} == {"lora", "bias_only"}
    assert len({r["shape"] for r in rows if r["family"] == "lora"}) == 1  # --quick: first shape only
    by = {(r["family"], r["variant"]): r for r in rows}
    for floor in (("lora", "frozen_base"), ("bias_only", "frozen_nobias")):
        assert by[floor]["status"] == "ok" and by[floor]["ratio"] == pytest.approx(1.0)
    for key in (("lora", "ours_reference"), ("lora", "ours_auto"), ("bias_only", "ours_reference")):
        assert by[key]["status"] == "ok" and by[key]["ms"] > 0 and by[key]["ratio"] > 0
    # Variants that cannot run on the CPU are skipped with the reason, never dropped and never a crash.
    for key in (("lora", "ours_triton"), ("lora", "peft_compile"), ("bias_only", "compile_bias")):
        assert by[key]["status"] == "skipped" and by[key]["reason"], key
    assert "CUDA" in by[("lora", "ours_triton")]["reason"]
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert (r["ms"] is not None) == (r["status"] == "ok")
        assert r["peak_mb"] is None  # CPU: no peak-memory measurement
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list(capsys):
    assert cli.main(["--list", "--device", "cuda"]) == 0  # listing builds no inputs: works without a GPU
    text = capsys.readouterr().out
    for fam in ("lora", "bias_only", "prefix_attention", "adapter", "prompt", "distill", "e2e"):
        assert fam in text
    assert "M=8192 4096->14336 r=16" in text and "flex_compiled" in text and "peft_compile" in text


def test_list_as_module():
    out = subprocess.run([sys.executable, "-m", "peft_kernels.bench", "lora", "--list", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "frozen_base *" in out.stdout and "M=256 256->512 r=16" in out.stdout


def test_unknown_op_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no_such_op", "--list"])
    assert exc.value.code == 2
    assert "unknown op" in capsys.readouterr().err


def test_e2e_delegation(tmp_path, monkeypatch, capsys):
    from peft_kernels.bench import e2e

    def fake_main(argv):
        print("E2E", argv)
        return 0

    monkeypatch.setattr(e2e, "main", fake_main)
    assert cli.main(["e2e", "--device", "cpu", "--json", str(tmp_path / "e2e.json")]) == 0
    assert f"E2E ['--device', 'cpu', '--json', '{tmp_path / 'e2e.json'}']" in capsys.readouterr().out


def test_default_json_path(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date_utc": "2026-11-28T12:00:00Z"}
    first = report.default_json_path(env, root=tmp_path)
    assert first == tmp_path / "nvidia-h100-80gb-hbm3/2026-11-28.json"
    assert report.default_json_path(env).parent == report.RESULTS_DIR / "nvidia-h100-80gb-hbm3"
    report.write_json({"rows": []}, first)
    assert report.default_json_path(env, root=tmp_path).name == "2026-11-28-2.json"  # never overwrites
