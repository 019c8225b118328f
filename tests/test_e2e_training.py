"""End-to-end training on the CPU: the LoRA example, HF Trainer on an apply_lora model, the e2e benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LORA_VARIANTS = ("peft_lora_fp32", "peft_lora_bf16", "peft_lora_patched", "apply_lora")


def _load(relpath: str, name: str):
    """Import a script of the checkout (examples/, benchmarks/ are not packages) by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


# --------------------------------------------------------------------------------------------------
# (a) examples/finetune_lora.py
# --------------------------------------------------------------------------------------------------
def test_example_loss_falls_and_adapter_round_trips(tmp_path):
    from peft_kernels.patch import load_lora

    ft = _load("examples/finetune_lora.py", "finetune_lora")
    out = tmp_path / "adapter"
    res = ft.train(steps=10, batch_size=8, seq_len=64, out=str(out), progress=False)
    losses = res["losses"]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert res["eval_end"] < res["eval_start"] - 0.3, (res["eval_start"], res["eval_end"])

    # The saved adapter on a rebuilt base (same seed = same random base) gives the trained model back.
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    fresh = load_lora(ft.build_model(seq_len=64), str(out))  # applies LoRA from adapter_config.json, then loads
    batch = ft.random_windows(ft.encode(ft.DATA.read_text()), 4, 64, torch.Generator().manual_seed(5))
    assert ft.eval_loss(fresh, batch) == pytest.approx(ft.eval_loss(res["model"], batch), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# (b) HF Trainer
# --------------------------------------------------------------------------------------------------
def test_hf_trainer_trains_only_the_adapters(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from peft_kernels.nn import LoRALinear
    from peft_kernels.patch import apply_lora

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = apply_lora(LlamaForCausalLM(config), target_modules="all-linear", r=4, lora_alpha=8)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(n.endswith(("lora_A", "lora_B")) for n in adapters)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 24), generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(map(lambda v: v == v and v < 10, logged)), logged
    assert trainer.model is model or getattr(trainer.model, "module", None) is model
    for name, p in model.named_parameters():
        if name in adapters:
            # B moves in step 1; A only from step 2 on (its gradient is zero while B = 0).
            assert not torch.equal(p.detach(), before[name]), f"adapter {name} did not train"
        else:
            assert torch.equal(p.detach(), before[name]), f"frozen parameter {name} changed"


# --------------------------------------------------------------------------------------------------
# (c) benchmarks/bench_e2e.py
# --------------------------------------------------------------------------------------------------
def test_bench_e2e_cpu_quick_writes_json(tmp_path, capsys):
    from peft_kernels.bench import e2e as bench
    out = tmp_path / "e2e.json"
    rc = bench.main(["--device", "cpu", "--quick", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "frozen_norms *" in text and "tokens/s" in text

    data = json.loads(out.read_text())
    for key in ("device", "device_type", "torch", "transformers", "peft", "git_sha", "date_utc", "settings", "rows"):
        assert key in data, key
    assert data["device_type"] == "cpu" and data["settings"]["quick"] is True
    assert data["settings"]["shape"]["hidden"] == 64 and data["settings"]["shape"]["batch"] == 2
    rows = {r["variant"]: r for r in data["rows"]}
    assert {"frozen_norms", *LORA_VARIANTS} <= rows.keys()
    floor = rows["frozen_norms"]
    assert floor["floor"] and floor["status"] == "ok" and floor["ratio"] == pytest.approx(1.0)
    expected_ok = ["apply_lora"] + (["peft_lora_fp32", "peft_lora_bf16", "peft_lora_patched"] if _has_peft() else [])
    for name in expected_ok:
        r = rows[name]
        assert r["status"] == "ok", (name, r["reason"], r["traceback"])
        assert r["ms"] > 0 and r["ratio"] > 0 and r["extra"]["tokens_per_s"] > 0
        assert r["extra"]["trainable_params"] > 0
        # Same weights, same tokens, B = 0 at the start: the first loss is the frozen model's (bf16 rounding).
        assert r["extra"]["loss_first"] == pytest.approx(floor["extra"]["loss_first"], rel=1e-2), name
    for r in rows.values():
        assert r["status"] in ("ok", "skipped"), (r["variant"], r["reason"], r["traceback"])
        if r["status"] == "skipped":
            assert r["reason"], r["variant"]


def test_bench_e2e_reports_missing_dependencies_as_skipped(tmp_path, monkeypatch, capsys):
    from peft_kernels.bench import e2e as bench
    # None in sys.modules makes `import x` raise ImportError: peft absent, the patch module not there yet.
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setitem(sys.modules, "peft_kernels.patch", None)
    out = tmp_path / "e2e.json"
    rc = bench.main(["--device", "cpu", "--quick", "--steps", "1", "--json", str(out), "--variants", "*lora*"])
    assert rc == 0, capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"frozen_norms", *LORA_VARIANTS}  # the prefix rows are listed only once the patch exists
    assert rows["frozen_norms"]["status"] == "ok"
    for name in LORA_VARIANTS:
        assert rows[name]["status"] == "skipped", rows[name]
    assert "peft" in rows["peft_lora_fp32"]["reason"] and "peft_kernels.patch" in rows["apply_lora"]["reason"]


# --------------------------------------------------------------------------------------------------
# examples/prefix_tuning.py and examples/patch_peft_model.py
# --------------------------------------------------------------------------------------------------
def test_prefix_tuning_example_trains_and_generates():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        ex = _load("examples/prefix_tuning.py", "prefix_tuning_example")
        model, first, last, n = ex.train(steps=6, batch_size=4, seq_len=64, progress=False)
        assert last < first and 0 < n
        assert len(ex.generate(model, "anna ", max_new_tokens=5)) > 0
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.skipif(not _has_peft(), reason="needs peft")
def test_patch_peft_model_example_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        ex = _load("examples/patch_peft_model.py", "patch_peft_model_example")
        assert ex.main(["--steps", "2", "--device", "cpu"]) == 0
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = capsys.readouterr().out
    assert "14 LoRA layers fused, 0 left to peft" in out and "adapter_model.safetensors" in out
