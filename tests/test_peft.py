"""Interoperability with Hugging Face PEFT: same outputs and grads, the file format both ways, fuse()."""

import copy
import json
import os
import re
import warnings

import pytest
import torch

from conftest import DEVICE, CountOps, assert_parity, lm_losses
import lora_kernels
from lora_kernels import inject, load_adapter, lora_layers, mark_only_lora_as_trainable, save_adapter
from lora_kernels import peft_format

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from lora_kernels.peft import FusedPeftLinear, fuse, register  # noqa: E402

BACKEND = "triton"  # the kernels (in the interpreter without a GPU), not the reference


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE).eval()


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


MODELS = {"gpt2": (_gpt2, ["c_attn", "c_proj"]), "llama": (_llama, ["q_proj", "v_proj", "down_proj"])}


def _key(name: str) -> str:
    """PEFT's parameter names (base_model.model.X.lora_A.default.weight, X.lora_magnitude_vector.default.weight) and
    ours (X.adapters.default.lora_A) to X.lora_A."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.adapters\.default\.(lora_\w+)$", r".\1", name)
    return re.sub(r"\.(lora_[AB]|lora_magnitude_vector)\.default\.weight$", r".\1", name)


def _run(model, ids):
    """Logits and {X.lora_A / X.lora_B: grad} after backward of a fixed loss."""
    model.zero_grad()
    logits = model(ids).logits
    (logits.float() ** 2).mean().backward()
    grads = {_key(n): p.grad for n, p in model.named_parameters() if "lora_" in n}
    return logits.detach(), grads


def _peft_model(base, targets, **kwargs):
    cfg = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **kwargs})
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _assert_same_as_peft(ours, pm, ids):
    """Ours (fp32, kernels) vs PEFT in fp32 (same-dtype reference) and fp64 (reference)."""
    y, g = _run(ours, ids)
    y32, g32 = _run(pm, ids)
    y64, g64 = _run(copy.deepcopy(pm).double(), ids)
    assert_parity("logits", y, y32, y64)
    assert sorted(g) == sorted(g32) and g
    for k in g:
        assert_parity(f"grad {k}", g[k], g32[k], g64[k])


@pytest.mark.parametrize("arch", list(MODELS))
def test_load_peft_saved_adapter(arch, tmp_path):
    """PEFT saves, we load: outputs and grads equal PEFT's (rank/alpha patterns and rsLoRA honoured)."""
    make, targets = MODELS[arch]
    torch.manual_seed(0)
    base = make()
    pm = _peft_model(base, targets, use_rslora=True, rank_pattern={targets[0]: 6}, alpha_pattern={targets[-1]: 3})
    pm.save_pretrained(tmp_path)
    ours = inject(copy.deepcopy(base), targets, r=4, lora_alpha=8, rank_pattern={targets[0]: 6}, backend=BACKEND)
    mark_only_lora_as_trainable(ours)
    load_adapter(ours, tmp_path)
    assert lora_layers(ours)[next(iter(lora_layers(ours)))].use_rslora
    _assert_same_as_peft(ours, pm, torch.randint(0, 64, (2, 9), device=DEVICE))


@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_loads_our_adapter(arch, tmp_path):
    """We save, PEFT loads (PeftModel.from_pretrained): identical outputs; keys exactly as PEFT writes them."""
    make, targets = MODELS[arch]
    torch.manual_seed(1)
    base = make()
    ours = inject(copy.deepcopy(base), targets, r=4, lora_alpha=8, init_lora_weights=False,
                  rank_pattern={targets[-1]: 2}, alpha_pattern={targets[0]: 16}, backend=BACKEND)
    save_adapter(ours, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    # the file holds what PEFT itself would write for these modules
    ref_dir = tmp_path / "peft"
    pm.save_pretrained(ref_dir)
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "adapter" / peft_format.WEIGHTS_NAME)
    theirs = load_file(ref_dir / peft_format.WEIGHTS_NAME)
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k])
    _assert_same_as_peft(ours, pm, torch.randint(0, 64, (2, 9), device=DEVICE))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while saving leaves the previous adapter whole and loadable, and no temporary files."""
    base = _llama()
    ours = inject(copy.deepcopy(base), ["q_proj"], r=4, init_lora_weights=False)
    path = tmp_path / "adapter"
    save_adapter(ours, path)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    for layer in lora_layers(ours).values():
        torch.nn.init.ones_(layer.lora_B)

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(ours, path)
    monkeypatch.undo()
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    fresh = inject(copy.deepcopy(base), ["q_proj"], r=4)
    load_adapter(fresh, path)
    save_adapter(ours, path)  # and a save that completes replaces it
    load_adapter(fresh, path)
    assert all(torch.equal(layer.lora_B, torch.ones_like(layer.lora_B)) for layer in lora_layers(fresh).values())


def test_load_rejects_mismatches(tmp_path):
    base = _llama()
    ours = inject(copy.deepcopy(base), ["q_proj"], r=4, init_lora_weights=False)
    save_adapter(ours, tmp_path / "a")
    other_rank = inject(copy.deepcopy(base), ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"q_proj: the file holds lora_A \[4, 32\].*the layer has lora_A \[2, 32\]"):
        load_adapter(other_rank, tmp_path / "a")
    other_targets = inject(copy.deepcopy(base), ["v_proj"], r=4)
    with pytest.raises(ValueError, match="does not match the model's LoRA layers; missing"):
        load_adapter(other_targets, tmp_path / "a")
    os.remove(tmp_path / "a" / peft_format.WEIGHTS_NAME)
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors adapters are read"):
        load_adapter(ours, tmp_path / "a")


def test_config_file_fields(tmp_path):
    ours = inject(_gpt2(), ["c_attn"], r=4, lora_alpha=8, use_rslora=True)
    save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / peft_format.CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"]
    assert cfg["fan_in_fan_out"] and cfg["target_modules"] == ["transformer.h.0.attn.c_attn",
                                                                "transformer.h.1.attn.c_attn"]
    assert peft.LoraConfig.from_pretrained(tmp_path / "a").r == 4


@pytest.mark.parametrize("arch", list(MODELS))
def test_fuse_matches_peft_and_keeps_its_api(arch, tmp_path):
    make, targets = MODELS[arch]
    torch.manual_seed(2)
    base = make()
    pm = _peft_model(base, targets)
    reference_pm = copy.deepcopy(pm)
    assert fuse(pm, backend=BACKEND) is pm
    layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    assert layers and all(type(m) is FusedPeftLinear for m in layers)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    _assert_same_as_peft(pm, reference_pm, ids)
    # PEFT's own API still works on the fused model: save, load back, merge_and_unload
    pm.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference_pm(ids).logits)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, reference_pm(ids).logits, rtol=1e-4, atol=1e-4)


def test_fuse_adapters_added_later_and_fallbacks():
    base = _llama()
    pm = _peft_model(base, ["q_proj"])
    fuse(pm, backend=BACKEND)
    # a new adapter whose config went through register(): PEFT builds fused layers itself
    pm.add_adapter("second", register(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"])))
    assert type(pm.base_model.model.model.layers[0].self_attn.k_proj) is FusedPeftLinear
    # one without: PEFT's layer, until fuse() runs again
    pm.add_adapter("third", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"]))
    o = pm.base_model.model.model.layers[0].self_attn.o_proj
    assert type(o) is peft.tuners.lora.layer.Linear
    fuse(pm, backend=BACKEND)
    assert type(o) is FusedPeftLinear
    # a LoRA variant the fused path does not cover: PEFT's forward serves it, with a warning, and the results are
    # PEFT's (a DoRA layer relabelled as another variant stands in for one)
    from peft.tuners.lora.variants import DoraLinearVariant

    class OtherVariant(DoraLinearVariant):
        pass

    other = _peft_model(base, ["v_proj"], use_dora=True)
    for module in other.modules():
        if getattr(module, "lora_variant", None):
            module.lora_variant["default"] = OtherVariant()
    expected = copy.deepcopy(other)
    ids = torch.randint(0, 64, (1, 5), device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:  # warned once: by fuse(), which sees the variant
        warnings.simplefilter("always")
        fuse(other, backend=BACKEND)
        out = other(ids).logits
    assert any("OtherVariant" in str(w.message) for w in caught)
    torch.testing.assert_close(out, expected(ids).logits, rtol=0, atol=0)


def test_register_builds_fused_layers_and_matches_peft():
    base = _llama()
    torch.manual_seed(4)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), register(copy.deepcopy(cfg), backend=BACKEND))
    assert all(type(m) is FusedPeftLinear for m in pm.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    plain = peft.get_peft_model(copy.deepcopy(base), cfg)
    plain.load_state_dict(pm.state_dict())
    _assert_same_as_peft(pm, plain, torch.randint(0, 64, (2, 6), device=DEVICE))


def test_custom_hook_leaves_quantized_linear_to_peft():
    class QuantLinear(torch.nn.Linear):  # stands in for bitsandbytes' Linear4bit
        pass

    from lora_kernels.peft import _dispatch

    cfg = peft.LoraConfig(r=2, target_modules=["x"])
    assert _dispatch(QuantLinear(8, 8), "default", cfg, r=2, lora_alpha=2) is None
    module = _dispatch(torch.nn.Linear(8, 8), "default", cfg, r=2, lora_alpha=2)
    assert type(module) is FusedPeftLinear


def test_training_follows_peft_loss_curve():
    """Two dozen AdamW steps with our fused layers and with PEFT's, from the same start: same losses."""
    torch.manual_seed(3)
    base = _llama()
    targets = ["q_proj", "v_proj"]
    pm = _peft_model(base, targets, lora_dropout=0.0)
    ours = inject(copy.deepcopy(base), targets, r=4, lora_alpha=8, backend=BACKEND)
    for name, layer in lora_layers(ours).items():
        src = pm.get_submodule(f"base_model.model.{name}")
        with torch.no_grad():
            layer.lora_A.copy_(src.lora_A["default"].weight)
            layer.lora_B.copy_(src.lora_B["default"].weight)
    mark_only_lora_as_trainable(ours)
    ids = torch.randint(0, 64, (4, 12), device=DEVICE)
    curves = [lm_losses(model, ids, 24) for model in (ours, pm)]
    assert curves[0][-1] < curves[0][0] - 0.1  # it learns
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_named_adapters_both_ways_with_peft(tmp_path):
    """Two adapters: PEFT's save_pretrained (second one in its subdirectory) loads into our named adapters, and
    our named adapter saves into a directory PEFT loads under any name; outputs match per adapter."""
    base = _llama()
    targets = ["q_proj", "v_proj"]
    pm = _peft_model(base, targets)
    pm.add_adapter("second", peft.LoraConfig(target_modules=targets, r=2, lora_alpha=6, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")  # default in peft/, "second" in peft/second/
    ours = inject(copy.deepcopy(base), targets, r=4, backend=BACKEND)
    load_adapter(ours, tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft" / "second", adapter_name="second")
    layer = lora_layers(ours)["model.layers.0.self_attn.q_proj"]
    assert layer.adapter_names == ["default", "second"] and layer._adapter("second")[2]["scaling"] == 3.0
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    pm64 = copy.deepcopy(pm).double()
    for name in ("default", "second"):
        pm.set_adapter(name)
        pm64.set_adapter(name)
        lora_kernels.set_adapter(ours, name)
        assert_parity(f"logits[{name}]", _logits(ours, ids), _logits(pm, ids), _logits(pm64, ids))
    # ours -> PEFT: the named adapter as its own directory, loaded by PEFT under a name of its choosing
    save_adapter(ours, tmp_path / "ours_second", adapter_name="second")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours_second", adapter_name="x")
    assert reloaded.peft_config["x"].r == 2 and reloaded.peft_config["x"].lora_alpha == 6
    pm.set_adapter("second")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pm, ids))
    # a file of another rank for an existing named adapter is refused
    with pytest.raises(ValueError, match=r"the file holds lora_A \[4, 32\].*the layer has lora_A \[2, 32\]"):
        load_adapter(ours, tmp_path / "peft", adapter_name="second")


def test_peft_mixed_batches_run_the_mixed_kernels(monkeypatch):
    """PEFT's forward(adapter_names=[...]) on a fused model: one mixed-kernel call per layer, PEFT's numbers."""
    import lora_kernels.peft as lk_peft

    base = _llama()
    pm = _peft_model(base, ["q_proj", "v_proj"])
    pm.add_adapter("second", peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=6, init_lora_weights=False))
    pm.eval()  # PEFT takes adapter_names in inference only
    reference_pm = copy.deepcopy(pm)
    fuse(pm, backend=BACKEND)
    calls = []
    real = lk_peft.mixed_call
    monkeypatch.setattr(lk_peft, "mixed_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 64, (3, 6), device=DEVICE)
    names = ["second", "__base__", "default"]  # v_proj has no "second": the base layer there, as in PEFT
    with torch.no_grad():
        y = pm(ids, adapter_names=names).logits
        y32 = reference_pm(ids, adapter_names=names).logits
        y64 = copy.deepcopy(reference_pm).double()(ids, adapter_names=names).logits
    assert len(calls) == 4  # q_proj and v_proj of both decoder layers
    assert_parity("logits", y, y32, y64)
    q_proj = pm.base_model.model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, 6, q_proj.in_features, device=DEVICE)
    with torch.no_grad():
        first = q_proj(h, adapter_names=names)
        with CountOps() as ops:
            again = q_proj(h, adapter_names=names)
    assert torch.equal(again, first)
    assert not {"cat", "all", "_to_copy"} & set(ops.counts), ops.counts  # adapters stacked and ids checked once


def test_fused_model_under_autocast():
    """Mixed-precision training (fp32 weights, torch.autocast bf16): the fused layers take the fused path (no
    fallback to PEFT's forward) and compute what the layers cast to bf16 compute; logits and grads follow PEFT's
    own run under the same autocast, by the parity rule against fp64. Mixed batches too."""
    base = _llama()
    pm = _peft_model(base, ["q_proj", "v_proj"])
    pm.add_adapter("second", peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=6, init_lora_weights=False))
    reference_pm = copy.deepcopy(pm)
    fuse(pm, backend=BACKEND)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y, g = _run(pm, ids)
            y16, g16 = _run(reference_pm, ids)
    y64, g64 = _run(copy.deepcopy(reference_pm).double(), ids)
    assert y.dtype == y16.dtype == torch.bfloat16
    assert_parity("logits", y, y16, y64)
    trained = sorted(k for k in g16 if g16[k] is not None)  # the active adapter's
    assert trained and trained == sorted(k for k in g if g[k] is not None)
    for k in trained:
        assert g[k].dtype == g16[k].dtype == torch.float32  # the parameters' dtype; computed in bf16 by both
        assert_parity(f"grad {k}", g[k].bfloat16(), g16[k].bfloat16(), g64[k])
    q_proj = pm.base_model.model.model.layers[0].self_attn.q_proj
    cast = copy.deepcopy(q_proj).to(torch.bfloat16)
    h = torch.randn(3, 6, q_proj.in_features, device=DEVICE)
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        for kwargs in ({}, {"adapter_names": names}):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                out = q_proj(h, **kwargs)
            torch.testing.assert_close(out, cast(h.bfloat16(), **kwargs), rtol=0, atol=0)


def test_fp32_adapters_on_a_16bit_base_cast_once_in_inference():
    """PEFT keeps adapters in fp32 next to a bf16 base (autocast_adapter_dtype): the fused layer computes in bf16
    with the adapters cast, and in inference casts them once, not on every call."""
    base = _llama().to(torch.bfloat16)
    pm = _peft_model(base, ["q_proj"])
    q_proj = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.dtype == torch.float32 and q_proj.base_layer.weight.dtype == torch.bfloat16
    fuse(pm, backend=BACKEND)
    h = torch.randn(2, 5, q_proj.in_features, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        first = q_proj(h)
        with CountOps() as ops:
            again = q_proj(h)
        expected = lora_kernels.lora_linear(h, q_proj.base_layer.weight, q_proj.base_layer.bias,
                                            q_proj.lora_A["default"].weight.bfloat16(),
                                            q_proj.lora_B["default"].weight.bfloat16(), q_proj.scaling["default"],
                                            backend=BACKEND)
    assert "_to_copy" not in ops.counts, ops.counts
    assert torch.equal(again, first) and torch.equal(first, expected)
