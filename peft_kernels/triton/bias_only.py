"""Triton kernels and launchers for the BitFit linear (no autograd here; ops/bias_only.py wraps them).

Math (x [M, K], frozen W [N, K], trainable b [N]):

    y  = x @ W^T + b                one GEMM, the bias added in the epilogue from the fp32 accumulator
    dx = dy @ W                     one GEMM over dy's rows ...
    db = sum_m dy                   ... whose programs also sum the dy tiles they stream (no second read of dy)
    dW                              never computed: W is frozen and x is not even saved

The db fusion: program (m tile i, k tile j) of the dx GEMM streams the dy tiles (i, t) for every reduction
step t over N. Each step t is owned by exactly one k-tile column, j = t mod (number of k tiles), whose
program sums the tile's rows and stores the [BLOCK_N] result into partial[i, t-th slice]. Every (i, t) is
written once, so the partials are plain stores (no atomics), the work is spread evenly over all programs,
and a tiny second kernel sums partial[:, n] over i in a fixed order: db is deterministic run to run.

Two paths for the GEMMs, as in triton/lora.py: TMA tensor descriptors + a persistent, L2-grouped tile loop
(Hopper), and a pointer-based fallback for operands TMA cannot address (16-byte aligned leading strides and
bases, unit inner stride). ``peft_kernels._config.force_gemm_path`` picks one (tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from peft_kernels import _config
from peft_kernels.triton._common import alloc as _alloc

# Host helpers shared with the LoRA GEMMs (TMA layout checks, descriptor scratch allocator, SM count).
from peft_kernels.triton._common import ensure_allocator as _ensure_allocator
from peft_kernels.triton._common import sm_count as _sm_count
from peft_kernels.triton._common import tile_coords as _tile_coords
from peft_kernels.triton._common import tma_compatible, use_tma
from peft_kernels.triton._common import tma_layout as _tma_layout

__all__ = ["bias_only_forward", "bias_only_backward", "why_not", "use_tma", "tma_compatible"]

_INTERPRET = _config.SETTINGS.triton_interpret
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Configs: autotuned on a GPU; one small config under the interpreter (tests may shrink it further).
# ----------------------------------------------------------------------------------------------------------


# BM, BN, BK, warps, stages (BN is the output tile width, BK the reduction step).
_GEMM_SHAPES = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 32, 4, 4),
]
# PEFT_KERNELS_TRITON_AUTOTUNE=0: the fast config and a small one that fits where it does not (fp32).
_GEMM_FIXED = [(128, 128, 64, 8, 3), (64, 64, 32, 4, 2)]
SMEM_LIMIT = 232448  # Hopper's opt-in shared memory per block (227 KB)


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        # The launcher passes the block sizes (tests pick them with _config.override_interpret_blocks).
        return [triton.Config({"GROUP_M": 2})]
    shapes = _GEMM_SHAPES if _config.SETTINGS.triton_autotune else _GEMM_FIXED
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def gemm_smem_estimate(bm: int, bn: int, bk: int, stages: int, elem: int, tma: bool) -> int:
    """Shared memory (bytes) of a config: the pipelined A/B ring and the TMA store's staging tile (the column
    sums reduce a register tile: no shared buffer of their own beyond the reduction scratch), plus the pipeline's
    barriers and alignment (2 KB; the sm_90a compile of the 128x256 TMA config measured 1048 B over the tiles)."""
    return stages * (bm * bk + bk * bn) * elem + (bm * bn * elem if tma else 0) + 2048


def _prune(configs, named_args, **kwargs):
    # Tiles far larger than the problem only waste tuning time; configs over the shared memory limit would
    # fail to launch.
    m, n = named_args["M"], named_args["N"]
    elem = named_args["a_ptr"].element_size()
    tma = "stride_a" in named_args
    keep = [
        c
        for c in configs
        if "BLOCK_M" not in c.kwargs
        or (c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
            and gemm_smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                                   elem, tma) <= SMEM_LIMIT)
    ]
    return keep or configs[-1:]


# The smallest BLOCK_M any config can take: the partial-sum buffer has one row per m tile of that size.
_MIN_BLOCK_M = 16 if _INTERPRET else 64
_INTERPRET_GEMM_BLOCKS = (32, 32, 32)  # BLOCK_M, BLOCK_N, BLOCK_K under the interpreter
_REDUCE_BLOCK_N = 32 if _INTERPRET else 256
_COLSUM_BLOCKS = (32, 32) if _INTERPRET else (128, 128)  # BLOCK_M, BLOCK_N of the db-only kernel


def _interpret_blocks(name: str, default):
    return _config.interpret_blocks(name, default) if _INTERPRET else None


# ----------------------------------------------------------------------------------------------------------
# Kernels. Naming is the GEMM's: C[M, N] = A[M, K] @ B[K, N]. Forward: A = x, B = W^T (stored [N, K]), bias
# epilogue. dx: A = dy, B = W (stored [K_red = N_out, K_in]), COLSUM of A's tiles into `part`.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _colsum_step(a, part_ptr, pid_m, pid_n, ki, num_pid_n, K, BLOCK_K: tl.constexpr):
    # This program owns reduction step ki iff ki = pid_n (mod num_pid_n): one writer per partial slice.
    if ki % num_pid_n == pid_n:
        cs = tl.sum(a.to(tl.float32), axis=0)
        rk = ki * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(part_ptr + pid_m.to(tl.int64) * K + rk.to(tl.int64), cs, mask=rk < K)


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "B_T", "HAS_BIAS", "HAS_COLSUM"],
    prune_configs_by={"early_config_prune": _prune},
    # Benchmark runs of configs with a smaller BLOCK_M write partial rows the final config does not.
    restore_value=["part_ptr"],
)
@triton.jit
def _gemm_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, part_ptr,
    M, N, K, M_BUCKET,
    stride_a, stride_b, stride_c,
    B_T: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COLSUM: tl.constexpr,
    DOT_PREC: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # TMA zero-fills out-of-bounds loads (so out-of-range rows add nothing to the column sums) and clips stores.
    a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_a, 1], [BLOCK_M, BLOCK_K])
    if B_T:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_b, 1], [BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_b, 1], [BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_c, 1], [BLOCK_M, BLOCK_N])

    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile id so the flattened loop's prologue does not depend on it.
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            if B_T:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            if HAS_COLSUM:
                _colsum_step(a, part_ptr, pid_m, pid_n, ki, num_pid_n, K, BLOCK_K)

        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        if HAS_BIAS:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_COLSUM"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["part_ptr"],
)
@triton.jit
def _gemm_ptr_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, part_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_COLSUM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_rows = a_ptr + rm64[:, None] * stride_am
    b_cols = b_ptr + rn64[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        rk = ki * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rk64 = rk.to(tl.int64)
        # Masked rows load as zero: they add nothing to the column sums either.
        a = tl.load(a_rows + rk64[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + rk64[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if HAS_COLSUM:
            _colsum_step(a, part_ptr, pid_m, pid_n, ki, num_pid_n, K, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _column_sum_kernel(
    x_ptr, part_ptr, M, N, stride_xm, stride_xn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """db alone (dx not needed): partial[i, n] = sum of rows i*BLOCK_M .. of x, one program per tile."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rn64[None, :] * stride_xn
    x = tl.load(ptrs, mask=(rm < M)[:, None] & n_ok[None, :], other=0.0)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + rn64, tl.sum(x.to(tl.float32), axis=0), mask=n_ok)


@triton.jit
def _reduce_rows_kernel(part_ptr, out_ptr, R, N, BLOCK_N: tl.constexpr):
    """out[n] = sum_i part[i, n] in a fixed order (fp32), stored in out's dtype: the deterministic second stage."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ptrs = part_ptr + rn64
    for _ in range(R):
        acc += tl.load(ptrs, mask=n_ok, other=0.0)
        ptrs += N  # pointer arithmetic: 64-bit
    tl.store(out_ptr + rn64, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


def why_not(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why these launchers cannot serve (x [M, K], weight [N, K]), or None when they can (memory safety and
    what the kernels handle; the public op has validated shapes already)."""
    if x.dtype not in _ACT_DTYPES:
        return f"x has dtype {x.dtype}; the triton backend takes fp16, bf16 or fp32"
    if weight.dtype != x.dtype:
        return f"weight has dtype {weight.dtype}, x has {x.dtype}; the triton backend needs them equal"
    if _INTERPRET and x.dtype == torch.bfloat16:
        return "x is bf16: tl.dot on bf16 gives wrong results under TRITON_INTERPRET=1"
    if x.shape[1] < 1 or weight.shape[0] < 1:
        return f"in_features and out_features must be >= 1, got K={x.shape[1]}, N={weight.shape[0]}"
    return None


def _on_device(device: torch.device):
    # Triton launches on the current device, not the tensors': make theirs current.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(1, m))


def _dot_prec(dtype: torch.dtype):
    # fp32 activations: exact fp32 products (no tf32), so the interpreter and the GPU agree.
    return "ieee" if dtype == torch.float32 else None


def _gemm(a, b, c, bias=None, part=None) -> None:
    """c[M, N] = a[M, K] @ b[K, N] (+ bias[N]); with `part` [>= cdiv(M, _MIN_BLOCK_M), K] fp32 zeros, also the
    per-m-tile column sums of a. a and c are row-major; b may be a transposed view (W^T)."""
    M, K = a.shape
    N = b.shape[1]
    blocks = _interpret_blocks("bias_only_gemm", _INTERPRET_GEMM_BLOCKS)
    meta = {} if blocks is None else dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), blocks))
    if blocks is not None and blocks[0] < _MIN_BLOCK_M:
        raise ValueError(f"bias_only_gemm: BLOCK_M={blocks[0]} below the partial buffer's {_MIN_BLOCK_M}")
    flags = dict(HAS_BIAS=bias is not None, HAS_COLSUM=part is not None, DOT_PREC=_dot_prec(a.dtype), **meta)
    bias_t = bias if bias is not None else c
    part_t = part if part is not None else c
    if use_tma("bias_only_linear", a, b, c):
        _ensure_allocator(c.device)
        a_t, lda = _tma_layout(a)
        b_t, ldb = _tma_layout(b)
        c_t, ldc = _tma_layout(c)
        assert not a_t and not c_t
        num_sms = _sm_count(c.device)
        grid = lambda META: (min(num_sms, triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])),)
        _gemm_tma_kernel[grid](
            a, b, c, bias_t, part_t, M, N, K, _m_bucket(M), lda, ldb, ldc,
            B_T=b_t, NUM_SMS=num_sms, FLATTEN=_config.SETTINGS.triton_flatten, **flags,
        )  # fmt: skip
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        _gemm_ptr_kernel[grid](
            a, b, c, bias_t, part_t, M, N, K, _m_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), **flags,
        )  # fmt: skip


def _reduce(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, n = part.shape
    out = _alloc((n,), dtype, part.device)
    block = _interpret_blocks("bias_only_reduce", _REDUCE_BLOCK_N) or _REDUCE_BLOCK_N
    _reduce_rows_kernel[(triton.cdiv(n, block),)](part, out, rows, n, BLOCK_N=block)
    return out


def bias_only_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x @ W^T + b in x's dtype; x [M, K] row-major, bias [N] in any float dtype."""
    M = x.shape[0]
    N = weight.shape[0]
    y = _alloc((M, N), x.dtype, x.device)
    if M == 0:
        return y
    with _on_device(x.device):
        _gemm(x, weight.t(), y, bias=bias)
    return y


def bias_only_backward(
    dy: torch.Tensor, weight: torch.Tensor, need_dx: bool, need_db: bool, db_dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx [M, K] in dy's dtype, db [N] in db_dtype), None where not requested; dy [M, N] row-major.
    One pass over dy: the dx GEMM sums the dy tiles it streams. dW is never formed."""
    M, N = dy.shape
    K = weight.shape[1]
    dev = dy.device
    dx = _alloc((M, K), dy.dtype, dev) if need_dx else None
    if M == 0:
        return dx, (torch.zeros((N,), dtype=db_dtype, device=dev) if need_db else None)
    db = None
    with _on_device(dev):
        if need_dx:
            part = None
            if need_db:  # zeros: rows past the chosen BLOCK_M's tile count are never written
                part = torch.zeros((triton.cdiv(M, _MIN_BLOCK_M), N), dtype=torch.float32, device=dev)
            _gemm(dy, weight, dx, part=part)
            if need_db:
                db = _reduce(part, db_dtype)
        elif need_db:
            bm, bn = _interpret_blocks("bias_only_colsum", _COLSUM_BLOCKS) or _COLSUM_BLOCKS
            part = torch.empty((triton.cdiv(M, bm), N), dtype=torch.float32, device=dev)
            _column_sum_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                dy, part, M, N, dy.stride(0), dy.stride(1), BLOCK_M=bm, BLOCK_N=bn
            )
            db = _reduce(part, db_dtype)
    return dx, db




# ----------------------------------------------------------------------------------------------------------
# Compile check (peft_kernels/triton/_compile_check.py): every variant the launchers can pick at the benchmark
# shape (M = 8192 tokens, 4096 -> 14336), as it would be compiled for sm_90a.
# ----------------------------------------------------------------------------------------------------------
_BENCH = (8192, 4096, 14336)  # M, K, N


def compile_variants(quick: bool = False) -> list:
    from ._compile_check import jit_variant

    M, K, N = _BENCH
    out = []
    dtypes = {"bf16": 2} if quick else {"bf16": 2, "fp16": 2, "fp32": 4}
    sets = {"autotune": _GEMM_SHAPES} if quick else {"autotune": _GEMM_SHAPES, "fixed": _GEMM_FIXED}
    for dt, elem in dtypes.items():
        # (role, GEMM M, N, K, B stored [N, K]?, bias, column sums): y = x W^T + b; dx = dy W with db partials.
        roles = [("fwd", M, N, K, True, True, False), ("dx_db", M, K, N, False, False, True)]
        for role, gm, gn, gk, b_t, bias, colsum in roles:
            for set_name, shapes in sets.items():
                for bm, bn, bk, w, st in shapes:
                    for path in ("tma", "pointer"):
                        if path == "pointer" and (quick or set_name == "fixed" or (bm, bn) != (128, 256)):
                            continue  # the fallback path: one config shows it compiles
                        est = gemm_smem_estimate(bm, bn, bk, st, elem, path == "tma")
                        if est > SMEM_LIMIT:
                            continue  # pruned before launch, as _prune does
                        ptrs = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "bias_ptr": "*fp32",
                                "part_ptr": "*fp32"}
                        cx = dict(HAS_BIAS=bias, HAS_COLSUM=colsum, DOT_PREC="ieee" if dt == "fp32" else None,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
                        if path == "tma":
                            kern = _gemm_tma_kernel
                            args = dict(ptrs, M=gm, N=gn, K=gk, M_BUCKET=gm, stride_a=gk, stride_b=gk if b_t else gn,
                                        stride_c=gn)
                            cx.update(B_T=b_t, NUM_SMS=132, FLATTEN=_config.SETTINGS.triton_flatten)
                        else:
                            kern = _gemm_ptr_kernel
                            args = dict(ptrs, M=gm, N=gn, K=gk, M_BUCKET=gm, stride_am=gk, stride_ak=1,
                                        stride_bk=1 if b_t else gn, stride_bn=gk if b_t else 1, stride_cm=gn,
                                        stride_cn=1)
                        # fp32 runs exact ieee products (no tf32): FMA by design, so no wgmma rule for it.
                        low = dt != "fp32"
                        out.append(jit_variant(
                            f"bias_only.gemm_{path}.{role}.{dt}.{bm}x{bn}x{bk}w{w}s{st}"
                            f"{'.fixed' if set_name == 'fixed' else ''}",
                            kern, args, cx, num_warps=w, num_stages=st,
                            kind=("gemm_tma" if path == "tma" else "gemm") if low else "stream",
                            main=low and set_name == "autotune" and bm * bn >= 128 * 128, smem_estimate=est,
                        ))  # fmt: skip
        bm, bn = _COLSUM_BLOCKS
        out.append(jit_variant(f"bias_only.column_sum.{dt}.{bm}x{bn}", _column_sum_kernel,
                               dict(x_ptr=f"*{dt}", part_ptr="*fp32", M=M, N=N, stride_xm=N, stride_xn=1),
                               dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=4, num_stages=1, kind="stream"))
        if quick:
            break
    out.append(jit_variant(f"bias_only.reduce_rows.{_REDUCE_BLOCK_N}", _reduce_rows_kernel,
                           dict(part_ptr="*fp32", out_ptr="*fp32", R=M // _MIN_BLOCK_M, N=N),
                           dict(BLOCK_N=_REDUCE_BLOCK_N), num_warps=4, num_stages=1, kind="stream"))
    return out
