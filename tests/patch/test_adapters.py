"""apply_adapters on tiny random-init transformers models (BERT, RoBERTa, Llama, Mistral, Qwen2, GPT-2): identity at
init, trainable set, named adapters / switching / Stack, mixed-batch routing == per-row, save/load, remove,
Trainer, gradient checkpointing, torch.compile(fullgraph=True), bad configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf

from peft_kernels.nn.adapter import AdapterConfig, BottleneckAdapter
from peft_kernels.patch import adapter as pa
from peft_kernels.patch._methods import applied_methods

V = 97


def tiny(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind in ("bert", "roberta"):
        cls_cfg = tf.BertConfig if kind == "bert" else tf.RobertaConfig
        c = cls_cfg(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    num_labels=3, max_position_embeddings=64, **kw)
        model_cls = tf.BertForSequenceClassification if kind == "bert" else tf.RobertaForSequenceClassification
        return model_cls(c).eval()
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0)).eval()
    cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[kind]
    c = cfg(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(c).eval()


PRESETS = {"houlsby": AdapterConfig.houlsby, "pfeiffer": AdapterConfig.pfeiffer,
           "parallel": AdapterConfig.parallel_adapter}
KINDS = ("bert", "roberta", "llama", "mistral", "qwen2", "gpt2")


def ids(B=2, T=9, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, name=None, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in pa._control(model, "test").sites:
            for n, a in site.items():
                if name is None or n == name:
                    for p in a.parameters():
                        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("kind", KINDS)
def test_untrained_adapter_leaves_logits_unchanged(kind, preset):
    model = tiny(kind)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    pa.apply_adapters(model, PRESETS[preset](reduction_factor=4))
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # ... and a trained one changes them, through every site
    randomize(model)
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max() > 1e-3
    n_sites = sum(isinstance(m, pa.AdapterSite) and len(m) > 0 for m in model.modules())
    assert n_sites == 2 * len(PRESETS[preset]().locations)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_only_adapters_train_and_remove_restores(kind):
    model = tiny(kind)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pa.apply_adapters(model, AdapterConfig.houlsby(bottleneck=4))
    assert "adapters" in applied_methods(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or "adapters.adapter." in n for n in trainable), sorted(trainable)[:4]
    assert len(trainable) == 2 * 2 * 4  # layers x sites x (down/up weight/bias)
    # parameter names of the model are unchanged
    assert set(state) <= set(model.state_dict())
    randomize(model)
    model(x).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    pa.remove_adapters(model)
    assert "adapters" not in applied_methods(model)
    assert set(model.state_dict()) == set(state)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)


def test_modules_to_train_and_layer_norms():
    model = tiny("bert")
    pa.apply_adapters(model, AdapterConfig.pfeiffer(bottleneck=4, train_layer_norms=True),
                      modules_to_train=["classifier"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= names
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in names
    assert "bert.encoder.layer.0.intermediate.dense.weight" not in names
    with pytest.raises(ValueError, match="modules_to_train entry 'nope' matches no module"):
        pa.apply_adapters(tiny("bert"), modules_to_train=["nope"])


def test_bert_classification_training_lowers_loss():
    model = tiny("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    pa.apply_adapters(model, AdapterConfig.houlsby(reduction_factor=4), "task", modules_to_train=["classifier"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (16, 12), generator=g)
    labels = (x[:, 0] % 3)  # learnable from the first token
    losses = []
    for _ in range(25):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_named_adapters_switching_and_stack():
    model = tiny("llama")
    x = ids()
    pa.apply_adapters(model, AdapterConfig.houlsby(bottleneck=4), "a")
    pa.add_bottleneck_adapter(model, "b", AdapterConfig.houlsby(bottleneck=6))
    assert set(pa.list_adapters(model)) == {"a", "b"}
    randomize(model, seed=1)
    with torch.no_grad():
        pa.set_active_adapters(model, "a")
        ya = model(x).logits
        pa.set_active_adapters(model, "b")
        yb = model(x).logits
        pa.set_active_adapters(model, None)
        y0 = model(x).logits
        pa.set_active_adapters(model, pa.Stack("a", "b"))
        yab = model(x).logits
        pa.set_active_adapters(model, pa.Stack("b", "a"))
        yba = model(x).logits
    assert pa.active_adapters(model) == ("b", "a")
    for u, v in ((ya, yb), (ya, y0), (yab, ya), (yab, yba)):
        assert (u - v).abs().max() > 1e-4
    # Stack(a, b) with b's up-projection zero is a alone
    with torch.no_grad():
        for site in pa._control(model, "t").sites:
            site["b"].up.weight.zero_()
            site["b"].up.bias.zero_()
        pa.set_active_adapters(model, pa.Stack("a", "b"))
        torch.testing.assert_close(model(x).logits, ya)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        pa.set_active_adapters(model, "c")
    with pytest.raises(ValueError, match="exists already"):
        pa.add_bottleneck_adapter(model, "a")
    pa.delete_bottleneck_adapter(model, "b")
    assert pa.active_adapters(model) == ("a",)


def test_stack_matches_manual_composition_on_bert():
    """Stack(a, b) at a BERT site: b runs on a's output with the sub-layer's residual rules (AdapterHub)."""
    model = tiny("bert")
    pa.apply_adapters(model, AdapterConfig.pfeiffer(bottleneck=4), "a")
    pa.add_bottleneck_adapter(model, "b", AdapterConfig.pfeiffer(bottleneck=4, non_linearity="tanh"))
    randomize(model, seed=2)
    pa.set_active_adapters(model, pa.Stack("a", "b"))
    site = model.bert.encoder.layer[0].output.adapters
    ln = model.bert.encoder.layer[0].output.LayerNorm
    h, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)

    def manual(adapter, hs):  # Pfeiffer: original_ln_before, residual_before_ln
        residual = hs
        hs = ln(hs + r)
        return residual + adapter.scaling * adapter.up(torch.nn.functional.__dict__[
            {"relu": "relu", "tanh": "tanh"}[adapter.activation]](adapter.down(hs)))

    expected = ln(manual(site["b"], manual(site["a"], h)) + r)
    torch.testing.assert_close(site.run(h, r, ln), expected)


@pytest.mark.parametrize("kind, preset", [("bert", "houlsby"), ("llama", "pfeiffer"), ("gpt2", "parallel"),
                                          ("qwen2", "houlsby")])
def test_mixed_batch_equals_per_row(kind, preset):
    model = tiny(kind)
    names = ("x", "y", "z")
    cfg = PRESETS[preset](bottleneck=4)
    pa.apply_adapters(model, cfg, names[0])
    for n in names[1:]:
        pa.add_bottleneck_adapter(model, n, cfg)
    randomize(model, seed=4)
    x = ids(B=5, T=7)
    route = torch.tensor([2, 0, 1, 2, 0])
    with pa.adapter_routing(model, names, route):
        mixed = model(x).logits
    (mixed.square().sum()).backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    rows = []
    for b, a in enumerate(route.tolist()):
        pa.set_active_adapters(model, names[a])
        out = model(x[b: b + 1]).logits
        out.square().sum().backward()
        rows.append(out.detach())
    torch.testing.assert_close(mixed.detach(), torch.cat(rows), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mixed_grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_routing_refuses_unroutable_adapters():
    model = tiny("llama")
    pa.apply_adapters(model, AdapterConfig.houlsby(bottleneck=4), "a")
    pa.add_bottleneck_adapter(model, "w", AdapterConfig.houlsby(bottleneck=8))
    with pytest.raises(ValueError, match="share bottleneck width"):
        with pa.adapter_routing(model, ("a", "w"), torch.tensor([0, 1])):
            pass
    pa.add_bottleneck_adapter(model, "f", AdapterConfig.pfeiffer(bottleneck=4))
    with pytest.raises(ValueError, match="lacks some of"):
        with pa.adapter_routing(model, ("a", "f"), torch.tensor([0, 1])):
            pass


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_load_roundtrip(tmp_path, kind):
    model = tiny(kind)
    x = ids()
    pa.apply_adapters(model, AdapterConfig.houlsby(bottleneck=5, non_linearity="gelu"), "one")
    pa.add_bottleneck_adapter(model, "two", AdapterConfig.pfeiffer(bottleneck=3))
    randomize(model, seed=7)
    with torch.no_grad():
        ref = model(x).logits
    pa.save_adapters(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    meta = json.loads((tmp_path / "one" / pa.CONFIG_NAME).read_text())
    assert meta["format"] == pa.FORMAT and meta["config"]["non_linearity"] == "gelu"

    fresh = tiny(kind)
    assert pa.load_adapters(fresh, tmp_path / "one") == "one"
    pa.load_adapters(fresh, tmp_path / "two", set_active=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, ref, rtol=0, atol=0)


def test_load_refuses_bad_files(tmp_path):
    model = tiny("llama")
    pa.apply_adapters(model, AdapterConfig.houlsby(bottleneck=4), "a")
    pa.save_adapters(model, tmp_path)
    other = tiny("gpt2")  # a different architecture: keys fit, shapes fit, but say so if they do not
    wide = tiny("llama")
    pa.apply_adapters(wide, AdapterConfig.houlsby(bottleneck=8), "a")
    pa.save_adapters(wide, tmp_path / "wide")
    cfg_path = tmp_path / "wide" / "a" / pa.CONFIG_NAME
    meta = json.loads(cfg_path.read_text())
    meta["config"]["bottleneck"] = 4  # config says 4, weights are 8 wide
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape mismatch"):
        pa.load_adapters(tiny("llama"), tmp_path / "wide" / "a")
    weights = tmp_path / "a" / pa.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:40])
    fresh = tiny("llama")
    with pytest.raises(ValueError, match="truncated or damaged"):
        pa.load_adapters(fresh, tmp_path / "a")
    assert "adapters" not in applied_methods(fresh)  # nothing changed
    with pytest.raises(FileNotFoundError):
        pa.load_adapters(other, tmp_path / "missing")


@pytest.mark.parametrize("over, match", [
    (dict(non_linearity="mish"), "unknown non_linearity 'mish'"),
    (dict(bottleneck=33), "bottleneck 33 is larger than the hidden size 32"),
    (dict(reduction_factor=0.5), "reduction_factor must be a number >= 1"),
    (dict(locations=("cross_attention",)), "this architecture has no 'cross_attention' location"),
    (dict(locations=("decoder",)), "unknown location 'decoder'"),
    (dict(init="xavier"), "unknown init 'xavier'"),
    (dict(leave_out=(5,)), r"leave_out has layer indices \[5\]"),
    (dict(scaling=float("nan")), "scaling must be a finite float"),
])
def test_bad_configs_raise(over, match):
    with pytest.raises(ValueError, match=match):
        pa.apply_adapters(tiny("bert"), AdapterConfig.houlsby(**over))


def test_apply_twice_and_wrong_models_raise():
    model = tiny("bert")
    pa.apply_adapters(model)
    with pytest.raises(ValueError, match="already has .*adapters applied"):
        pa.apply_adapters(model)
    with pytest.raises(ValueError, match="found no transformer layers"):
        pa.apply_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="has no adapters"):
        pa.set_active_adapters(tiny("gpt2"), "a")
    with pytest.raises(TypeError, match="config must be an AdapterConfig"):
        pa.apply_adapters(tiny("gpt2"), {"reduction_factor": 4})


def test_leave_out_and_adapter_layer_norms():
    model = tiny("llama")
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    pa.apply_adapters(model, AdapterConfig.houlsby(bottleneck=4, leave_out=(1,), ln_before=True, ln_after=True))
    layers = model.model.layers
    assert len(layers[1].attention_adapters) == 0 and len(layers[0].attention_adapters) == 1
    a = layers[0].attention_adapters["adapter"]
    assert isinstance(a, BottleneckAdapter) and a.adapter_norm_before is not None
    with torch.no_grad():  # ln_after on the zero branch: LN(0) = bias = 0, so still the identity
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, preset", [("llama", "pfeiffer"), ("bert", "houlsby"), ("gpt2", "parallel")])
def test_gradient_checkpointing_same_grads(kind, preset):
    def run(ckpt):
        model = tiny(kind).train()
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        pa.apply_adapters(model, PRESETS[preset](bottleneck=4))
        randomize(model, seed=9)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(ids()).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (y0, g0), (y1, g1) = run(False), run(True)
    torch.testing.assert_close(y1, y0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind, preset", [("llama", "houlsby"), ("llama", "pfeiffer"), ("bert", "parallel")])
def test_torch_compile_fullgraph(kind, preset):
    model = tiny(kind)
    pa.apply_adapters(model, PRESETS[preset](bottleneck=4))
    randomize(model, seed=5)
    x = ids()
    eager = model(x).logits
    eager.sum().backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x).logits
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-4, atol=1e-5)


def test_hf_trainer_runs(tmp_path):
    model = tiny("bert").train()
    pa.apply_adapters(model, AdapterConfig.pfeiffer(bottleneck=4), modules_to_train=["classifier"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (16, 8), generator=g)
    ds = [{"input_ids": row, "labels": int(row[0] % 3)} for row in x]
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                                learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                logging_steps=1, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = tf.Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    after = dict(model.named_parameters())
    assert any((after[n] - b).abs().max() > 0 for n, b in before.items())
    frozen = "bert.encoder.layer.0.attention.self.query.weight"
    assert not after[frozen].requires_grad


def test_example_script_runs():
    """examples/adapters.py end to end with a few steps: both adapters learn, the mixed batch runs, reload matches."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "adapters.py")
    spec = importlib.util.spec_from_file_location("adapters_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--steps", "6", "--device", "cpu"])
    assert res["loss_first"][-1] < res["loss_first"][0]
    assert res["loss_second"][-1] < res["loss_second"][0]
    assert 0.0 <= res["mixed_accuracy"] <= 1.0 and res["reload_same"]


def test_routing_under_torch_compile_fullgraph():
    model = tiny("llama")
    cfg = AdapterConfig.pfeiffer(bottleneck=4)
    pa.apply_adapters(model, cfg, "x")
    pa.add_bottleneck_adapter(model, "y", cfg)
    randomize(model, seed=3)
    x, route = ids(B=3, T=5), torch.tensor([1, 0, 1])
    with pa.adapter_routing(model, ["x", "y"], route):
        eager = model(x).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x).logits
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_bf16_model_with_fp32_adapter_masters(preset):
    """A bf16 model with fp32 adapter weights (the default): bf16 outputs, fp32 gradients, close to the fp32 model
    with the same weights; the adapter's own layer norms are created in the activations' dtype."""
    cfg = PRESETS[preset](bottleneck=4, ln_before=preset == "houlsby")
    x = ids()
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny("llama").to(dtype)
        pa.apply_adapters(model, cfg)
        randomize(model, seed=11, std=0.1)
        out = model(x).logits
        out.float().square().mean().backward()
        runs.append((out, {n: p for n, p in model.named_parameters() if p.requires_grad}))
    (ref, p_ref), (out, params) = runs
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05
    for n, p in params.items():
        assert p.grad is not None and p.grad.dtype == p.dtype, n
        if ".adapter_norm" in n:
            assert p.dtype == torch.bfloat16
        else:
            assert p.dtype == torch.float32
            assert ((p.grad - p_ref[n].grad).norm() / p_ref[n].grad.norm().clamp_min(1e-12)) < 0.15, n


@pytest.mark.parametrize("kw, exc, match", [
    ({"dtype": "float32"}, TypeError, r"apply_adapters: dtype must be a floating torch.dtype"),
    ({"dtype": torch.int32}, TypeError, r"apply_adapters: dtype must be a floating torch.dtype"),
    ({"name": "__train__"}, ValueError, r"apply_adapters: adapter name '__train__' is reserved"),
])
def test_failed_apply_leaves_the_model_as_it_was(kw, exc, match):
    model = tiny("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(exc, match=match):
        pa.apply_adapters(model, AdapterConfig(), **kw)
    assert "peft_kernels_adapter_control" not in model.__dict__ and not applied_methods(model)
    assert not any(isinstance(m, pa.AdapterSite) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    pa.apply_adapters(model, AdapterConfig(), "task")  # a retry with good arguments works


def test_failure_part_way_through_apply_is_undone(monkeypatch):
    model = tiny("llama")
    x = ids()
    with torch.no_grad():
        ref = model(x).logits

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(pa, "set_active_adapters", boom)  # after every site and hook is in place
    with pytest.raises(RuntimeError, match="injected"):
        pa.apply_adapters(model, AdapterConfig(), "task")
    monkeypatch.undo()
    assert not any(isinstance(m, pa.AdapterSite) for m in model.modules()) and not applied_methods(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_load_refuses_an_adapter_from_another_model_type(tmp_path):
    bert = tiny("bert")
    pa.apply_adapters(bert, AdapterConfig(), "task")
    pa.save_adapters(bert, tmp_path)
    roberta = tiny("roberta")  # the same widths and depth
    with pytest.raises(ValueError, match=r"load_adapters: .* saved from a 'bert' model; this one is 'roberta'"):
        pa.load_adapters(roberta, tmp_path / "task")
    assert "peft_kernels_adapter_control" not in roberta.__dict__


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_trained_norms_and_modules_are_saved_loaded_and_restored(tmp_path, kind):
    """What trains beside the adapters (the model's norms with train_layer_norms, a head in modules_to_train) is
    saved with them, loaded back (a fresh model gives the trained model's logits), and put back by remove."""
    model = tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = ["classifier"] if kind == "bert" else ["lm_head"]
    pa.apply_adapters(model, AdapterConfig(train_layer_norms=True), "task", modules_to_train=head)
    x = ids()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        out = model(x).logits
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("norm" in k.lower() for k in changed) and any(k.startswith(head[0]) for k in changed)
    with torch.no_grad():
        ref = model(x).logits
    pa.save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / "task" / pa.CONFIG_NAME).read_text())
    assert meta["modules_to_train"] == head and any(n.startswith(head[0]) for n in meta["model_parameters"])

    fresh = tiny(kind)
    pa.load_adapters(fresh, tmp_path / "task")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, ref)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if n.startswith(head[0]))

    pa.remove_adapters(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("over, exc, match", [
    ({"locations": None}, TypeError, r"AdapterConfig: locations must be a str or a list"),
    ({"leave_out": "0"}, TypeError, r"AdapterConfig: leave_out must be a list of layer indices"),
    ({"dropout": "x"}, TypeError, r"AdapterConfig: dropout must be a float"),
    ({"bias": "no"}, TypeError, r"AdapterConfig: bias must be a bool"),
    ({"parallel": "yes"}, TypeError, r"AdapterConfig: parallel must be a bool"),
    ({"train_layer_norms": 1}, TypeError, r"AdapterConfig: train_layer_norms must be a bool"),
    ({"reduction_factor": True}, TypeError, r"AdapterConfig: reduction_factor must be a number"),
])
def test_config_fields_of_the_wrong_kind_raise(over, exc, match):
    with pytest.raises(exc, match=match):
        AdapterConfig(**over)


def test_wrong_arguments_name_the_function(tmp_path):
    with pytest.raises(TypeError, match=r"apply_adapters: model must be an nn.Module"):
        pa.apply_adapters("bert")
    model = tiny("bert")
    pa.apply_adapters(model, AdapterConfig(), "task", modules_to_train="classifier")  # one name, not characters
    assert all(p.requires_grad for p in model.classifier.parameters())
    with pytest.raises(TypeError, match=r"set_active_adapters: setup must be an adapter name"):
        pa.set_active_adapters(model, 3)
    with pytest.raises(TypeError, match=r"save_adapters: the save directory must be a str or os.PathLike"):
        pa.save_adapters(model, None)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"save_adapters: .* is an existing file"):
        pa.save_adapters(model, tmp_path / "file")
    assert AdapterConfig(leave_out=1).leave_out == (1,)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_a_deepcopy_runs_and_trains_its_own_adapters(kind, preset):
    """The patched forwards and the residual tap find their site through their own module: a copy of the model ran
    the original's adapters (its own got no gradient, and changing them changed nothing); remove_adapters on the
    copy leaves the original patched."""
    import copy

    model = tiny(kind)
    pa.apply_adapters(model, PRESETS[preset](), "a")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        want = model(ids()).logits
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(ids()).logits, want)
        for p in clone.parameters():
            if p.requires_grad:
                p.add_(0.1)
        changed = clone(ids()).logits
        assert not torch.allclose(changed, want)
        assert torch.equal(model(ids()).logits, want)  # the original is not the copy's
    clone(ids()).logits.sum().backward()
    assert all(p.grad is not None for p in clone.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())
    pa.remove_adapters(clone)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, want)
        assert torch.equal(clone(ids()).logits, tiny(kind)(ids()).logits)
