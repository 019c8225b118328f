"""The native (C++) kernels on CPU: the Philox dropout is the library mask, the column sum is exact."""

import pytest
import torch

from peft_kernels import _backends
from peft_kernels.ops.dropout_mask import dropout_keep_mask
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not _backends.native_status()[0], reason="peft_kernels._C not built")


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 8), (7, 13), (123, 431)])
# 3276.5/65536 is a rounding tie of the 16-bit threshold (rounds up, like 0.05); 65535/65536 keeps only 65535.
@pytest.mark.parametrize("p", [0.05, 0.5, 3276.5 / 65536, 65535 / 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_philox_dropout_matches_reference_mask(shape, p, dtype):
    seed = 2**40 + 17
    x = torch.randn(shape).to(dtype)
    out = torch.ops.peft_kernels.philox_dropout(x, p, seed)
    keep = dropout_keep_mask(seed, *shape, p)
    expected = torch.where(keep, x.double() / (1 - p), torch.zeros((), dtype=torch.float64))
    assert torch.equal(out != 0, keep & (x != 0))
    assert_close(out, expected.to(dtype), dtype=dtype)


def test_philox_dropout_add_regenerates_the_same_mask():
    seed, p = 99, 0.3
    out = torch.randn(37, 29)
    src = torch.randn(37, 29)
    expected = out + src * dropout_keep_mask(seed, 37, 29, p).float() / (1 - p)
    torch.ops.peft_kernels.philox_dropout_add_(out, src, p, seed)
    assert_close(out, expected)


@pytest.mark.parametrize("shape", [(1, 5), (123, 431), (4096, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_column_sum(shape, dtype):
    x = torch.randn(shape).to(dtype)
    got = torch.ops.peft_kernels.column_sum(x)
    assert got.dtype == dtype
    want = x.double().sum(0)
    assert_close(got, want.to(dtype), dtype=dtype)
    got32 = torch.ops.peft_kernels.column_sum(x, torch.float32)
    assert got32.dtype == torch.float32
    assert_close(got32, want.float(), rtol=1e-5, atol=1e-4 if dtype != torch.float64 else 1e-6)


def test_native_checks_raise_runtime_errors():
    with pytest.raises(RuntimeError, match="peft_kernels: column_sum: x must be 2-D"):
        torch.ops.peft_kernels.column_sum(torch.randn(3))
    with pytest.raises(RuntimeError, match="peft_kernels: lora_linear_fwd: inconsistent shapes"):
        torch.ops.peft_kernels.lora_linear_fwd(
            torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(2, 5), torch.randn(4, 2), 1.0, 0.0, 0
        )


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 5), (123, 431), (8192, 4096)])
def test_cuda_kernels_match_cpu(shape):
    x = torch.randn(shape, dtype=torch.bfloat16)
    xc = x.cuda()
    assert torch.equal(torch.ops.peft_kernels.philox_dropout(xc, 0.1, 5).cpu(),
                       torch.ops.peft_kernels.philox_dropout(x, 0.1, 5))
    got = torch.ops.peft_kernels.column_sum(xc, torch.float32).cpu()
    assert_close(got, x.double().sum(0).float(), rtol=1e-4, atol=1e-2)
    out, src = torch.randn(shape).cuda(), torch.randn(shape).cuda()
    ref = out.cpu().clone()
    torch.ops.peft_kernels.philox_dropout_add_(ref, src.cpu(), 0.2, 8)
    torch.ops.peft_kernels.philox_dropout_add_(out, src, 0.2, 8)
    assert_close(out.cpu(), ref)


def test_opcheck_native_ops():
    x = torch.randn(9, 7)
    torch.library.opcheck(torch.ops.peft_kernels.philox_dropout.default, (x, 0.25, 3))
    torch.library.opcheck(torch.ops.peft_kernels.philox_dropout_add_.default, (torch.randn(9, 7), x, 0.25, 3))
    torch.library.opcheck(torch.ops.peft_kernels.column_sum.default, (x,))
    torch.library.opcheck(torch.ops.peft_kernels.column_sum.default, (x.bfloat16(), torch.float32))
    W, A, B = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    torch.library.opcheck(torch.ops.peft_kernels.lora_linear_fwd.default, (x, W, torch.randn(5), A, B, 2.0, 0.1, 4))
    torch.library.opcheck(torch.ops.peft_kernels.bias_only_linear_fwd.default, (x, W, torch.randn(5)))
