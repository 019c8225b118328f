"""Tests generated from the registry: every forward/backward backend of every op family against the family's
reference, over the cases in tests/cases/<op>.py; opcheck of every family's custom ops; and the proof that a
backend declared only in a test module reaches info(), the benchmark and these tests."""

from __future__ import annotations

import pytest
import torch

import peft_kernels
from peft_kernels import _op
from tests.cases import CASES, load_all
from tests.cases._declared_in_tests import NAME as DECLARED
from tests.helpers import INTERPRET, TOLERANCES

load_all()
FAMILIES = _op.families()


def _params():
    out = []
    for op, family in sorted(FAMILIES.items()):
        for backend in family.forward_backends:
            if backend == "reference":
                continue
            for case in CASES.get(op, []):
                for dtype in case.dtypes:
                    marks = [pytest.mark.triton] if backend == "triton" else []
                    if dtype == torch.float16 and backend != "triton":
                        continue  # fp16 is for the interpreter; the CPU backends are checked in fp32
                    out.append(pytest.param(op, backend, case, dtype, marks=marks,
                                            id=f"{op}-{backend}-{case.name}-{str(dtype)[6:]}"))
    return out


PARAMS = _params()


def _run(family, backend, inputs):
    """Public outputs and the gradients of every differentiable input that requires one, with `backend` forced."""
    leaves = family.Inputs(*(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                             else t for t in inputs))
    with peft_kernels.use_backend(backend, strict=True):
        outs = family(leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    diff = [getattr(leaves, n) for n in family.differentiable]
    wanted = [t for t in diff if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted and loss.requires_grad else ()
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("op, backend, case, dtype", PARAMS)
def test_backend_matches_reference(op, backend, case, dtype):
    if backend == "triton" and not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    family = FAMILIES[op]
    inputs = case.make(dtype=dtype)
    reason = family.why_not_reason(backend, inputs)
    if reason is not None:
        pytest.skip(f"{backend} does not serve {case.name}: {reason}")
    outs, grads = _run(family, backend, inputs)
    # The oracle: the reference in float64 on the same values.
    ref_inputs = family.Inputs(*(t.detach().double().requires_grad_(t.requires_grad)
                                 if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs))
    ref_outs, ref_grads = _run(family, "reference", ref_inputs)
    rtol, atol = TOLERANCES[dtype]
    for i, (a, e) in enumerate(zip(outs, ref_outs)):
        assert not torch.isnan(a).any() or torch.isnan(e).any(), f"output {i} has NaN"
        torch.testing.assert_close(a.double(), e, rtol=rtol * 10, atol=atol * 10, msg=lambda m, i=i: f"output {i}: {m}")
    assert len(grads) == len(ref_grads)
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert (a is None) == (e is None), f"gradient {i}: one backend returned none"
        if a is not None:
            torch.testing.assert_close(a.double(), e, rtol=rtol * 10, atol=atol * 10,
                                       msg=lambda m, i=i: f"gradient {i}: {m}")


def _opcheck_params():
    out = []
    for op, family in sorted(FAMILIES.items()):
        cases = CASES.get(op, [])
        for backend in family.forward_backends:
            if cases and backend != "triton":
                out.append(pytest.param(op, backend, cases[0], id=f"{op}-{backend}"))
    return out


@pytest.mark.parametrize("op, backend, case", _opcheck_params())
def test_opcheck_custom_ops(op, backend, case):
    family = FAMILIES[op]
    inputs = case.make(dtype=torch.float32)
    if family.why_not_reason(backend, inputs) is not None:
        pytest.skip(family.why_not_reason(backend, inputs))
    forward_op, _ = family.custom_ops
    torch.library.opcheck(forward_op, (*inputs, backend, family.backward_for(backend, inputs)))


def test_every_family_has_cases_and_a_reference():
    for op, family in FAMILIES.items():
        assert "reference" in family.forward_backends and "reference" in family.backward_backends, op
        assert CASES.get(op), f"{op} has no cases in tests/cases/"


def test_a_backend_declared_in_a_test_module_is_everywhere():
    from peft_kernels.bench import cases as bench_cases

    text = peft_kernels.info(file=open("/dev/null", "w"))  # noqa: SIM115
    assert DECLARED in text
    variants = {c.variant for c in bench_cases.lora_cases("cpu", quick=True)}
    assert f"ours_{DECLARED}" in variants
    assert any(p.values[1] == DECLARED for p in PARAMS)
