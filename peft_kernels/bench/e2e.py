"""End-to-end training-step benchmark: a Llama-style model, AdamW, every PEFT variant beside the frozen floor.

    python -m peft_kernels.bench e2e --device cuda --json e2e.json
    python benchmarks/bench_e2e.py [--device cuda|cpu] [--json PATH] [--quick] [--variants GLOB ...]   # the same

On CUDA: the target model (hidden 2048, 16 layers, 16 heads / 8 KV heads, intermediate 8192, vocab 32000,
~1.1 B parameters, random init from a LlamaConfig, bf16 weights, SDPA attention), batch 4 x 2048 random tokens,
AdamW, no gradient checkpointing. On the CPU: a tiny model of the same shape family (hidden 64, 2 layers,
batch 2 x 64) so that the script runs anywhere. Every variant gets a freshly built model (same seed, so the
same weights and data) in the same process, and the ratio column divides by the floor measured in this run:

    frozen_norms        only the RMSNorm weights train: the floor for any PEFT method (the full fwd + dX bwd)
    peft_lora_fp32      HF peft LoRA r16 all-linear, default fp32 adapters
    peft_lora_bf16      the same with the adapters cast to bf16
    peft_lora_patched   peft's fp32 adapters, forward served by peft_kernels (patch_peft_model)
    apply_lora          peft_kernels' LoRALinear via apply_lora, fp32 adapters
    peft_prefix_tuning  HF peft prefix tuning, 32 virtual tokens (peft's default: no projection MLP)
    apply_p_tuning_v2   ours, 32 virtual tokens, no projection (the parameterization of peft's default)
    apply_prefix_tuning ours, 32 virtual tokens, with the projection MLP (Li & Liang)
    apply_adapters_houlsby  ours, Houlsby bottleneck adapters (after attention and MLP), bottleneck 64, fp32 masters
    peft_prompt_tuning  HF peft prompt tuning, 32 virtual tokens (fp32 prompt, embedding + cat)
    peft_p_tuning       HF peft P-tuning, MLP encoder, 32 virtual tokens
    peft_p_tuning_patched  the same, forward served by peft_kernels (patch_peft_prompt_model: the fused embedding)
    apply_prompt_tuning ours, 32 virtual tokens, fp32 prompt, fused soft-prompt embedding
    apply_p_tuning      ours, P-tuning with the MLP encoder (peft's layers), 32 virtual tokens

A variant whose dependency is missing (peft, a patch module not written yet) is reported as skipped with the
reason; one that fails is reported as an error with its traceback in the JSON. Nothing stops the run.
New variants (prompt tuning, P-tuning, adapters, ...) are one builder function added to VARIANTS.
"""

import argparse
import datetime as _dt
import fnmatch
import gc
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peft_kernels.bench import harness, report
from peft_kernels.bench.harness import Row, Skip

GiB = 2**30


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"llama h{self.hidden} L{self.layers} b{self.batch}x{self.seq}"


FULL = Shape(hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=8192, vocab=32000, batch=4, seq=2048)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512, batch=2, seq=64)


def build_model(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, shape.seq), use_cache=False, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)  # every variant starts from the same weights
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


# --------------------------------------------------------------------------------------------------
# Variants: name -> builder(model) -> (model to train, note). A builder freezes what it does not train.
# Raise Skip / ImportError when a dependency is missing: the row is reported as skipped with the message.
# --------------------------------------------------------------------------------------------------
LORA_R, LORA_ALPHA, NUM_VIRTUAL_TOKENS = 16, 16, 32


def _frozen_norms(model):
    model.requires_grad_(False)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.requires_grad_(True)
    return model, "RMSNorm weights only"


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise Skip(f"HF peft is not installed ({exc})") from None
    return peft


def _peft_lora(model, adapter_dtype: torch.dtype | None = None):
    peft = _peft()
    config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)  # autocast_adapter_dtype=True: fp32 adapters on a bf16 base
    if adapter_dtype is not None:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    return model


def _ours(name: str):
    try:
        import peft_kernels.patch as patch
    except ImportError as exc:
        raise Skip(f"peft_kernels.patch is not importable yet ({type(exc).__name__}: {exc})") from None
    fn = getattr(patch, name, None)
    if fn is None:
        raise Skip(f"peft_kernels.patch.{name} does not exist yet")
    return fn


def _peft_lora_patched(model):
    patch_peft_model = _ours("patch_peft_model")
    model = _peft_lora(model)
    rep = patch_peft_model(model)
    return model, f"{len(rep.patched)} layers fused, {len(rep.skipped)} left to peft"


def _apply_lora(model):
    return _ours("apply_lora")(model, target_modules="all-linear", r=LORA_R, lora_alpha=LORA_ALPHA,
                               adapter_dtype=torch.float32), "fp32 adapters"


def _peft_prefix_tuning(model):
    peft = _peft()
    config = peft.PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config), f"{NUM_VIRTUAL_TOKENS} tokens, no projection (peft default)"


def _apply_prefix(name: str, **kw):
    def build(model):
        return _ours(name)(model, num_virtual_tokens=NUM_VIRTUAL_TOKENS, **kw), f"{NUM_VIRTUAL_TOKENS} tokens"

    return build


def _apply_houlsby(model):
    from peft_kernels.nn.adapter import AdapterConfig

    m = min(64, model.config.hidden_size)
    return _ours("apply_adapters")(model, AdapterConfig.houlsby(bottleneck=m)), f"Houlsby, bottleneck {m}"


def _peft_prompt(kind: str):
    def build(model):
        peft = _peft()
        if kind == "prompt":
            config = peft.PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, task_type="CAUSAL_LM")
        else:
            config = peft.PromptEncoderConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, task_type="CAUSAL_LM",
                                              encoder_hidden_size=model.config.hidden_size)
        return peft.get_peft_model(model, config), f"{NUM_VIRTUAL_TOKENS} tokens"

    return build


def _peft_p_tuning_patched(model):
    model, note = _peft_prompt("p_tuning")(model)
    return _ours("patch_peft_prompt_model")(model), note + ", fused embedding"


def _apply_prompt(name: str, **kw):
    def build(model):
        return _ours(name)(model, NUM_VIRTUAL_TOKENS, **kw), f"{NUM_VIRTUAL_TOKENS} tokens"

    return build


@dataclass
class Variant:
    build: Callable[[nn.Module], tuple[nn.Module, str] | nn.Module]
    floor: bool = False
    needs: str | None = None  # listed only when peft_kernels.patch has this name (rows for work in progress)


VARIANTS: dict[str, Variant] = {
    "frozen_norms": Variant(_frozen_norms, floor=True),
    "peft_lora_fp32": Variant(lambda m: (_peft_lora(m), "fp32 adapters")),
    "peft_lora_bf16": Variant(lambda m: (_peft_lora(m, torch.bfloat16), "bf16 adapters")),
    "peft_lora_patched": Variant(_peft_lora_patched),
    "apply_lora": Variant(_apply_lora),
    "peft_prefix_tuning": Variant(_peft_prefix_tuning, needs="apply_prefix_tuning"),
    "apply_p_tuning_v2": Variant(_apply_prefix("apply_p_tuning_v2"), needs="apply_prefix_tuning"),
    "apply_prefix_tuning": Variant(_apply_prefix("apply_prefix_tuning"), needs="apply_prefix_tuning"),
    "apply_adapters_houlsby": Variant(_apply_houlsby, needs="apply_adapters"),
    "peft_prompt_tuning": Variant(_peft_prompt("prompt"), needs="apply_prompt_tuning"),
    "peft_p_tuning": Variant(_peft_prompt("p_tuning"), needs="apply_p_tuning"),
    "peft_p_tuning_patched": Variant(_peft_p_tuning_patched, needs="patch_peft_prompt_model"),
    "apply_prompt_tuning": Variant(_apply_prompt("apply_prompt_tuning"), needs="apply_prompt_tuning"),
    "apply_p_tuning": Variant(_apply_prompt("apply_p_tuning", encoder="mlp"), needs="apply_p_tuning"),
}


def _patch_has(name: str) -> bool:
    try:
        import peft_kernels.patch as patch
    except ImportError:
        return False
    return hasattr(patch, name)


def selected_variants(globs: list[str] | None) -> dict[str, Variant]:
    out = {}
    for name, v in VARIANTS.items():
        if v.needs is not None and not _patch_has(v.needs):
            continue
        if v.floor or not globs or any(fnmatch.fnmatch(name, g) for g in globs):
            out[name] = v
    return out


# --------------------------------------------------------------------------------------------------
# Running one variant
# --------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    shape: Shape
    warmup: int
    steps: int
    lr: float = 1e-4


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure(variant: Variant, s: Settings) -> dict:
    """Build, warm up, time. Everything big lives in this frame, so it is freed when the function returns."""
    model = build_model(s.shape, s.device, s.dtype)
    built = variant.build(model)
    model, note = built if isinstance(built, tuple) else (built, "")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the variant left no trainable parameter")
    opt = torch.optim.AdamW(params, lr=s.lr)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, s.shape.vocab, (s.shape.batch, s.shape.seq), generator=gen).to(s.device)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(s.warmup)]  # also allocates the AdamW state before the peak is taken
    _sync(s.device)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(s.steps):
        if s.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() if s.device == "cuda" else None
    losses = [float(x) for x in losses]
    return {
        "note": note, "times": times, "peak": peak, "losses": losses,
        "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
    }


def run_variant(name: str, variant: Variant, s: Settings) -> Row:
    row = Row("e2e", s.shape.label, name, "ok", floor=variant.floor)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations that peft triggers
            m = _measure(variant, s)
    except (Skip, ImportError, NotImplementedError) as exc:
        row.status, row.reason = "skipped", harness._one_line(exc)
    except Exception as exc:  # noqa: BLE001  (a failing variant, OOM included, is a result, not a crash)
        row.status, row.reason = "error", harness._one_line(exc)
        row.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))
    else:
        tokens = s.shape.batch * s.shape.seq
        row.ms = statistics.median(m["times"])
        row.peak_mb = None if m["peak"] is None else m["peak"] / 2**20
        row.note = m["note"]
        row.extra = {
            "tokens_per_s": tokens / (row.ms / 1e3), "peak_gib": None if m["peak"] is None else m["peak"] / GiB,
            "ms_mean": statistics.fmean(m["times"]), "ms_min": min(m["times"]), "ms_steps": m["times"],
            "trainable_params": m["trainable"], "total_params": m["total"],
            # Same weights and data everywhere: LoRA starts at B = 0, so its first loss equals the floor's.
            "loss_first": m["losses"][0], "loss_last": m["losses"][-1],
        }
    finally:
        _free(s.device)
    return row


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def format_table(rows: list[Row]) -> str:
    header = ["variant", "ms/step", "tokens/s", "peak GiB", "ratio", "trainable", "loss@1", "status"]
    notes: dict[str, int] = {}
    body = []
    for r in rows:
        x = r.extra or {}
        if r.status == "ok":
            status = "ok" + (f" ({r.note})" if r.note else "")
        else:
            status = f"{r.status} [{notes.setdefault(f'{r.status}: {r.reason}', len(notes) + 1)}]"
        tps = x.get("tokens_per_s")
        body.append([
            r.variant + (" *" if r.floor else ""), _fmt(r.ms, ".1f"),
            "-" if tps is None else (f"{tps / 1e3:.1f} k" if tps >= 1e4 else f"{tps:.0f}"),
            _fmt(x.get("peak_gib"), ".2f"), _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else ""),
            _count(x.get("trainable_params")),
            _fmt(x.get("loss_first"), ".4f"), status,
        ])
    widths = [max(len(c) for c in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(c.rjust(w) if 0 < i < 7 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(c).rstrip() for c in (header, ["-" * w for w in widths], *body)] + [""]
    out.append("ms/step = median of the timed AdamW steps; ratio = ms / ms of the floor (*) in this run; "
               "peak = max_memory_allocated over the timed steps.")
    out += [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(out)


def default_json_path(env: dict) -> Path:
    """benchmarks/results/<device>/<date>-e2e.json beside the kernel results, never overwriting a run."""
    folder = report.RESULTS_DIR / report.device_slug(env["device"])
    day = env["date_utc"][:10]
    path, n = folder / f"{day}-e2e.json", 2
    while path.exists():
        path, n = folder / f"{day}-e2e-{n}.json", n + 1
    return path


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the results here (default on CUDA: benchmarks/results/<device>/<date>-e2e.json)")
    p.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    p.add_argument("--tiny", action="store_true", help="the CPU's tiny model even on CUDA (a smoke test)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3, --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, --quick 3)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="model weights and activations")
    p.add_argument("--variants", nargs="+", default=None, metavar="GLOB",
                   help=f"only these (globs; the floor always runs): {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    shape = FULL if device == "cuda" and not args.tiny else TINY
    s = Settings(device=device, dtype=DTYPES[args.dtype], shape=shape,
                 warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
                 steps=max(1, args.steps if args.steps is not None else (3 if args.quick else 10)))

    env = report.environment(device)
    variants = selected_variants(args.variants)
    print(f"e2e training step on {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, git {env['git_sha'][:12]}", flush=True)
    print(f"{shape.label} (heads {shape.heads}/{shape.kv_heads}, intermediate {shape.intermediate}, vocab "
          f"{shape.vocab}), {args.dtype}, AdamW, {s.warmup} warm-up + {s.steps} timed steps", flush=True)

    rows = []
    interrupted = False
    try:
        for name, variant in variants.items():
            t0 = time.perf_counter()
            rows.append(run_variant(name, variant, s))
            print(f"  {name}: {rows[-1].status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    except KeyboardInterrupt:  # gpu_suite.sh sends SIGINT at its time limit: keep and report what finished
        interrupted = True
        print("  interrupted: reporting the variants that finished", flush=True)
    harness.add_ratios(rows)
    print(format_table(rows), flush=True)

    settings = {
        "benchmark": "e2e", "shape": vars(shape), "dtype": args.dtype, "warmup": s.warmup, "steps": s.steps,
        "quick": args.quick, "interrupted": interrupted, "optimizer": f"AdamW lr={s.lr}",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA},
        "num_virtual_tokens": NUM_VIRTUAL_TOKENS, "threads": torch.get_num_threads(),
        "timing": "CUDA events per step, median" if device == "cuda" else "perf_counter per step, median",
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    json_path = args.json or (default_json_path(env) if device == "cuda" else None)
    if json_path is not None:
        print(f"json: {report.write_json(report.to_json(rows, env, settings), json_path)}")
    return 1 if interrupted or any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
