"""Host overhead per layer call: ``python -m peft_kernels.bench overhead``.

At small token counts (decoding, short sequences, small micro-batches) a layer's Python time is its step time.
This measures, in one process on one CPU thread with tiny tensors (so the kernels cost next to nothing), the
wall time per call of ours beside its anchor: LoRALinear and a patched peft layer against peft's own LoRA layer
(target: <= 0.5x, forward and forward+backward), and every other op against its eager PyTorch formula
(target: <= 1x). ``F.linear`` is printed as the floor of any linear layer.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# LoRA r=8 on a 4x64 input: the size of the host-overhead target.
M, K, N, R = 4, 64, 64, 8


@dataclass
class Row:
    what: str
    mode: str  # "fwd" | "fwd+bwd"
    ours: float  # µs per call
    anchor_name: str
    anchor: float  # µs per call
    target: float  # ours / anchor must be <= this

    @property
    def ratio(self) -> float:
        return self.ours / self.anchor if self.anchor > 0 else float("nan")

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target


def time_per_call(fn: Callable[[], object], number: int = 200, repeat: int = 7) -> float:
    """Median over `repeat` rounds of the mean µs per call of `number` calls (after a warm-up)."""
    for _ in range(max(10, number // 10)):
        fn()
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(rounds)


def _fwd_bwd(module_or_fn: Callable, x: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        module_or_fn(x).sum().backward()
        for p in params:
            p.grad = None

    return step


def _trainable(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


class _One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.proj(x)


def _lora_rows(number: int) -> list[Row]:
    from peft_kernels.nn import LoRALinear

    rows = []
    x = torch.randn(M, K)
    xg = x.clone().requires_grad_(True)
    base = nn.Linear(K, N, bias=False)
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=R, lora_alpha=16)
    with torch.no_grad():
        ours.lora_B.normal_()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        peft_layer = patched = None
    else:
        model = get_peft_model(_One(), LoraConfig(r=R, lora_alpha=16, target_modules=["proj"]))
        peft_layer = model.base_model.model.proj
        from peft_kernels import patch_peft_model

        patched_model = copy.deepcopy(model)
        patch_peft_model(patched_model)
        patched = patched_model.base_model.model.proj
    linear_fwd = time_per_call(lambda: F.linear(x, base.weight), number)
    rows.append(Row("F.linear (the floor)", "fwd", linear_fwd, "F.linear", linear_fwd, float("inf")))
    if peft_layer is None:
        return rows
    anchors = {"fwd": time_per_call(lambda: peft_layer(x), number),
               "fwd+bwd": time_per_call(_fwd_bwd(peft_layer, xg, [xg, *_trainable(peft_layer)]), number)}
    for name, layer in (("LoRALinear", ours), ("patched peft layer", patched)):
        rows.append(Row(name, "fwd", time_per_call(lambda layer=layer: layer(x), number), "peft LoRA layer",
                        anchors["fwd"], 0.5))
        step = _fwd_bwd(layer, xg, [xg, *_trainable(layer)])
        rows.append(Row(name, "fwd+bwd", time_per_call(step, number), "peft LoRA layer", anchors["fwd+bwd"], 0.5))
    return rows


def _op_rows(number: int) -> list[Row]:
    """Each other op at a tiny size against the eager formula it replaces."""
    import peft_kernels as pk

    rows: list[Row] = []

    def pair(what, ours, eager, anchor_name, x):
        params = [x]
        rows.append(Row(what, "fwd", time_per_call(lambda: ours(x), number), anchor_name,
                        time_per_call(lambda: eager(x), number), 1.0))
        rows.append(Row(what, "fwd+bwd", time_per_call(_fwd_bwd(ours, x, params), number), anchor_name,
                        time_per_call(_fwd_bwd(eager, x, params), number), 1.0))

    W, b = torch.randn(N, K), torch.randn(N, requires_grad=True)
    pair("bias_only_linear", lambda x: pk.bias_only_linear(x, W, b), lambda x: F.linear(x, W, b),
         "F.linear(x, W, b)", torch.randn(M, K, requires_grad=True))

    Wd, bd = torch.randn(16, K, requires_grad=True), torch.zeros(16, requires_grad=True)
    Wu, bu = torch.randn(K, 16, requires_grad=True), torch.zeros(K, requires_grad=True)
    pair("bottleneck_adapter", lambda h: pk.bottleneck_adapter(h, Wd, bd, Wu, bu, activation="relu"),
         lambda h: h + F.linear(F.relu(F.linear(h, Wd, bd)), Wu, bu), "h + up(relu(down(h)))",
         torch.randn(M, K, requires_grad=True))

    B_, H, L, D, P = 1, 2, 8, 16, 4
    k, v = torch.randn(B_, H, L, D), torch.randn(B_, H, L, D)
    pk_, pv = torch.randn(H, P, D, requires_grad=True), torch.randn(H, P, D, requires_grad=True)

    def sdpa_cat(q):
        kk = torch.cat([pk_.expand(B_, -1, -1, -1), k], dim=2)
        vv = torch.cat([pv.expand(B_, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv)

    pair("prefix_attention", lambda q: pk.prefix_attention(q, k, v, pk_, pv), sdpa_cat, "SDPA over cat(prefix, k)",
         torch.randn(B_, H, L, D, requires_grad=True))

    emb, prompt = torch.randn(100, K), torch.randn(4, K, requires_grad=True)
    ids = torch.randint(0, 100, (2, 6))
    rows.append(Row("soft_prompt_embed", "fwd", time_per_call(lambda: pk.soft_prompt_embed(ids, emb, prompt), number),
                    "cat(prompt, embedding(ids))",
                    time_per_call(lambda: torch.cat([prompt.expand(2, -1, -1), F.embedding(ids, emb)], 1), number),
                    1.0))

    labels = torch.randint(0, 50, (M,))
    teacher = torch.randn(M, 50)

    def eager_kd(s):
        kl = F.kl_div(F.log_softmax(s / 2.0, -1), F.log_softmax(teacher / 2.0, -1), reduction="batchmean",
                      log_target=True) * 4.0
        return 0.5 * kl + 0.5 * F.cross_entropy(s, labels)

    pair("distillation_loss", lambda s: pk.distillation_loss(s, teacher, labels, temperature=2.0, alpha=0.5),
         eager_kd, "F.kl_div + F.cross_entropy", torch.randn(M, 50, requires_grad=True))
    return rows


def run(number: int = 200) -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _lora_rows(number)
        try:
            rows += _op_rows(number)
        except Exception as exc:  # noqa: BLE001  (an op mid-change must not hide the LoRA rows)
            print(f"overhead: op rows failed: {type(exc).__name__}: {exc}")
        return rows
    finally:
        torch.set_num_threads(threads)


def format_table(rows: list[Row]) -> str:
    lines = [f"host time per call, CPU, 1 thread, tiny tensors (LoRA: {M}x{K} -> {N}, r={R})", "",
             f"  {'what':<22} {'mode':<8} {'ours µs':>9} {'anchor µs':>10} {'ratio':>7} {'target':>7}  anchor"]
    for r in rows:
        target = "-" if r.target == float("inf") else f"<={r.target:g}"
        flag = "" if r.target == float("inf") else ("  ok" if r.ok else "  MISSED")
        lines.append(f"  {r.what:<22} {r.mode:<8} {r.ours:>9.1f} {r.anchor:>10.1f} {r.ratio:>7.2f} {target:>7}  "
                     f"{r.anchor_name}{flag}")
    return "\n".join(lines)


def main(quick: bool = False) -> list[Row]:
    rows = run(number=50 if quick else 200)
    print(format_table(rows), flush=True)
    return rows
