"""Every public op under torch.compile(fullgraph=True) with its float arguments changing between calls.

torch 2.14 does not specialize floats: from the second call on, a float argument is a SymFloat in the graph,
and value checks on it (math.isfinite, comparisons) would break the graph. Each op must compile once per
kind of value and give the eager result for every value.
"""

from __future__ import annotations

import pytest
import torch

import peft_kernels as pk


def _lora(s):
    x, W, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    return (lambda s: pk.lora_linear(x, W, None, A, B, scaling=s)), [0.5, 1.5, 3.0]


def _prefix(s):
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    pk_, pv = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    return (lambda s: pk.prefix_attention(q, k, v, pk_, pv, causal=True, scale=s)), [0.3, 0.25, 0.5]


def _distill(s):
    st, te = torch.randn(6, 11), torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    return (lambda t: pk.distillation_loss(st, te, labels, temperature=t, alpha=0.3)), [1.0, 2.0, 4.5]


def _distill_alpha(s):
    st, te = torch.randn(6, 11), torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    return (lambda a: pk.distillation_loss(st, te, labels, temperature=2.0, alpha=a)), [0.1, 0.5, 0.9]


def _adapter(s):
    h = torch.randn(5, 8)
    Wd, bd, Wu, bu = torch.randn(3, 8), torch.randn(3), torch.randn(8, 3), torch.randn(8)
    return (lambda s: pk.bottleneck_adapter(h, Wd, bd, Wu, bu, activation="relu", scaling=s)), [1.0, 0.5, 2.0]


def _norm(rms):
    x, w, b = torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(8)
    return (lambda e: pk.bias_only_norm(x, w, b, eps=e, rms=rms)), [1e-5, 1e-3, 0.5]


CASES = {"lora_linear.scaling": _lora, "bias_only_norm.eps": lambda s: _norm(False),
         "bias_only_norm.eps (rms)": lambda s: _norm(True), "prefix_attention.scale": _prefix,
         "distillation_loss.temperature": _distill, "distillation_loss.alpha": _distill_alpha,
         "bottleneck_adapter.scaling": _adapter}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_op_with_changing_floats(name):
    fn, values = CASES[name](None)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for value in values:
        torch.testing.assert_close(compiled(value), fn(value), msg=lambda m, value=value: f"{name}={value}: {m}")
