"""The backend contract (peft_kernels/_op.py): preference order and why_not, forcing (context and env),
strictness, measured dispatch, availability reasons, separate forward/backward declarations, info."""

import dataclasses
import time
from typing import NamedTuple

import pytest
import torch

import peft_kernels
from peft_kernels import _backends, _config, _op


class FakeInputs(NamedTuple):
    x: torch.Tensor
    scale: float


@pytest.fixture
def fake():
    """A family whose 'cpp' backend serves fewer than 100 rows, 'triton' any CPU input (requires=None)."""
    family = _op.OpFamily(
        "fake_op", FakeInputs,
        schema="(Tensor x, float scale) -> Tensor", backward_schema="(Tensor dy, float scale)",
        differentiable=("x",), save=lambda i, out: (i.scale,), fake=lambda i: torch.empty_like(i.x),
        backward_fake=lambda dy, scale, needs: (torch.empty_like(dy),),
        preference={"cpu": ("cpp", "triton")}, tune_key=lambda i: ("k", i.x.shape[0] > 10),
    )
    calls = []

    def make(name, delay=0.0):
        @family.forward(name, devices=("cpu",), requires=None)
        def _(x, scale):
            calls.append(name)
            time.sleep(delay)
            return x * scale

        @family.backward(name, devices=("cpu",), requires=None)
        def _(dy, scale, needs):
            return (dy * scale,)

    make("reference")
    make("cpp", delay=0.004)
    make("triton")
    family.why_not("cpp", both=True)(lambda i: None if i.x.shape[0] < 100 else "x: too many rows for cpp")
    _config.clear_tuning_cache()
    yield family, calls
    _op.FAMILIES.pop("fake_op")
    _config.clear_tuning_cache()


def _inputs(rows):
    return FakeInputs(torch.randn(rows, 2), 2.0)


def test_preference_order_and_why_not(fake):
    family, _ = fake
    assert family.select(_inputs(3)) == ("cpp", "cpp")
    assert family.select(_inputs(200)) == ("triton", "triton")
    assert "too many rows" in family.why_not_reason("cpp", _inputs(200))


def test_forcing_with_context_and_env(fake, monkeypatch):
    family, _ = fake
    with peft_kernels.use_backend("reference"):
        assert family.select(_inputs(3))[0] == "reference"
    monkeypatch.setattr(_config, "SETTINGS", dataclasses.replace(_config.SETTINGS, backend="triton"))
    assert family.select(_inputs(3))[0] == "triton"
    with peft_kernels.use_backend(None):
        assert family.select(_inputs(3))[0] == "cpp"  # None inside a block: automatic, whatever the env says
    monkeypatch.setattr(_config, "SETTINGS", dataclasses.replace(_config.SETTINGS, backend="bogus"))
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        family.select(_inputs(4))


def test_strict_and_lenient_forcing(fake):
    family, _ = fake
    with peft_kernels.use_backend("cpp", strict=True), pytest.raises(NotImplementedError, match="too many rows"):
        family.select(_inputs(200))
    with peft_kernels.use_backend("cpp"), pytest.warns(UserWarning, match="falling back"):
        assert family.select(_inputs(201))[0] == "triton"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with peft_kernels.use_backend("metal"):
            pass
    with pytest.raises(TypeError, match="use_backend: name"):
        peft_kernels.use_backend(3)


def test_measured_dispatch_picks_the_fastest_once_per_key(fake):
    family, calls = fake
    with _config.tuning(True):
        assert family.select(_inputs(3))[0] == "triton"  # cpp sleeps: slower
        n = len(calls)
        assert n >= 4 and set(calls) == {"cpp", "triton"}  # warm-up + timed reps of both
        assert family.select(FakeInputs(torch.randn(3, 2), 3.0))[0] == "triton"
        assert len(calls) == n  # remembered (the float's value is not part of the key)
        assert peft_kernels.tuned_choices()[("fake_op", "cpu", ("k", False))] == "triton"
    with _config.tuning(False):
        assert family.select(_inputs(5))[0] == "cpp"


def test_forward_and_backward_declared_separately(fake):
    family, _ = fake

    @family.forward("cuda", devices=("cpu",), requires=None, backward_by="triton")
    def _(x, scale):
        return x * scale

    with peft_kernels.use_backend("cuda", strict=True):
        assert family.select(_inputs(3)) == ("cuda", "triton")
        x = torch.randn(3, 2, requires_grad=True)
        family(FakeInputs(x, 2.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    rows = [r for r in _op.table("cpu") if r["op"] == "fake_op" and r["backend"] == "cuda"]
    assert rows and rows[0]["direction"] == "forward" and "backward by triton" in rows[0]["note"]


def test_availability_reasons():
    assert _backends.availability(None, "cpu") is None
    assert "CUDA" in _backends.availability("native_cuda", "cpu") or "without CUDA" in _backends.availability(
        "native_cuda", "cpu")
    reason = _backends.availability("triton", "cpu")
    assert reason is None or "TRITON_INTERPRET" in reason
    with pytest.raises(ValueError, match="unknown backend requirement"):
        _backends.availability("metal", "cpu")


def test_info_lists_every_op_and_backend():
    text = peft_kernels.info(file=open("/dev/null", "w"))  # noqa: SIM115
    for op, family in _op.families().items():
        assert op in text
        for name in family.forward_backends:
            assert name in text
    for op in ["lora_linear", "bias_only_linear", "prefix_attention", "bottleneck_adapter", "soft_prompt_embed",
               "distillation_loss"]:
        assert op in text
    assert "peft_kernels._C" in text and "torch" in text


def test_info_cli_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "peft_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends for cpu tensors" in out.stdout and "backends for cuda tensors" in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_tuning_switch_is_part_of_the_cached_choice(fake):
    family, _ = fake
    inputs = _inputs(4)
    with _config.tuning(False):
        assert family.select(inputs)[0] == "cpp"
    with _config.tuning(True):
        assert family.select(inputs)[0] == "triton"  # measured, not the choice cached with tuning off
