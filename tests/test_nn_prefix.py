"""peft_kernels.nn.PrefixEncoder / PrefixParameters: shapes, HF peft's layout and init, errors."""

import pytest
import torch

from peft_kernels.nn import PrefixEncoder, PrefixParameters
from tests.helpers import assert_close

L, HKV, D, P = 3, 2, 8, 5


def _check_output(out, num_layers=L, hkv=HKV, p=P, d=D):
    assert isinstance(out, list) and len(out) == num_layers
    for k, v in out:
        assert k.shape == (hkv, p, d) and v.shape == (hkv, p, d)
        assert k.stride(-1) == 1 and v.stride(-1) == 1


@pytest.mark.parametrize("projection", [True, False])
def test_shapes_params_and_grads(projection):
    enc = PrefixEncoder(L, HKV, D, P, projection=projection, projection_hidden=16)
    out = enc()
    _check_output(out)
    names = {n for n, _ in enc.named_parameters()}
    if projection:
        assert names == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                         "transform.2.bias"}
        assert enc.embedding.weight.shape == (P, HKV * D)  # peft's token_dim = Hkv * D
        assert enc.transform[0].weight.shape == (16, HKV * D)
        assert enc.transform[2].weight.shape == (L * 2 * HKV * D, 16)
    else:
        assert names == {"embedding.weight"}
        assert enc.embedding.weight.shape == (P, L * 2 * HKV * D)
    sum(k.square().sum() + 2 * v.sum() for k, v in out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_deep_prompt_layout_is_per_layer_k_then_v():
    enc = PrefixEncoder(L, HKV, D, P, projection=False)
    w = enc.embedding.weight.detach().view(P, L, 2, HKV, D)
    for i, (k, v) in enumerate(enc()):
        assert_close(k.detach(), w[:, i, 0].permute(1, 0, 2))
        assert_close(v.detach(), w[:, i, 1].permute(1, 0, 2))


def test_init_matches_torch_defaults():
    torch.manual_seed(0)
    enc = PrefixEncoder(2, 4, 16, 64, projection=False)
    w = enc.embedding.weight
    assert abs(w.mean().item()) < 0.05 and abs(w.std().item() - 1.0) < 0.05  # nn.Embedding: N(0, 1)
    enc = PrefixEncoder(2, 4, 16, 64, projection=True, projection_hidden=32)
    bound = 1 / (4 * 16) ** 0.5  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert enc.transform[0].weight.abs().max() <= bound


@pytest.mark.parametrize("projection", [True, False])
def test_same_values_as_hf_peft_prefix_encoder(projection):
    peft = pytest.importorskip("peft")
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=HKV * D, num_layers=L,
                                  num_attention_heads=HKV, prefix_projection=projection, encoder_hidden_size=16)
    theirs = peft.PrefixEncoder(cfg)
    ours = PrefixEncoder(L, HKV, D, P, projection=projection, projection_hidden=16)
    ours.load_state_dict(theirs.state_dict())  # same parameter names and shapes
    # peft's get_prompt: [B, P, 2L*Hkv*D] -> view [B, P, 2L, Hkv, D] -> permute [2L, B, Hkv, P, D] -> pairs per layer
    flat = theirs(torch.arange(P)[None])
    past = flat.view(1, P, 2 * L, HKV, D).permute(2, 0, 3, 1, 4).split(2)
    for (k, v), layer in zip(ours(), past):
        assert_close(k.detach(), layer[0, 0].detach())
        assert_close(v.detach(), layer[1, 0].detach())


def test_dtype_and_to_static():
    enc = PrefixEncoder(L, HKV, D, P, projection=True, projection_hidden=16, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in enc.parameters())
    static = enc.to_static()
    assert isinstance(static, PrefixParameters)
    assert (static.num_layers, static.num_kv_heads, static.num_virtual_tokens, static.head_dim) == (L, HKV, P, D)
    for (k, v), (ks, vs) in zip(enc(), static()):
        assert ks.requires_grad and ks.dtype == torch.float64
        assert_close(ks.detach(), k.detach())
        assert_close(vs.detach(), v.detach())
    assert "num_virtual_tokens=5" in repr(enc)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive int"),
        ({"num_virtual_tokens": 2.0}, "num_virtual_tokens must be a positive int"),
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": -1}, "head_dim"),
        ({"projection_hidden": 0}, "projection_hidden"),
        ({"projection": False, "hidden_size": 7}, "only applies with projection=True"),
    ],
)
def test_encoder_errors(kwargs, match):
    args = {"num_layers": L, "num_kv_heads": HKV, "head_dim": D, "num_virtual_tokens": P, **kwargs}
    with pytest.raises(ValueError, match=match):
        PrefixEncoder(**args)


def test_prefix_parameters_trainable_copy():
    src = [(torch.randn(HKV, P, D, dtype=torch.float16), torch.randn(HKV, P, D, dtype=torch.float16))
           for _ in range(L)]
    mod = PrefixParameters(src)
    _check_output(mod())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in mod.parameters())
    assert_close(mod()[1][0].detach(), src[1][0].float())
    mod.keys[0].data.add_(1)  # a copy: the caller's tensors are untouched
    assert not torch.equal(mod.keys[0].detach().half(), src[0][0])


@pytest.mark.parametrize(
    "prefixes, match",
    [
        ([], "non-empty list"),
        ([(torch.randn(HKV, P, D), torch.randn(HKV, P, D)), (torch.randn(HKV, P + 1, D), torch.randn(HKV, P + 1, D))],
         "layer 1 has virtual tokens P = 6 but layer 0 has 5"),
        ([(torch.randn(HKV, P, D), torch.randn(HKV, P, D)), (torch.randn(HKV, P, D + 2), torch.randn(HKV, P, D + 2))],
         "layer 1 has head dim D = 10 but layer 0 has 8"),
        ([(torch.randn(HKV, P, D), torch.randn(HKV, P + 1, D))], "must match"),
        ([(torch.randn(P, D), torch.randn(P, D))], r"must be a float \[Hkv, P, D\] tensor"),
        ([(torch.randn(HKV, 0, D), torch.randn(HKV, 0, D))], "no virtual tokens"),
        ([torch.randn(HKV, P, D)], "pair"),
    ],
)
def test_prefix_parameters_errors(prefixes, match):
    with pytest.raises(ValueError, match=match):
        PrefixParameters(prefixes)
