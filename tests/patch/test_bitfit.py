"""apply_bitfit / remove_bitfit / save_bitfit / load_bitfit / patch_trainable_biases on tiny random-init
transformers models (no downloads): what trains, what runs (the fused bias-only ops, never a dW), outputs
before training, training lowering the loss, checkpoints, composition with apply_lora and HF peft, errors."""

import copy
import json
import os

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.patch import _methods
from peft_kernels.patch.bitfit import (
    BitFitConv1D,
    BitFitLayerNorm,
    BitFitLinear,
    BitFitRMSNorm,
    apply_bitfit,
    load_bitfit,
    patch_trainable_biases,
    remove_bitfit,
    save_bitfit,
    unpatch_trainable_biases,
)
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0, num_labels=2, initializer_range=0.02):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=num_labels,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  initializer_range=initializer_range)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids(batch=3, seq=7, seed=1):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------
# What trains and what runs
# ------------------------------------------------------------------------------------------------------
def test_bert_all_trains_every_bias_only_and_swaps_the_layers():
    model = tiny_bert()
    all_biases = sorted(n for n, _ in model.named_parameters() if n.endswith(".bias"))
    before = model(ids()).logits
    apply_bitfit(model)
    assert trainable(model) == all_biases
    assert sum(isinstance(m, BitFitLinear) for m in model.modules()) == 2 * 6 + 2  # q k v o in out, pooler, head
    assert sum(isinstance(m, BitFitLayerNorm) for m in model.modules()) == 1 + 2 * 2
    assert_close(model(ids()).logits, before, rtol=1e-5, atol=1e-6)  # nothing changes before training
    counts = peft_kernels.print_trainable_parameters(model)
    assert counts.trainable == sum(p.numel() for n, p in model.named_parameters() if n in all_biases)


def test_backward_runs_the_fused_ops_and_no_weight_gradient():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                      if isinstance(t, torch.Tensor)]
            self.calls.append((str(func.overloadpacket), shapes))
            return out

    model = apply_bitfit(tiny_bert()).train()
    weight_shapes = {tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}
    with peft_kernels.use_backend("aten"):  # the backward backend is chosen with the forward
        loss = model(ids(), labels=torch.tensor([0, 1, 1])).loss
        with Ops() as mode:
            loss.backward()
    fused = [c for c in mode.calls if "bias_only_linear_bwd" in c[0]]
    assert len(fused) == 2 * 6 + 2, "every BitFit linear's backward is one fused call"
    # dx GEMMs produce [tokens, in] tensors; a dW GEMM would produce a weight-shaped one.
    produced = {s for _, shapes in mode.calls if _ in ("aten.mm", "aten.addmm", "aten.bmm") for s in shapes}
    assert not produced & weight_shapes, f"a weight-shaped GEMM output (dW): {produced & weight_shapes}"
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".bias"))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith(".bias"))


def test_grads_equal_plain_autograd():
    ref = tiny_bert()
    for n, p in ref.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    model = apply_bitfit(copy.deepcopy(ref))
    x, y = ids(), torch.tensor([0, 1, 1])
    ref(x, labels=y).loss.backward()
    model(x, labels=y).loss.backward()
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6, name=n)


def test_tiny_bert_bitfit_training_lowers_the_loss():
    # A random network whose features depend on its input (std 0.5) stands in for a pretrained one: with the
    # default 0.02 init a 2-layer BERT's features barely vary, and no bias can separate the classes.
    model = apply_bitfit(tiny_bert(seed=3, initializer_range=0.5)).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (32, 8), generator=g)
    labels = (x[:, 1] < 32).long()  # learnable from the second token
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(40):
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(torch.equal(p, q) for (n, p), (_, q) in zip(model.named_parameters(),
                                                            tiny_bert(seed=3, initializer_range=0.5).named_parameters())
               if not n.endswith(".bias")), "a weight changed"


def test_llama_added_biases_keep_logits_identical_and_train():
    base = tiny_llama()
    x = ids()
    before = base(x).logits
    model = apply_bitfit(copy.deepcopy(base), add_missing_biases=True)
    after = model(x).logits
    assert torch.equal(after, before), (after - before).abs().max()
    names = trainable(model)
    assert "lm_head.bias" not in names  # the output head gets no vocabulary-sized bias
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.1.mlp.down_proj.bias" in names
    assert "model.layers.0.input_layernorm.bias" in names and "model.norm.bias" in names
    assert sum(isinstance(m, BitFitRMSNorm) for m in model.modules()) == 2 * 2 + 1
    model(x).logits.float().pow(2).mean().backward()
    assert model.get_parameter("model.layers.0.input_layernorm.bias").grad.abs().sum() > 0
    assert model.get_parameter("model.layers.1.mlp.down_proj.bias").grad.abs().sum() > 0


def test_llama_without_added_biases_has_nothing_to_train():
    with pytest.raises(ValueError, match="apply_bitfit: .* have no biases .*add_missing_biases=True"):
        apply_bitfit(tiny_llama())


def test_include_attention_mlp_and_names():
    def picked(include):
        return trainable(apply_bitfit(tiny_bert(), include=include))

    attn = picked("attention")
    assert attn and all(".attention." in n for n in attn)
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in attn
    mlp = picked("mlp")
    assert set(mlp) == {f"bert.encoder.layer.{i}.{m}.bias" for i in range(2)
                        for m in ("intermediate.dense", "output.dense", "output.LayerNorm")}
    assert picked(["query", "value"]) == sorted(f"bert.encoder.layer.{i}.attention.self.{m}.bias"
                                                for i in range(2) for m in ("query", "value"))


def test_gpt2_conv1d_layers():
    base = tiny_gpt2()
    x = ids()
    before = base(x).logits
    model = apply_bitfit(copy.deepcopy(base))
    assert sum(isinstance(m, BitFitConv1D) for m in model.modules()) == 2 * 4
    assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    ref = copy.deepcopy(base)
    for n, p in ref.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    ref(x).logits.pow(2).mean().backward()
    model(x).logits.pow(2).mean().backward()
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6, name=n)


def test_rmsnorm_variants_are_checked_not_guessed():
    class GemmaStyleRMSNorm(nn.Module):  # (1 + w): not the fused op's math, so never swapped
        def __init__(self, h):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.randn(h) * 0.1), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = nn.Sequential(nn.Linear(16, 16, bias=False), GemmaStyleRMSNorm(16), nn.RMSNorm(16, eps=1e-6))
    x = torch.randn(4, 16)
    before = model(x)
    apply_bitfit(model, add_missing_biases=True)
    assert isinstance(model[1], GemmaStyleRMSNorm) and isinstance(model[2], BitFitRMSNorm)
    assert trainable(model) == ["0.bias", "2.bias"]
    assert_close(model(x), before, rtol=1e-6, atol=1e-6)


def test_remove_bitfit_restores_the_model():
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_bitfit(model, add_missing_biases=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # "trained"
    remove_bitfit(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert not _methods.applied_methods(model)


def test_remove_restores_existing_biases():
    model = tiny_bert()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_bitfit(model)
    with torch.no_grad():
        model.get_parameter("classifier.bias").add_(3.0)
    remove_bitfit(model)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert type(model.classifier) is nn.Linear


# ------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_into_a_fresh_model(tmp_path):
    model = apply_bitfit(tiny_llama(), add_missing_biases=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_bitfit(model, tmp_path)
    cfg = json.loads((tmp_path / "bitfit_config.json").read_text())
    assert cfg["add_missing_biases"] is True and cfg["include"] == "all"
    fresh = load_bitfit(tiny_llama(), tmp_path)
    x = ids()
    assert torch.equal(fresh(x).logits, model(x).logits)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "bitfit_model.safetensors")
    assert set(stored) == set(trainable(model)) and all(".bias" in k for k in stored)  # biases only


def test_tied_bias_is_trained_and_saved_once(tmp_path):
    """BERT's MLM head: decoder.bias is the Parameter cls.predictions.bias (two module paths, one tensor). It
    trains, is listed once (under the name named_parameters() gives), and the checkpoint round-trips."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    base = transformers.BertForMaskedLM(cfg).eval()
    model = apply_bitfit(copy.deepcopy(base))
    tied = model.cls.predictions.bias
    assert model.cls.predictions.decoder.bias is tied and tied.requires_grad
    state = _methods.applied_methods(model)["bitfit"]
    assert len(state.trained) == len(set(state.trained)) == len(trainable(model))
    x = ids()
    model(x, labels=x).loss.backward()
    assert tied.grad is not None
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_bitfit(model, tmp_path)
    fresh = load_bitfit(copy.deepcopy(base), tmp_path)
    assert torch.equal(fresh(x).logits, model(x).logits)
    assert fresh.cls.predictions.decoder.bias is fresh.cls.predictions.bias


def test_load_into_an_already_bitfit_model(tmp_path):
    model = apply_bitfit(tiny_bert(), include="mlp")
    with torch.no_grad():
        model.get_parameter("bert.encoder.layer.0.output.dense.bias").fill_(0.5)
    save_bitfit(model, tmp_path)
    other = apply_bitfit(tiny_bert(), include="mlp")
    load_bitfit(other, tmp_path)
    assert torch.equal(other.get_parameter("bert.encoder.layer.0.output.dense.bias"), torch.full((32,), 0.5))


def test_load_refuses_bad_checkpoints_and_leaves_the_model_alone(tmp_path):
    model = apply_bitfit(tiny_llama(), add_missing_biases=True)
    save_bitfit(model, tmp_path)
    bert = tiny_bert()
    before = copy.deepcopy(bert.state_dict())
    with pytest.raises(ValueError, match="load_bitfit"):
        load_bitfit(bert, tmp_path)  # Llama biases into a BERT
    assert not _methods.applied_methods(bert) and bert.state_dict().keys() == before.keys()
    (tmp_path / "bitfit_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="load_bitfit: .* not a readable safetensors"):
        load_bitfit(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="load_bitfit"):
        load_bitfit(tiny_llama(), tmp_path / "nope")
    (tmp_path / "bitfit_config.json").write_text(json.dumps({"peft_kernels_method": "lora"}))
    with pytest.raises(ValueError, match="holds no BitFit checkpoint"):
        load_bitfit(tiny_llama(), tmp_path)


def test_save_is_atomic_and_refuses_without_bitfit(tmp_path):
    with pytest.raises(ValueError, match="save_bitfit: .* no BitFit applied"):
        save_bitfit(tiny_bert(), tmp_path)
    model = apply_bitfit(tiny_bert())
    save_bitfit(model, tmp_path)
    save_bitfit(model, tmp_path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["bitfit_config.json", "bitfit_model.safetensors"]


# ------------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------------
def test_composes_with_apply_lora():
    from peft_kernels.nn import LoRALinear

    model = peft_kernels.apply_lora(tiny_bert(), target_modules=["query", "value"], r=4)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    apply_bitfit(model)
    names = trainable(model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert "bert.encoder.layer.0.attention.self.query.bias" in names
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoRALinear)  # not swapped: the LoRA op
    model.train()
    model(ids(), labels=torch.tensor([0, 1, 1])).loss.backward()
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.bias.grad is not None and q.lora_A.grad is not None and q.weight.grad is None


def test_lora_merged_or_removed_under_bitfit_keeps_bitfit_training():
    """LoRA, then BitFit: merge_and_unload keeps the trained model's outputs and leaves BitFit's biases training
    (restoring LoRA's own snapshot there froze them, and remove_bitfit then left every parameter frozen);
    remove_bitfit afterwards gives every flag and class from before both."""
    from peft_kernels.patch import merge_and_unload

    model = tiny_bert()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    peft_kernels.apply_lora(model, target_modules=["query", "value"], r=4)
    apply_bitfit(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        want = model(ids()).logits
    merge_and_unload(model)
    with torch.no_grad():
        assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-6)
    names = trainable(model)
    assert "bert.encoder.layer.0.attention.self.query.bias" in names
    # the frozen weights stay frozen (the classifier head trained with LoRA as its modules_to_save keeps training)
    assert {n for n in names if n.endswith("weight")} <= {"classifier.weight"}
    remove_bitfit(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_bitfit_then_lora_is_removed_in_reverse_order_and_saves_both(tmp_path):
    """BitFit first (on layers LoRA does not take), then LoRA: remove_bitfit under LoRA is refused, naming
    remove_lora; save_pretrained writes both methods' files (LoRA's saver replaced BitFit's); BitFit over LoRA's
    targets is refused at apply_lora, saying which goes first."""
    from peft_kernels.patch import load_bitfit, load_lora, remove_lora

    model = tiny_bert()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_bitfit(model, include=["LayerNorm"])
    peft_kernels.apply_lora(model, target_modules=["query", "value"], r=4)
    with pytest.raises(ValueError, match=r"remove_bitfit: LoRA was applied after BitFit.*remove_lora\(model\) first"):
        remove_bitfit(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "bitfit_config.json").is_file() and (tmp_path / "adapter_config.json").is_file()
    fresh = load_lora(load_bitfit(tiny_bert(), str(tmp_path)), str(tmp_path))
    with torch.no_grad():
        assert_close(fresh(ids()).logits, model(ids()).logits, rtol=1e-5, atol=1e-6)
    remove_lora(model)
    assert "save_pretrained" in model.__dict__  # BitFit's again
    remove_bitfit(model)
    assert "save_pretrained" not in model.__dict__
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    apply_bitfit(model)
    with pytest.raises(ValueError, match=r"BitFit was applied first.*remove_bitfit\(model\), apply_lora"):
        peft_kernels.apply_lora(model, target_modules=["query", "value"], r=4)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_patched_peft_model_with_trainable_biases_equals_peft(bias):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias, lora_dropout=0.0)
    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_bert(), cfg)
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    ours = copy.deepcopy(ref)
    report = peft_kernels.patch_peft_model(ours)  # swaps the trainable-bias layers itself now
    swapped = report.biases + patch_trainable_biases(ours)
    if bias == "all":  # the non-LoRA linears and the norms train their biases: they run on the fused ops
        assert any(n.endswith("attention.self.key") for n in swapped)
        assert any(n.endswith("LayerNorm") for n in swapped)
    else:  # only the LoRA layers' biases train, through the fused LoRA op: nothing else to swap
        assert swapped == []
    assert not any(n.endswith(".base_layer") for n in swapped)
    assert trainable(ours) == trainable(ref)
    x, y = ids(), torch.tensor([0, 1, 1])
    ref.train()
    ours.train()
    l_ref = ref(input_ids=x, labels=y).loss
    l_ours = ours(input_ids=x, labels=y).loss
    assert_close(l_ours.detach(), l_ref.detach(), rtol=1e-5, atol=1e-6)
    l_ref.backward()
    l_ours.backward()
    got = dict(ours.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6, name=n)
    assert unpatch_trainable_biases(ours) == swapped


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(include="everything"), ValueError, r"apply_bitfit: include must be one of"),
    (dict(include=[]), ValueError, r"apply_bitfit: include must be a non-empty list"),
    (dict(include=["no_such_layer"]), ValueError, r"apply_bitfit: include=\['no_such_layer'\] selects no"),
    (dict(include=["embeddings"]), ValueError, r"apply_bitfit: include=.* matched 'bert.embeddings'"),
    (dict(include=3), TypeError, r"apply_bitfit: include must be one of \('all', 'attention', 'mlp'\) or a list"),
    (dict(include=None), TypeError, r"apply_bitfit: include must be one of"),
    (dict(add_missing_biases="yes"), TypeError, r"apply_bitfit: add_missing_biases must be a bool"),
])
def test_bad_arguments_raise(kwargs, exc, match):
    model = tiny_bert()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(exc, match=match):
        apply_bitfit(model, **kwargs)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # untouched


def test_misuse_raises():
    with pytest.raises(TypeError, match="apply_bitfit: model must be an nn.Module"):
        apply_bitfit("bert")
    model = apply_bitfit(tiny_bert())
    with pytest.raises(ValueError, match="apply_bitfit: .* already has BitFit applied"):
        apply_bitfit(model)
    with pytest.raises(ValueError, match="remove_bitfit: .* no BitFit applied"):
        remove_bitfit(tiny_bert())
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="apply_bitfit: .* already an HF peft model"):
        apply_bitfit(pm)


def test_bitfit_layers_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 8, bias=False),
                          nn.RMSNorm(8, eps=1e-6))
    apply_bitfit(model, add_missing_biases=True)
    x = torch.randn(5, 16)
    model(x).pow(2).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).pow(2).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6, name=n)
        else:
            assert p.grad is None


def test_example_script_runs():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "bitfit.py"
    spec = importlib.util.spec_from_file_location("bitfit_example", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    out = ex.main(["--steps", "30", "--device", "cpu"])
    assert out["losses"][-1] < 0.5 * out["losses"][0]
    assert out["reloaded_equal"] and out["llama_unchanged"]


def test_layer_constructors_and_forwards_name_what_is_wrong():
    """The BitFit layers' wrap/constructor refuse what they cannot stand in for; a forward's wrong input names the
    argument (the layers' plain fast path on CPU falls back to the op's validation when PyTorch raises)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    from peft_kernels.nn import LoRALinear

    for call, exc, match in [
        (lambda: BitFitLinear.wrap(nn.LayerNorm(4)), TypeError, r"BitFitLinear.wrap: base must be an nn.Linear"),
        (lambda: BitFitLinear.wrap(LoRALinear(4, 4, r=2)), TypeError, r"BitFitLinear.wrap: base is a LoRALinear"),
        (lambda: BitFitConv1D.wrap(nn.Linear(4, 4)), TypeError, r"BitFitConv1D.wrap: base must be a transformers"),
        (lambda: BitFitLayerNorm.wrap(nn.Linear(4, 4)), TypeError, r"BitFitLayerNorm.wrap: base must be an nn.Lay"),
        (lambda: BitFitLayerNorm.wrap(nn.LayerNorm((2, 4))), ValueError, r"BitFitLayerNorm.wrap: .*last dim"),
        (lambda: BitFitRMSNorm.wrap(nn.Linear(4, 4)), TypeError, r"BitFitRMSNorm.wrap: base must be an RMSNorm"),
        (lambda: BitFitRMSNorm("w", None, 1e-6), TypeError, r"BitFitRMSNorm: weight must be a 1-D float tensor"),
        (lambda: BitFitRMSNorm(nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(5)), 1e-6), ValueError,
         r"BitFitRMSNorm: bias has shape \(5,\)"),
        (lambda: BitFitRMSNorm(nn.Parameter(torch.ones(4)), None, -1.0), ValueError, r"BitFitRMSNorm: eps must be"),
        (lambda: BitFitRMSNorm(nn.Parameter(torch.ones(4)), None, "1e-6"), TypeError, r"BitFitRMSNorm: eps must be"),
    ]:
        with pytest.raises(exc, match=match):
            call()
    assert BitFitRMSNorm.wrap(LlamaRMSNorm(4)).bias is None  # a bias-free RMSNorm wraps as one

    def frozen(m):
        m.weight.requires_grad_(False)
        return m

    linear = BitFitLinear.wrap(frozen(nn.Linear(4, 3)))
    conv = BitFitConv1D.wrap(frozen(Conv1D(3, 4)))
    norm = BitFitLayerNorm.wrap(frozen(nn.LayerNorm(4)))
    rms = BitFitRMSNorm(nn.Parameter(torch.ones(4), requires_grad=False), nn.Parameter(torch.zeros(4)), 1e-6)
    for layer, op in ((linear, "bias_only_linear"), (conv, "bias_only_linear"), (norm, "bias_only_norm"),
                      (rms, "bias_only_norm")):
        with pytest.raises(ValueError, match=rf"{op}: weight .*expected 5"):
            layer(torch.randn(2, 5))
        with pytest.raises(TypeError, match=rf"{op}: x must be a torch.Tensor"):
            layer("x")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_with_default_eps_keeps_its_outputs_in_half_precision(dtype):
    """torch.nn.RMSNorm(eps=None) computes half inputs in fp32 with fp32's machine epsilon; the BitFit layer must
    use the same (bf16's own epsilon, 65000x larger, moved small activations' outputs by up to 1.4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.RMSNorm(16)).to(dtype)
    x = (0.05 * torch.randn(4, 16)).to(dtype)
    with torch.no_grad():
        before = model[1](x)
    apply_bitfit(model, add_missing_biases=True)
    assert isinstance(model[1], BitFitRMSNorm)
    with torch.no_grad():
        assert torch.equal(model[1](x), before)
    y = model[1](x.requires_grad_(True))  # the fused op's path (a trainable bias) gives the same
    assert torch.equal(y.detach(), before)


def test_checkpoint_paths_and_configs_of_the_wrong_kind_raise(tmp_path):
    model = apply_bitfit(tiny_bert())
    with pytest.raises(TypeError, match=r"save_bitfit: the save directory must be a str or os.PathLike"):
        save_bitfit(model, None)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"save_bitfit: .* is an existing file"):
        save_bitfit(model, tmp_path / "file")
    save_bitfit(model, tmp_path / "ck")
    good = json.loads((tmp_path / "ck" / "bitfit_config.json").read_text())
    for key, value in (("include", None), ("format_version", "1"), ("trained", None), ("add_missing_biases", 1)):
        bad = dict(good)
        if value is None:
            bad.pop(key)
        else:
            bad[key] = value
        if key == "trained":
            bad[key] = None
        (tmp_path / "ck" / "bitfit_config.json").write_text(json.dumps(bad))
        fresh = tiny_bert()
        with pytest.raises(ValueError, match=rf"load_bitfit: .*field '{key}' must be"):
            load_bitfit(fresh, tmp_path / "ck")
        assert not _methods.applied_methods(fresh)


def test_modules_to_save_trains_the_head_whole_saves_and_restores_it(tmp_path):
    """A classification head starts random: modules_to_save trains it whole beside the biases (the BitFit paper's
    setup); it is saved, loaded into a fresh model and put back by remove_bitfit. Without it, a warning names it."""
    with pytest.warns(UserWarning, match=r"apply_bitfit: BertForSequenceClassification's task head 'classifier'"):
        apply_bitfit(tiny_bert())
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_bitfit(copy.deepcopy(base), modules_to_save=["classifier"])
    biases = sorted(n for n, _ in base.named_parameters() if n.endswith(".bias"))
    assert trainable(model) == sorted({*biases, "classifier.weight"})
    assert type(model.classifier) is nn.Linear  # trained whole: not a BitFit layer
    x, y = ids(), torch.tensor([0, 1, 1])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x, labels=y).loss.backward()
    opt.step()
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])
    save_bitfit(model, tmp_path)
    assert json.loads((tmp_path / "bitfit_config.json").read_text())["modules_to_save"] == ["classifier"]
    fresh = load_bitfit(copy.deepcopy(base), tmp_path)
    assert torch.equal(fresh(x).logits, model(x).logits) and fresh.classifier.weight.requires_grad
    remove_bitfit(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"apply_bitfit: modules_to_save entries \['nope'\] match no module"):
        apply_bitfit(tiny_bert(), modules_to_save=["nope"])
    with pytest.raises(TypeError, match=r"apply_bitfit: modules_to_save must be a list of module names"):
        apply_bitfit(tiny_bert(), modules_to_save="classifier")
