"""peft_kernels._config: every environment variable in one table, switches as ContextVars that also hold
inside torch.compile, the measured-dispatch cache and its controls."""

import subprocess
import sys

import pytest
import torch

import peft_kernels
from peft_kernels import _config


def test_every_env_var_read_by_the_package_is_listed_and_in_the_readme():
    import pathlib
    import re

    pkg = pathlib.Path(peft_kernels.__file__).parent
    readers = {}
    for path in pkg.rglob("*.py"):
        for name in re.findall(r"os\.environ(?:\.get)?\(?\[?[\"'](\w+)", path.read_text()):
            readers.setdefault(name, set()).add(path.name)
    assert set(readers) <= set(_config.ENVIRONMENT), readers
    assert {p for names in readers.values() for p in names} <= {"_config.py"}, readers
    readme = (pkg.parent / "README.md").read_text()
    for name in _config.ENVIRONMENT:
        assert name in readme, f"{name} is not in the README"


def test_switches_nest_and_restore():
    assert _config.forced_backend() is None or _config.SETTINGS.backend
    with peft_kernels.use_backend("reference", strict=True):
        assert _config.forced_backend() == ("reference", True)
        with peft_kernels.use_backend(None):
            assert _config.forced_backend() is None or _config.SETTINGS.backend
        assert _config.forced_backend() == ("reference", True)
    with _config.poison():
        assert _config.poison_outputs()
    with _config.override_interpret_blocks(fwd=(16, 32)):
        assert _config.interpret_blocks("fwd", (64, 64)) == (16, 32)
        assert _config.interpret_blocks("other", 7) == 7
    with pytest.raises(ValueError, match="path"):
        _config.force_gemm_path("bogus")


def test_use_backend_inside_and_outside_torch_compile():
    from peft_kernels.ops import lora

    x, W = torch.randn(5, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    chosen = []
    run = lora.FAMILY.forward_backends["reference"].run

    def spy(*args):
        chosen.append("reference")
        return run(*args)

    lora.FAMILY.forward_backends["reference"].run = spy
    try:
        def inside(x):
            with peft_kernels.use_backend("reference", strict=True):
                return peft_kernels.lora_linear(x, W, None, A, B)

        out = torch.compile(inside, fullgraph=True)(x)
        assert chosen, "the backend forced inside the compiled function was not used"
        torch.testing.assert_close(out, lora.lora_linear_reference(x, W, None, A, B))

        chosen.clear()
        compiled = torch.compile(lambda x: peft_kernels.lora_linear(x, W, None, A, B), fullgraph=True)
        compiled(x)
        auto = list(chosen)
        chosen.clear()
        with peft_kernels.use_backend("reference", strict=True):
            compiled(x)  # re-traced: the graph does not keep the backend it first saw
        assert chosen == ["reference"], (auto, chosen)
    finally:
        lora.FAMILY.forward_backends["reference"].run = run


def test_tuning_switch_and_cache():
    _config.clear_tuning_cache()
    with _config.tuning(False):
        assert not _config.tune_dispatch("cuda")
    with _config.tuning(True):
        assert _config.tune_dispatch("cpu")
    assert _config.tuned_choices() == {}


def test_bad_env_value_is_a_clear_error():
    code = "import peft_kernels"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PEFT_KERNELS_STRICT": "maybe"})
    assert out.returncode != 0 and "PEFT_KERNELS_STRICT" in out.stderr


def test_warm_up_measures_every_layer_once():
    from peft_kernels.nn import LoRALinear

    # On CPU tensors with dropout, the aten (C++ mask) and reference backends both serve: measured.
    model = torch.nn.Sequential(LoRALinear(8, 8, r=2, lora_dropout=0.1), LoRALinear(8, 16, r=2, lora_dropout=0.1))
    peft_kernels.clear_tuning_cache()
    choices = peft_kernels.warm_up(model, torch.randn(3, 8))
    lora_keys = [k for k in choices if k[0] == "lora_linear"]
    assert len(lora_keys) == 2 and {choices[k] for k in lora_keys} <= {"aten", "reference"}
    assert all(p.grad is None for p in model.parameters())  # warm-up leaves no gradients behind
    peft_kernels.clear_tuning_cache()
