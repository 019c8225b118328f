"""A backend declared only here, in the tests: the registry must put it into info(), the benchmark's variants and
the generated backend tests without any other file knowing of it (tests/test_op_contract.py checks all three)."""

from __future__ import annotations

from peft_kernels.ops.lora import FAMILY

NAME = "testonly"

if NAME not in FAMILY.forward_backends:
    _ref_fwd = FAMILY.forward_backends["reference"].run
    _ref_bwd = FAMILY.backward_backends["reference"].run

    @FAMILY.forward(NAME, devices=("cpu",), requires=None, doc="the reference, re-declared by the tests")
    def _forward(*inputs):
        return _ref_fwd(*inputs)

    @FAMILY.backward(NAME, devices=("cpu",), requires=None)
    def _backward(*args):
        return _ref_bwd(*args)
