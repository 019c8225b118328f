"""model.save_pretrained(dir) (what Trainer.save_model and its checkpoints call) on a model patched by prompt tuning,
P-tuning, prefix tuning, P-tuning v2, BitFit or bottleneck adapters also writes the method's own files: the
method's loader reads the directory back with the same outputs, and transformers' from_pretrained still loads it.
remove_* gives the class's save_pretrained back."""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import peft_kernels as pk  # noqa: E402
from peft_kernels.nn import AdapterConfig  # noqa: E402
from tests.patch.test_patch_peft_dispatch import _bert, _llama  # noqa: E402  (tiny models, seeded)

pytestmark = pytest.mark.filterwarnings("ignore")


def _adapters_load(model, d):
    pk.load_adapters(model, os.path.join(d, "task"))  # (returns the adapter's name)
    pk.set_active_adapters(model, "task")
    return model


# name: (base model, apply, load from the directory, a file the method wrote)
CASES = {
    "prompt": (_llama, lambda m: pk.apply_prompt_tuning(m, num_virtual_tokens=4), pk.load_prompt,
               "peft_kernels_prompt/adapter_config.json"),
    "p_tuning": (_llama, lambda m: pk.apply_p_tuning(m, num_virtual_tokens=4), pk.load_prompt,
                 "peft_kernels_prompt/adapter_config.json"),
    "prefix": (_llama, lambda m: pk.apply_prefix_tuning(m, num_virtual_tokens=4), pk.load_prefix,
               "prefix_config.json"),
    "p_tuning_v2": (_llama, lambda m: pk.apply_p_tuning_v2(m, num_virtual_tokens=4), pk.load_prefix,
                    "prefix_config.json"),
    "bitfit": (_llama, lambda m: pk.apply_bitfit(m, add_missing_biases=True), pk.load_bitfit, "bitfit_config.json"),
    "lora+bitfit": (_llama, lambda m: pk.apply_bitfit(pk.apply_lora(m, target_modules=["q_proj"], r=4),
                                                       add_missing_biases=True),
                    lambda m, d: pk.load_bitfit(pk.load_lora(m, d), d), "bitfit_config.json"),
    "adapters": (_bert, lambda m: pk.apply_adapters(m, AdapterConfig.houlsby(), "task"), _adapters_load,
                 "task/adapter_config.json"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_writes_what_the_loader_reads(name, tmp_path):
    make, apply, load, marker = CASES[name]
    base = make()
    model = apply(copy.deepcopy(base))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / marker).is_file()
    loaded = load(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
    type(base).from_pretrained(tmp_path)  # transformers still loads the directory (the method's keys dropped)
    clone = copy.deepcopy(model)  # the copy saves itself, not the original
    with torch.no_grad():
        for p in clone.parameters():
            if p.requires_grad:
                p.add_(0.05)
        want_clone = clone(input_ids=ids).logits
    clone.save_pretrained(tmp_path / "clone")
    loaded = load(make(), str(tmp_path / "clone")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want_clone)


@pytest.mark.parametrize("name", list(CASES))
def test_a_patched_model_is_freed_when_dropped(name):
    """The instance-level save_pretrained holds its model weakly: no reference cycle, so `del model` frees it (and
    its GPU memory) at once, without the cyclic collector."""
    import gc
    import weakref

    make, apply, _, _ = CASES[name]
    model = apply(make())
    ref = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["prompt", "prefix", "bitfit", "lora+bitfit", "adapters"])
def test_remove_gives_the_class_save_pretrained_back(name):
    make, apply, _, _ = CASES[name]
    model = apply(make())
    assert "save_pretrained" in model.__dict__
    if name == "lora+bitfit":
        pk.remove_bitfit(model)
        assert "save_pretrained" in model.__dict__  # LoRA's own, which BitFit's wrapped
        pk.remove_lora(model)
    else:
        {"prompt": pk.remove_prompt_tuning, "prefix": pk.remove_prefix, "bitfit": pk.remove_bitfit,
         "adapters": pk.remove_adapters}[name](model)
    assert "save_pretrained" not in model.__dict__
