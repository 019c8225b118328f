"""apply_lora / remove_lora on tiny random-init transformers models, against HF peft's get_peft_model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft_kernels.nn import LoRAConv1D, LoRALinear
from peft_kernels.patch import apply_lora, remove_lora
from tests.helpers import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 100
ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert", "t5")


# --------------------------------------------------------------------------------------------------
# Tiny models and batches (shared with the other test files of this folder)
# --------------------------------------------------------------------------------------------------
def build(arch: str) -> nn.Module:
    """A tiny random-init model with a loss head, in eval mode (base-model dropout off; grads still flow)."""
    t = transformers
    dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**dec))
    elif arch == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(**dec, sliding_window=None))
    elif arch == "qwen2":  # q/k/v projections carry biases
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**dec))
    elif arch == "gpt2":  # Conv1D layers
        model = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64))
    elif arch == "bert":
        model = t.BertForMaskedLM(t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64))
    elif arch == "t5":
        model = t.T5ForConditionalGeneration(t.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
            decoder_start_token_id=0, pad_token_id=0))
    else:
        raise ValueError(arch)
    return model.eval()


def batch(arch: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (2, 5), generator=g) if arch == "t5" else ids}


def loss_and_grads(model: nn.Module, inputs: dict, names=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


def peft_name(model: nn.Module, name: str) -> str:
    """The name peft gives to our parameter ``name`` (adapter "default")."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if isinstance(mod, LoRALinear):
        if attr in ("lora_A", "lora_B"):
            return f"base_model.model.{mod_name}.{attr}.default.weight"
        return f"base_model.model.{mod_name}.base_layer.{attr}"
    return f"base_model.model.{name}"


@torch.no_grad()
def copy_adapters_from_peft(peft_model: nn.Module, model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            layer = peft_model.base_model.model.get_submodule(name)
            m.lora_A.copy_(layer.lora_A["default"].weight)
            m.lora_B.copy_(layer.lora_B["default"].weight)


def peft_and_ours(arch: str, **lora_kw):
    """(peft model, our model) from the same base weights and the same (non-zero) adapter weights."""
    torch.manual_seed(0)
    base = build(arch)
    ours = copy.deepcopy(base)
    # peft's new lora_dropout modules start in train mode even in an eval model: eval() again.
    ref = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kw)).eval()
    apply_lora(ours, **lora_kw)
    copy_adapters_from_peft(ref, ours)
    return ref, ours


# --------------------------------------------------------------------------------------------------
# Parity with HF peft
# --------------------------------------------------------------------------------------------------
CASES = {
    "llama": dict(target_modules=["q_proj", "v_proj", "mlp.down_proj"], r=4, lora_alpha=8),
    "mistral": dict(target_modules=r".*\.(q|o)_proj", r=4, lora_alpha=16),
    "qwen2": dict(target_modules="all-linear", r=4, lora_alpha=8, bias="lora_only"),
    "gpt2": dict(target_modules="all-linear", r=4, lora_alpha=8, bias="all"),
    "bert": dict(target_modules=["query", "value", "dense"], r=4, lora_alpha=8,
                 exclude_modules=["cls.predictions.transform.dense"]),
    "t5": dict(target_modules="all-linear", r=4, lora_alpha=8, use_rslora=True),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_peft_loss_and_grads(arch):
    ref, ours = peft_and_ours(arch, **CASES[arch])
    # The same modules are adapted, the same parameters train.
    ours_lora = {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    peft_lora = {n.removeprefix("base_model.model.") for n, m in ref.named_modules()
                 if isinstance(m, peft.tuners.lora.layer.LoraLayer)}
    assert ours_lora == peft_lora and ours_lora
    if arch == "gpt2":
        assert all(isinstance(ours.get_submodule(n), LoRAConv1D) for n in ours_lora)
    trainable_ref = {n for n, p in ref.named_parameters() if p.requires_grad}
    trainable_ours = {peft_name(ours, n) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable_ours == trainable_ref

    inputs = batch(arch)
    loss_r, grads_r = loss_and_grads(ref, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    assert_close(loss_o, loss_r, name="loss")
    for n, g in grads_o.items():
        assert_close(g, grads_r[peft_name(ours, n)], rtol=1e-4, atol=1e-5, name=f"grad {n}")


def test_config_recorded_and_base_weights_reused():
    torch.manual_seed(0)
    model = build("llama")
    q = model.model.layers[0].self_attn.q_proj
    head = model.lm_head
    apply_lora(model, r=4)
    cfg = model.peft_kernels_lora_config
    assert cfg.r == 4 and cfg.bias == "none" and len(cfg.modules) == 14
    assert cfg.target_modules == sorted(cfg.modules)  # "all-linear" is saved resolved, as peft does
    assert model.lm_head is head  # the output head is left out
    assert model.model.layers[0].self_attn.q_proj.weight is q.weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in dict(model.named_parameters()) if n.endswith((".lora_A", ".lora_B"))
    ]


def test_gpt2_conv1d_layout_and_merge():
    torch.manual_seed(0)
    model = build("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    w = conv.weight
    apply_lora(model, target_modules=["c_attn"], r=4)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRAConv1D) and layer.weight is w and tuple(w.shape) == (32, 96)
    assert (layer.nx, layer.nf) == (32, 96) and "transformer.h.0.attn.c_attn.weight" in model.state_dict()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 32)
    y = layer(x)
    expected = x @ w + layer.bias + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t())
    assert_close(y, expected, rtol=1e-4, atol=1e-5)
    layer.merge()
    assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)  # the shared weight is merged in place
    layer.unmerge()
    assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# remove_lora
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_remove_lora_round_trip(arch):
    torch.manual_seed(0)
    base = build(arch)
    inputs = batch(arch)
    with torch.no_grad():
        out_base = base(**inputs).logits
    requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
    weights = {n: p for n, p in base.named_parameters()}
    modules = dict(base.named_modules())

    apply_lora(base, target_modules="all-linear", r=4)
    for m in base.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    with torch.no_grad():
        out_lora = base(**inputs).logits
    assert not torch.allclose(out_lora, out_base)

    merged = copy.deepcopy(base)
    remove_lora(base, merge=False)
    remove_lora(merged, merge=True)
    linear_type = Conv1D if arch == "gpt2" else nn.Linear
    for model in (base, merged):
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert all(type(m) in (linear_type, nn.Linear) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))
        assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
        assert not hasattr(model, "peft_kernels_lora_config")
    assert all(p is weights[n] for n, p in base.named_parameters())  # the very same Parameters are back
    assert all(m is modules[n] for n, m in base.named_modules())  # and the very same modules
    with torch.no_grad():
        assert_close(base(**inputs).logits, out_base, name="unmerged")
        assert_close(merged(**inputs).logits, out_lora, rtol=1e-4, atol=1e-5, name="merged")


def test_remove_lora_after_merge_keeps_merged_weights():
    torch.manual_seed(0)
    model = build("llama")
    apply_lora(model, target_modules=["q_proj"], r=4)
    layer = model.model.layers[0].self_attn.q_proj
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 32)
    y = layer(x)
    layer.merge()
    remove_lora(model, merge=True)
    assert_close(model.model.layers[0].self_attn.q_proj(x), y, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Training features: dropout, gradient checkpointing, autocast, torch.compile
# --------------------------------------------------------------------------------------------------
def test_lora_dropout_train_and_eval():
    ref, ours = peft_and_ours("llama", target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.3)
    inputs = batch("llama")
    with torch.no_grad():
        eval_loss = ours(**inputs).loss
        assert_close(eval_loss, ref(**inputs).loss)  # eval: no dropout, same as peft
        ours.train()
        torch.manual_seed(5)
        a = ours(**inputs).loss
        torch.manual_seed(5)
        b = ours(**inputs).loss
        c = ours(**inputs).loss
    assert a == b and a != c and a != eval_loss  # masks drawn from torch's generator


@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_gradient_checkpointing_same_grads(lora_dropout):
    torch.manual_seed(0)
    model = build("llama").train()
    apply_lora(model, target_modules="all-linear", r=4, lora_dropout=lora_dropout)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    inputs = batch("llama")
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    loss, grads = loss_and_grads(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)  # the recomputed forward must regenerate the same dropout masks
    loss_ckpt, grads_ckpt = loss_and_grads(model, inputs)
    assert len(calls) == 3  # once without checkpointing, twice (forward + recompute) with it
    assert_close(loss_ckpt, loss)
    for n, g in grads.items():
        assert_close(grads_ckpt[n], g, rtol=1e-5, atol=1e-6, name=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_autocast_bf16(arch):
    ref, ours = peft_and_ours(arch, target_modules="all-linear", r=4)
    inputs = batch(arch)
    fp32_loss, _ = loss_and_grads(ours, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_o, grads_o = loss_and_grads(ours, inputs)
        loss_r, grads_r = loss_and_grads(ref, inputs)
    assert all(m.lora_A.dtype == torch.float32 for m in ours.modules() if isinstance(m, LoRALinear))
    assert torch.isfinite(loss_o)
    assert abs(loss_o - fp32_loss) < 0.05 and abs(loss_o - loss_r) < 0.05
    for n, g in grads_o.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        gr = grads_r[peft_name(ours, n)]
        assert (g - gr).norm() <= 0.1 * gr.norm() + 1e-6, n


def aot_eager_recording(ops: list[str]):
    """The aot_eager backend, recording the functions each captured graph calls."""

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def test_torch_compile_aot_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build("llama")
    apply_lora(model, target_modules=["q_proj", "v_proj"], r=4)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    inputs = batch("llama")
    loss, grads = loss_and_grads(model, inputs)
    ops = []
    compiled = torch.compile(model, backend=aot_eager_recording(ops))
    loss_c, grads_c = loss_and_grads(compiled, inputs)
    assert sum("peft_kernels.lora_linear" in op for op in ops) == 4  # the op is in the graph, not a graph break
    assert_close(loss_c, loss)
    for n, g in grads.items():
        assert_close(grads_c["_orig_mod." + n], g, rtol=1e-4, atol=1e-5, name=n)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(bias="bogus"), "bias"),
        (dict(target_modules=["no_such_layer"]), "target_modules"),
        (dict(target_modules=r"model\.nothing.*"), "target_modules"),
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "exclude_modules"),
        (dict(target_modules=["mlp"]), "not a Linear"),  # a container module, as peft rejects it
        (dict(target_modules=[]), "target_modules"),
        (dict(r=0), "r must be a positive int"),
        (dict(r=2.5), "r must be a positive int"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        # LoraConfig's arguments apply_lora does not serve: refused by name (a bare TypeError before)
        (dict(use_dora=True), "use_dora=True is not supported by apply_lora.*patch_peft_model"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(lora_bias=True), "lora_bias"),
    ],
)
def test_bad_arguments(kwargs, arg):
    model = build("llama")
    with pytest.raises(ValueError, match=arg):
        apply_lora(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied


def test_lora_config_defaults_are_accepted_and_unknown_keywords_are_a_type_error():
    apply_lora(build("llama"), target_modules=["q_proj"], init_lora_weights=True, use_dora=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lora_rank'\]"):
        apply_lora(build("llama"), target_modules=["q_proj"], lora_rank=4)


def test_custom_linear_subclass_raises():
    class ScaledLinear(nn.Linear):  # stands in for a quantized nn.Linear subclass (bitsandbytes, ...)
        def forward(self, x):
            return 2 * super().forward(x)

    model = build("llama")
    model.model.layers[1].mlp.up_proj = ScaledLinear(32, 64, bias=False)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj', a ScaledLinear .*exclude_modules"):
        apply_lora(model)
    apply_lora(model, exclude_modules=["layers.1.mlp.up_proj"])
    assert type(model.model.layers[1].mlp.up_proj) is ScaledLinear


def test_apply_twice_raises():
    model = build("llama")
    apply_lora(model, target_modules=["q_proj"], r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, target_modules=["v_proj"], r=2)
