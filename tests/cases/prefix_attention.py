"""prefix_attention cases: causal or not, GQA/MQA, key padding, shared or per-batch prefixes, P = 1 / 7 / 32,
L = 1 / 13 / decoding / Lq > Lk, transformers' [B, L, H, D]-strided layout, fp32 prefixes on fp16 activations."""

from __future__ import annotations

import torch

from peft_kernels.ops.prefix_attention import FAMILY
from tests.cases import OpCase, register
from tests.prefix_attention_cases import make_inputs


def _case(name, B, Hq, Hkv, Lq, Lk, P, D, causal, shared=True, pad=False, bshd=False, fp32_prefix=False, seed=0):
    def make(dtype=torch.float32):
        prefix_dtype = torch.float32 if fp32_prefix and dtype != torch.float64 else None
        q, k, v, pk, pv, mask = make_inputs("cpu", dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad, bshd=bshd,
                                            prefix_dtype=prefix_dtype, seed=seed)
        q, k, v, pk, pv = (t.requires_grad_(True) for t in (q, k, v, pk, pv))
        return FAMILY.Inputs(q, k, v, pk, pv, causal, mask, D**-0.5)

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


CASES = (
    _case("gqa_L13_P7_causal_pad_hl", 2, 4, 2, 13, 13, 7, 16, True, pad=True, bshd=True),
    _case("mha_L13_P1_full_perbatch", 2, 2, 2, 13, 13, 1, 24, False, shared=False),
    _case("mqa_L1_P32_causal", 2, 4, 1, 1, 1, 32, 16, True, pad=False),
    _case("gqa_decode_Lq1_Lk19_P7_causal_pad", 3, 4, 2, 1, 19, 7, 16, True, pad=True),
    _case("mha_chunk_Lq5_Lk12_P32_causal_hl", 1, 2, 2, 5, 12, 32, 32, True, bshd=True),
    _case("mqa_Lq12_Lk5_P7_causal_pad", 2, 2, 1, 12, 5, 7, 16, True, pad=True),
    _case("gqa_L40_P32_causal_fp32prefix_hl", 2, 4, 2, 40, 40, 32, 16, True, pad=True, bshd=True, fp32_prefix=True),
)
register("prefix_attention", *CASES)
