"""Model-wide helpers: inject, trainable flags, LoRA state dict, merge/unmerge, unload."""

import copy

import pytest
import torch
from torch import nn

from conftest import DEVICE
from lora_kernels import (FusedLoRALinear, inject, lora_layers, lora_state_dict, mark_only_lora_as_trainable, merge,
                          unload, unmerge)

transformers = pytest.importorskip("transformers")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 16, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        h = self.attn["q_proj"](x) + self.attn["v_proj"](x)
        return self.norm(self.mlp(h))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_inject_by_suffix_shares_weights():
    net = _Net()
    q_weight = net.attn["q_proj"].weight
    inject(net, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    layers = lora_layers(net)
    assert sorted(layers) == ["attn.q_proj", "attn.v_proj"]
    assert layers["attn.q_proj"].weight is q_weight
    assert isinstance(net.mlp[0], nn.Linear) and not isinstance(net.mlp[0], FusedLoRALinear)


def test_inject_by_regex_with_rank_and_alpha_patterns():
    net = _Net()
    inject(net, r"mlp\.\d+", r=2, lora_alpha=4, rank_pattern={"mlp.2": 5}, alpha_pattern={"mlp.0": 10})
    layers = lora_layers(net)
    assert sorted(layers) == ["mlp.0", "mlp.2"]
    assert (layers["mlp.0"].r, layers["mlp.0"].lora_alpha) == (2, 10)
    assert (layers["mlp.2"].r, layers["mlp.2"].lora_alpha) == (5, 4)


def test_inject_conv1d_of_gpt2_and_identity_at_start():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    inject(model, ["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8)
    layers = lora_layers(model)
    assert len(layers) == 2 * 4 and all(layer.fan_in_fan_out for layer in layers.values())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_inject_errors():
    with pytest.raises(ValueError, match=r"matched no nn.Linear or Conv1D module.*attn.q_proj"):
        inject(_Net(), ["k_proj"])
    with pytest.raises(TypeError, match=r"neither nn.Linear, Conv1D nor a bitsandbytes .*: norm \(LayerNorm\)"):
        inject(_Net(), ["q_proj", "norm"])
    with pytest.raises(ValueError, match="target_modules: expected at least one"):
        inject(_Net(), [])


def test_quantized_linear_subclass_is_never_grabbed():
    class QuantLinear(nn.Linear):  # a quantized subclass of nn.Linear of an unknown library (bitsandbytes' are taken)
        pass

    net = _Net()
    net.attn["q_proj"] = QuantLinear(16, 16)
    with pytest.raises(TypeError, match="QuantLinear"):
        inject(net, ["q_proj", "v_proj"])


def test_trainable_flags_and_lora_state_dict():
    net = inject(_Net(), ["q_proj", "v_proj", "mlp.0"], r=2)
    mark_only_lora_as_trainable(net)
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    layers = ("attn.q_proj", "attn.v_proj", "mlp.0")
    assert trainable == sorted(f"{m}.adapters.default.lora_{ab}" for m in layers for ab in "AB")
    assert sorted(lora_state_dict(net)) == sorted(f"{m}.lora_{ab}" for m in layers for ab in "AB")  # loralib's keys
    mark_only_lora_as_trainable(net, bias="lora_only")
    assert net.attn["q_proj"].bias.requires_grad and not net.mlp[2].bias.requires_grad
    assert "attn.q_proj.bias" in lora_state_dict(net, bias="lora_only")
    assert "mlp.2.bias" not in lora_state_dict(net, bias="lora_only")
    mark_only_lora_as_trainable(net, bias="all")
    assert net.mlp[2].bias.requires_grad and net.norm.bias.requires_grad
    with pytest.raises(ValueError, match="bias: expected 'none', 'all' or 'lora_only'"):
        mark_only_lora_as_trainable(net, bias="some")


@pytest.mark.parametrize("do_merge", [True, False])
def test_merge_unmerge_and_unload_gpt2(do_merge):
    model = inject(_gpt2(), ["c_attn", "c_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        y = model(ids).logits
        merge(model)
        torch.testing.assert_close(model(ids).logits, y, rtol=1e-4, atol=1e-4)
        unmerge(model)
        torch.testing.assert_close(model(ids).logits, y, rtol=1e-4, atol=1e-4)
        base = copy.deepcopy(model)
        unload(model, merge=do_merge)
    assert not lora_layers(model)
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)
    with torch.no_grad():
        out = model(ids).logits
        if do_merge:
            torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-4)
        else:
            for layer in lora_layers(base).values():
                torch.nn.init.zeros_(layer.lora_B)
            torch.testing.assert_close(out, base(ids).logits, rtol=0, atol=0)


def test_injected_model_trains_on_device():
    net = inject(_Net().to(DEVICE), ["q_proj", "v_proj"], r=2, backend="triton")
    mark_only_lora_as_trainable(net)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, t = torch.randn(8, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    losses = []
    for _ in range(5):
        loss = (net(x) - t).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_adapter_ids_for_names_and_layer_disagreement():
    """adapter_ids_for turns request adapter names into the ids of a mixed batch, and refuses when one ids tensor
    would mean different adapters in different layers."""
    import lora_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.Linear(12, 12))
    lora_kernels.inject(model, ["0", "1"], r=2, init_lora_weights=False, backend="torch")
    lora_kernels.add_adapter(model, "math", r=2, init_lora_weights=False)
    lora_kernels.add_adapter(model, "code", r=3, init_lora_weights=False)
    ids = lora_kernels.adapter_ids_for(model, ["code", None, "default", "math", "code"])
    assert ids.tolist() == [2, -1, 0, 1, 2] and ids.dtype == torch.int64
    x = torch.randn(5, 3, 12)
    with torch.no_grad(), lora_kernels.adapter_ids(ids):
        y = model(x)
    lora_kernels.set_adapter(model, "code")
    with torch.no_grad():
        torch.testing.assert_close(y[0], model(x[:1])[0])
    with pytest.raises(ValueError, match="adapter 'bio' is missing in layers"):
        lora_kernels.adapter_ids_for(model, ["bio"])
    layers = lora_kernels.lora_layers(model)
    layers["0"].add_adapter("x", r=1)  # different orders: x then y in one layer, y then x in the other
    layers["0"].add_adapter("y", r=1)
    layers["1"].add_adapter("y", r=1)
    layers["1"].add_adapter("x", r=1)
    with pytest.raises(ValueError, match="adapter 'x' has different indices across layers"):
        lora_kernels.adapter_ids_for(model, ["x", "math"])
    assert lora_kernels.adapter_ids_for(model, ["math"]).tolist() == [1]
