"""Backend registry: selection order, forcing (context and env), strictness, measured dispatch, info."""

import pytest
import torch

import peft_kernels
from peft_kernels import _backends


@pytest.fixture
def fake_op(monkeypatch):
    """A registered op whose 'cpu' and 'triton' backends accept CPU tensors (backend_status is patched)."""
    monkeypatch.setattr(_backends, "_REGISTRY", dict(_backends._REGISTRY))
    _backends.register_op(
        "fake_op",
        {"cpu": lambda x: None if x.shape[0] < 100 else "cpu: too many rows", "triton": lambda x: None},
        preference={"cpu": ("cpu", "triton", "reference")},
    )
    monkeypatch.setattr(_backends, "backend_status", lambda backend, device: None)
    _backends.clear_tuning_cache()
    yield "fake_op"
    _backends.clear_tuning_cache()


def test_preference_order_and_supports(fake_op):
    assert _backends.select(fake_op, "cpu", torch.zeros(3)) == "cpu"
    assert _backends.select(fake_op, "cpu", torch.zeros(200)) == "triton"


def test_forcing_with_context_and_env(fake_op, monkeypatch):
    with peft_kernels.use_backend("reference"):
        assert _backends.select(fake_op, "cpu", torch.zeros(3)) == "reference"
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    assert _backends.select(fake_op, "cpu", torch.zeros(3)) == "triton"
    with peft_kernels.use_backend(None):
        assert _backends.select(fake_op, "cpu", torch.zeros(3)) == "triton"  # env still applies
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PEFT_KERNELS_BACKEND"):
        _backends.select(fake_op, "cpu", torch.zeros(3))


def test_strict_and_lenient_forcing(fake_op):
    with peft_kernels.use_backend("cpu", strict=True), pytest.raises(NotImplementedError, match="too many rows"):
        _backends.select(fake_op, "cpu", torch.zeros(200))
    with peft_kernels.use_backend("cpu"), pytest.warns(UserWarning, match="falling back"):
        assert _backends.select(fake_op, "cpu", torch.zeros(200)) == "triton"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with peft_kernels.use_backend("metal"):
            pass


def test_measured_dispatch_picks_the_fastest_once_per_key(fake_op, monkeypatch):
    import time

    calls = []

    def run(name):
        calls.append(name)
        time.sleep(0.004 if name == "cpu" else 0.0)

    monkeypatch.setenv("PEFT_KERNELS_TUNE_DISPATCH", "1")
    x = torch.zeros(3)
    assert _backends.select(fake_op, "cpu", x, tune_key=("k",), tune_run=run) == "triton"
    n = len(calls)
    assert n >= 4 and set(calls) == {"cpu", "triton"}  # warm-up + timed reps of both
    assert _backends.select(fake_op, "cpu", x, tune_key=("k",), tune_run=run) == "triton"
    assert len(calls) == n  # remembered
    assert _backends.tuned_choices()[(fake_op, "cpu", ("k",))] == "triton"
    monkeypatch.setenv("PEFT_KERNELS_TUNE_DISPATCH", "0")
    assert _backends.select(fake_op, "cpu", x, tune_key=("other",), tune_run=run) == "cpu"


def test_backend_status_reasons():
    assert _backends.backend_status("reference", "cpu") is None
    assert "cuda tensors only" in _backends.backend_status("cuda", "cpu")
    reason = _backends.backend_status("triton", "cpu")
    assert reason is None or "TRITON_INTERPRET" in reason
    with pytest.raises(ValueError, match="unknown backend"):
        _backends.backend_status("metal", "cpu")


def test_info_lists_every_op_and_backend(capsys):
    text = peft_kernels.info()
    for op in ["lora_linear", "bias_only_linear", "prefix_attention", "bottleneck_adapter", "soft_prompt_embed",
               "distillation_loss"]:
        assert op in text
    assert "peft_kernels._C" in text and "torch" in text


def test_info_cli_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "peft_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends for cpu tensors" in out.stdout
    assert "RuntimeWarning" not in out.stderr
