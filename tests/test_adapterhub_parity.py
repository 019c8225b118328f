"""AdapterHub parity: with the same weights, apply_adapters models give the outputs and gradients of AdapterHub's
``adapters`` 1.3 (Houlsby = DoubleSeqBnConfig, Pfeiffer = SeqBnConfig, parallel = ParBnConfig) on tiny BERT and
Llama models, and adapters saved by that library (``model.save_adapter``) load into apply_adapters models.

``adapters`` 1.3 pins transformers 4.57, so it runs in a side environment, never in the main one: this module
creates it once with ``pip install --target`` (the command of DESIGN.md) under ~/.cache/peft_kernels and runs a
script there in a subprocess with ``PYTHONPATH=<dir>`` and the main environment's torch. That script builds each
tiny model (float64, eager attention, eval mode), adds the adapter with non-zero weights, runs a forward and a
backward on fixed inputs and writes: the base model's state dict, the inputs, the logits, every adapter-parameter
gradient, and the adapter directory that ``save_adapter`` wrote. The test then builds the same model with the
main environment's transformers, loads the base weights, loads the AdapterHub adapter directory with
``load_adapters`` and compares. Skipped, with the pip output as the reason, only when the registry is unreachable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

SIDE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "peft_kernels", "side-adapterhub-1.3.0")
PIP_ARGS = ["--no-deps", "transformers==4.57.6", "adapters==1.3.0", "tokenizers>=0.22,<0.23",
            "huggingface_hub>=0.34,<1.0", "requests", "urllib3", "idna", "certifi", "charset_normalizer"]
CONFIGS = {"houlsby": "DoubleSeqBnConfig", "pfeiffer": "SeqBnConfig", "parallel": "ParBnConfig"}
MODELS = ("bert", "llama")

SIDE_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import transformers as tf
    import adapters
    from adapters import DoubleSeqBnConfig, SeqBnConfig, ParBnConfig

    out_dir = sys.argv[1]
    configs = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig, "parallel": ParBnConfig}

    def tiny(kind):
        if kind == "bert":
            c = tf.BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=53, num_labels=3, attn_implementation="eager")
            return tf.BertForSequenceClassification(c)
        c = tf.LlamaConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=56, attn_implementation="eager")
        return tf.LlamaForCausalLM(c)

    meta = {"transformers": tf.__version__, "adapters": adapters.__version__}
    for kind in ("bert", "llama"):
        for cname, cls in configs.items():
            torch.manual_seed(0)
            model = tiny(kind).double().eval()
            base = {k: v.clone() for k, v in model.state_dict().items()}
            adapters.init(model)
            name = "ad_" + cname
            model.add_adapter(name, config=cls(reduction_factor=4))
            model.set_active_adapters(name)
            model.double()
            gen = torch.Generator().manual_seed(1)
            for n, p in model.named_parameters():
                p.requires_grad_("adapters." + name + "." in n)
                if "adapters." + name + "." in n:
                    with torch.no_grad():  # non-zero weights everywhere (up included), fixed seed
                        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
            ids = torch.randint(0, 61, (3, 11), generator=gen)
            logits = model(ids).logits
            w = torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
            (logits * w).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            case = os.path.join(out_dir, kind + "_" + cname)
            os.makedirs(case, exist_ok=True)
            model.save_adapter(os.path.join(case, "adapter"), name)
            torch.save({"base": base, "ids": ids, "logits": logits.detach(), "w": w, "grads": grads, "name": name},
                       os.path.join(case, "run.pt"))
    json.dump(meta, open(os.path.join(out_dir, "meta.json"), "w"))
''')


def _side_env() -> str:
    """The side folder with adapters 1.3 + transformers 4.57.6 (created once, cached; never the main venv)."""
    marker = os.path.join(SIDE_DIR, "adapters", "__init__.py")
    if os.path.isfile(marker):
        return SIDE_DIR
    tmp = SIDE_DIR + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--target", tmp, *PIP_ARGS]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("pip install of the AdapterHub side environment timed out (registry unreachable?)")
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (res.stderr or res.stdout)[-600:]
        if any(s in tail for s in ("No matching distribution", "Could not find a version", "Network", "connection",
                                   "Connection", "Name or service", "Temporary failure")):
            pytest.skip("the package registry is unreachable, so the AdapterHub side environment cannot be built: "
                        + tail)
        raise RuntimeError(f"pip install --target {tmp} failed:\n{tail}")
    os.makedirs(os.path.dirname(SIDE_DIR), exist_ok=True)
    try:
        os.replace(tmp, SIDE_DIR)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return SIDE_DIR


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory):
    side = _side_env()
    out = tmp_path_factory.mktemp("adapterhub")
    script = out / "side.py"
    script.write_text(SIDE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=side)
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env,
                         timeout=900, cwd=str(out))
    assert res.returncode == 0, f"AdapterHub side script failed:\n{res.stderr[-3000:]}"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["adapters"] == "1.3.0" and meta["transformers"] == "4.57.6", meta
    return out


def _tiny(kind):
    import transformers as tf

    if kind == "bert":
        c = tf.BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=53, num_labels=3)
        c._attn_implementation = "eager"
        return tf.BertForSequenceClassification(c)
    c = tf.LlamaConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=56)
    c._attn_implementation = "eager"
    return tf.LlamaForCausalLM(c)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", MODELS)
def test_outputs_and_gradients_match_adapterhub(hub_runs, kind, config):
    from peft_kernels.patch.adapter import _control, _hub_key, load_adapters

    case = hub_runs / f"{kind}_{config}"
    run = torch.load(case / "run.pt", weights_only=True)
    model = _tiny(kind).double().eval()
    missing, unexpected = model.load_state_dict(run["base"], strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k or "position_ids" in k for k in missing), missing
    with torch.no_grad():
        base_logits = model(run["ids"]).logits
    name = load_adapters(model, case / "adapter", dtype=torch.float64)
    assert name == run["name"]
    logits = model(run["ids"]).logits
    assert (logits - base_logits).abs().max() > 1e-3, "the adapter should change the outputs (non-zero weights)"
    torch.testing.assert_close(logits, run["logits"], rtol=1e-9, atol=1e-10)

    (logits * run["w"]).sum().backward()
    ours = {}
    for site in _control(model, "test").sites:
        if name in site:
            for k, p in site[name].named_parameters():
                ours[f"{site.layer_idx}.{site.location}.{k}"] = p.grad
    ln_before = False
    theirs = {}
    for k, g in run["grads"].items():
        parsed = _hub_key(k, name, ln_before)
        assert parsed is not None, f"AdapterHub gradient {k!r} has no counterpart"
        layer, loc, param = parsed
        theirs[f"{layer}.{loc}.{param}"] = g
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k] is not None, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-8, atol=1e-10, msg=lambda m, k=k: f"grad {k}: {m}")


def test_adapterhub_config_maps_to_presets(hub_runs):
    """The configs AdapterHub wrote map to our presets (same placement flags, activation, width)."""
    from peft_kernels.nn.adapter import AdapterConfig

    preset = {"houlsby": AdapterConfig.houlsby, "pfeiffer": AdapterConfig.pfeiffer,
              "parallel": AdapterConfig.parallel_adapter}
    for config, make in preset.items():
        meta = json.loads((hub_runs / f"bert_{config}" / "adapter" / "adapter_config.json").read_text())
        ours = AdapterConfig.from_adapterhub(meta["config"])
        ref = make(reduction_factor=4)
        for field in ("locations", "non_linearity", "original_ln_before", "original_ln_after", "residual_before_ln",
                      "parallel", "scaling", "reduction_factor", "ln_before", "ln_after"):
            assert getattr(ours, field) == getattr(ref, field), (config, field)
