"""fuse() judged by PEFT itself: every LoRA option and model operation PEFT runs, on the same PEFT model unfused
and fused. Each case is served exactly (outputs and grads by the parity rule against an fp64 PEFT run, merged
weights, saved files) or handed back to PEFT's forward with one warning naming the feature; never a raise where
PEFT runs, never a different result. The README's table of what is served and what is handed back follows these
cases."""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

from conftest import DEVICE, CountOps, assert_parity, llama_4bit
from lora_kernels import backends

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from lora_kernels.peft import fuse, fuse_report  # noqa: E402


class MLP(nn.Module):
    """The kind of small custom model PEFT's own tests use: a two-output head (r = 4 > 2 is valid for PEFT)."""

    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 20, bias=bias)
        self.lin2 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class EmbedMLP(nn.Module):
    """An embedding and a convolution next to Linear layers: PEFT's LoRA Embedding / Conv2d stay PEFT's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 10)
        self.conv = nn.Conv1d(10, 10, 1)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 3)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.lin1(torch.relu(self.lin0(h)))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, max_position_embeddings=32, bos_token_id=0,
                                   eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {
    "mlp": (MLP, ["lin0", "lin1", "lin2"], lambda: torch.randn(3, 10, device=DEVICE)),
    "embed": (EmbedMLP, ["emb", "conv", "lin0", "lin1"], lambda: torch.randint(0, 30, (3, 5), device=DEVICE)),
    "gpt2": (_gpt2, ["c_attn", "c_proj"], lambda: torch.randint(0, 64, (2, 7), device=DEVICE)),
    "llama": (_llama, ["q_proj", "v_proj", "down_proj", "lm_head"],
              lambda: torch.randint(0, 64, (2, 7), device=DEVICE)),
}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    backends.reset_warnings()  # each case sees its own hand-back warnings
    yield


def _base(kind):
    torch.manual_seed(0)
    return MODELS[kind][0]().to(DEVICE).eval()


def _peft(base, kind, **config):
    kw = dict(target_modules=MODELS[kind][1], r=4, lora_alpha=8, init_lora_weights=False)
    kw.update(config)
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))


def _out(model, x, **kwargs):
    out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _run(model, x, train=False, **kwargs):
    """The output and {parameter name: grad} after the backward of a fixed loss (train: in training mode)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.double() if next(model.parameters()).dtype == torch.float64 and x.is_floating_point() else x
    y = _out(model, x, **kwargs)
    if torch.is_grad_enabled() and y.requires_grad:
        (y.double() ** 2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def _hand_backs(caught):
    return [str(w.message) for w in caught if "PEFT's own forward serves" in str(w.message)]


def _same_dtype_runs(reference, x, train=False, **kwargs):
    """PEFT's same-dtype output and grads: [(y, grads)]. With lora_bias, also PEFT's own eager ops on the model with
    each lora_B bias folded into its base layer's bias (scaled; the function the fused layers compute, in another
    rounding order): two samples of the same-dtype error, where one alone can be unusually small for an
    ill-conditioned grad (the attention's inputs deep in the model)."""
    runs = [_run(reference, x, train, **kwargs)]
    folded = copy.deepcopy(reference)
    moved = {}
    for name, module in folded.named_modules():
        if not isinstance(module, peft.tuners.lora.layer.Linear) or module.disable_adapters or module.merged:
            continue
        for adapter in [a for a in module.active_adapters if a in module.lora_B]:
            lora_b = module.lora_B[adapter]
            if lora_b.bias is None:
                continue
            base = module.get_base_layer()
            term = lora_b.bias.detach() * module.scaling[adapter]
            base.bias = nn.Parameter(term if base.bias is None else base.bias.detach() + term)
            lora_b.bias = None
            moved[f"{name}.base_layer.bias"] = (f"{name}.lora_B.{adapter}.bias", module.scaling[adapter])
    if moved:
        y, g = _run(folded, x, train, **kwargs)
        for base_key, (lora_key, scaling) in moved.items():
            if base_key in g:
                g[lora_key] = g.pop(base_key) * scaling
        runs.append((y, g))
    return runs


def _fused_vs_peft(fused, reference, x, train=False, **kwargs):
    """Runs the fused model, PEFT's (same dtype; the batch in two orders, ``_same_dtype_runs``) and PEFT's in fp64;
    asserts the parity rule on the output and on every grad, and the same set of trained parameters. Returns the
    hand-back warnings the fused run gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, g = _run(fused, x, train, **kwargs)
    same = _same_dtype_runs(reference, x, train, **kwargs)
    y64, g64 = _run(copy.deepcopy(reference).double(), x, train, **kwargs)
    assert_parity("output", y, [r[0] for r in same], y64)
    assert sorted(g) == sorted(same[0][1]), sorted(set(g) ^ set(same[0][1]))
    for k in g:
        assert_parity(f"grad {k}", g[k], [r[1][k] for r in same], g64[k])
    return _hand_backs(caught)


def _pair(kind, backend="torch", **config):
    base = _base(kind)
    pm = _peft(base, kind, **config)
    reference = copy.deepcopy(pm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fuse(pm, backend=backend) is pm
    return base, pm, reference, _hand_backs(caught)


# --------------------------------------------------------------------------------------------------------------
# LoraConfig options, one by one: served (no hand-back) or handed back naming the feature
# --------------------------------------------------------------------------------------------------------------
SERVED = {
    "r=1": dict(r=1),
    "r=3": dict(r=3),
    "r above min(in, out)": dict(r=24),
    "lora_alpha": dict(lora_alpha=3),
    "lora_dropout (eval)": dict(lora_dropout=0.1),
    "bias=all": dict(bias="all"),
    "bias=lora_only": dict(bias="lora_only"),
    "use_rslora": dict(use_rslora=True),
    "init gaussian": dict(init_lora_weights="gaussian"),
    "init pissa": dict(init_lora_weights="pissa"),
    "init orthogonal": dict(init_lora_weights="orthogonal"),
    "rank_pattern, alpha_pattern": dict(rank_pattern={"lin1": 2, "c_proj": 2, "v_proj": 2},
                                        alpha_pattern={"lin0": 5, "c_attn": 5, "q_proj": 5}),
    "use_dora": dict(use_dora=True),
    "lora_bias": dict(lora_bias=True),
}


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "llama"])
@pytest.mark.parametrize("option", list(SERVED))
def test_option_served_exactly(kind, option):
    _, pm, reference, at_fuse = _pair(kind, **SERVED[option])
    assert not at_fuse and fuse_report(pm).fused and not fuse_report(pm).handed_back
    x = MODELS[kind][2]()
    assert _fused_vs_peft(pm, reference, x) == []
    if option != "lora_dropout (eval)":
        assert _fused_vs_peft(pm, reference, x, train=True) == []


def test_lora_bias_trains_merges_and_saves_as_peft(tmp_path):
    """PEFT's lora_bias: lora_B's bias reaches y times the scaling, gets its grad, merges into the base bias."""
    _, pm, reference, _ = _pair("mlp", lora_bias=True, lora_alpha=6)
    lin1 = pm.base_model.model.lin1
    bias = torch.randn(20, device=DEVICE)
    with torch.no_grad():
        for m in (pm, reference):
            m.base_model.model.lin1.lora_B["default"].bias.copy_(bias)
    x = MODELS["mlp"][2]()
    _fused_vs_peft(pm, reference, x, train=True)
    assert lin1.lora_B["default"].bias.grad is not None and lin1.lora_B["default"].bias.grad.abs().sum() > 0
    for model in (pm, reference):
        model.merge_adapter()
    torch.testing.assert_close(lin1.base_layer.bias, reference.base_model.model.lin1.base_layer.bias)
    _fused_vs_peft(pm, reference, x)
    for model in (pm, reference):
        model.unmerge_adapter()
    pm.save_pretrained(tmp_path / "fused")
    reference.save_pretrained(tmp_path / "peft")
    _same_files(tmp_path / "fused", tmp_path / "peft")


def test_dropout_in_training_keeps_peft_semantics():
    """Training with dropout: the fused mask is the package's own (regenerated, never stored), so values differ from
    PEFT's draw; what is PEFT's: rows with every feature dropped give the base output, p and 1/(1-p) as PEFT's."""
    _, pm, reference, _ = _pair("mlp", lora_dropout=0.5, r=3)
    lin0 = pm.base_model.model.lin0
    x = torch.randn(4000, 10, device=DEVICE)
    lin0.train()
    with torch.no_grad():
        base = lin0.base_layer(x)
        full = (x @ lin0.lora_A["default"].weight.t()) @ lin0.lora_B["default"].weight.t() * lin0.scaling["default"]
        y = lin0(x)
    # each row's LoRA term is a sum over kept features: its mean over many rows is the undropped term (1/(1-p))
    torch.testing.assert_close((y - base).mean(0), full.mean(0), rtol=0.1, atol=0.05)
    assert not torch.allclose(y - base, full)  # it does drop


@pytest.mark.parametrize("option,config,reason", [
    ("aLoRA", dict(alora_invocation_tokens=[3, 4]), "ALoraLinearVariant"),
    ("MiCA", dict(init_lora_weights="mica"), "MiCALinearVariant"),
    ("target_parameters", dict(target_modules=[], target_parameters=["mlp.down_proj.weight"]),
     "target_parameters"),
])
def test_option_handed_back_with_one_warning(option, config, reason):
    _, pm, reference, at_fuse = _pair("llama", **config)
    assert len(at_fuse) == 1 and reason in at_fuse[0], at_fuse
    assert any(reason in why for why in fuse_report(pm).handed_back)
    x = MODELS["llama"][2]()
    assert _fused_vs_peft(pm, reference, x) == []  # warned once, at fuse()
    assert _fused_vs_peft(pm, reference, x, train=True) == []


@pytest.mark.parametrize("config", [dict(layers_to_transform=[1]), dict(layer_replication=[[0, 2], [1, 2]]),
                                    dict(trainable_token_indices=[1, 2]), dict(exclude_modules=["lm_head"]),
                                    dict(modules_to_save=["lm_head"], target_modules=["q_proj"])],
                         ids=["layers_to_transform", "layer_replication", "trainable_token_indices",
                              "exclude_modules", "modules_to_save"])
def test_model_level_options_served(config):
    _, pm, reference, at_fuse = _pair("llama", **config)
    assert not at_fuse
    x = MODELS["llama"][2]()
    assert _fused_vs_peft(pm, reference, x, train=True) == []


def test_other_layer_types_stay_with_peft_and_fuse_never_raises():
    """LoRA Embedding / Conv layers stay PEFT's (one warning naming them); a model with nothing to fuse comes back
    as it is, with a warning."""
    _, pm, reference, at_fuse = _pair("embed")
    report = fuse_report(pm)
    assert sorted(report.fused) == ["base_model.model.lin0", "base_model.model.lin1"]
    assert report.handed_back == {"PEFT's layer type lora.Embedding": ["base_model.model.emb"],
                                  "PEFT's layer type lora.Conv1d": ["base_model.model.conv"]}
    assert sorted(at_fuse) == sorted(f"lora_kernels.peft: PEFT's own forward serves {why} (1 layers: {names[0]})"
                                     for why, names in report.handed_back.items())
    assert _fused_vs_peft(pm, reference, MODELS["embed"][2](), train=True) == []
    only_embedding = _peft(_base("embed"), "embed", target_modules=["emb"])
    backends.reset_warnings()
    with pytest.warns(RuntimeWarning, match="Embedding"):
        assert fuse(only_embedding) is only_embedding
    with pytest.warns(UserWarning, match="no PEFT LoRA layer"):
        plain = MLP()
        assert fuse(plain) is plain
    assert "0 LoRA layers fused" in str(fuse_report(only_embedding))


def test_repr_reads_as_peft_layer():
    _, pm, reference, _ = _pair("llama")
    q, q_ref = (m.base_model.model.model.layers[0].self_attn.q_proj for m in (pm, reference))
    assert repr(q).startswith("lora.Linear(\n  fused=True, backend='torch'\n")
    assert repr(q).replace("  fused=True, backend='torch'\n", "") == repr(q_ref)


# --------------------------------------------------------------------------------------------------------------
# PEFT model operations
# --------------------------------------------------------------------------------------------------------------
def _same_files(a, b):
    from safetensors.torch import load_file

    ta, tb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _both(pm, reference, op):
    for m in (pm, reference):
        torch.manual_seed(5)  # adapters added with a random init draw the same values in both
        op(m)


def _second(m, r=6, **kw):
    m.add_adapter("second", peft.LoraConfig(target_modules=MODELS["llama"][1], r=r, lora_alpha=4,
                                            init_lora_weights=False, **kw))


OPERATIONS = {
    "merge_adapter": lambda m: m.merge_adapter(),
    "merge then unmerge": lambda m: (m.merge_adapter(), m.unmerge_adapter()),
    "set_adapter": lambda m: (_second(m), m.set_adapter("second")),
    "delete_adapter": lambda m: (_second(m), m.set_adapter("second"), m.delete_adapter("default")),
    "adapter on other targets": lambda m: (m.add_adapter("other", peft.LoraConfig(target_modules=["k_proj"], r=2,
                                                                                init_lora_weights=False)),
                                           m.set_adapter("other")),
    "two active adapters": lambda m: (_second(m), m.base_model.set_adapter(["default", "second"])),
    "cat (ranks summed past min(in, out))": lambda m: (_second(m, r=12), m.add_weighted_adapter(
        ["default", "second"], [0.7, 0.4], "cat", combination_type="cat"), m.set_adapter("cat")),
}
for _kind in ("linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
              "magnitude_prune", "magnitude_prune_svd"):
    OPERATIONS[f"add_weighted_adapter {_kind}"] = (lambda kind: lambda m: (
        _second(m, r=4), torch.manual_seed(7),
        m.add_weighted_adapter(["default", "second"], [0.6, 0.5], "w", combination_type=kind, density=0.5),
        m.set_adapter("w")))(_kind)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_operation_matches_peft(operation):
    _, pm, reference, _ = _pair("llama")
    _both(pm, reference, OPERATIONS[operation])
    if operation != "two active adapters":
        fuse(pm, backend="torch")  # adapters added after fuse() are PEFT's layers until fuse runs again
    x = MODELS["llama"][2]()
    warned = _fused_vs_peft(pm, reference, x, train=operation not in ("merge_adapter",))
    if operation == "two active adapters":
        assert warned == ["lora_kernels.peft: PEFT's own forward serves 2 active adapters at once"]
    else:
        assert warned == [], warned
    assert _fused_vs_peft(pm, reference, x) == []  # one warning per reason, not one per call


def test_disable_adapter_unload_and_merge_and_unload():
    _, pm, reference, _ = _pair("llama")
    x = MODELS["llama"][2]()
    with pm.disable_adapter(), reference.disable_adapter():
        assert _fused_vs_peft(pm, reference, x) == []
    torch.testing.assert_close(_out(pm, x), _out(reference, x))
    merged = copy.deepcopy(pm).merge_and_unload(safe_merge=True)
    torch.testing.assert_close(merged.state_dict(), copy.deepcopy(reference).merge_and_unload().state_dict())
    unloaded = copy.deepcopy(pm).unload()
    assert all(type(m) is not type(pm.base_model.model.lm_head) for m in unloaded.modules())
    torch.testing.assert_close(unloaded.state_dict(), copy.deepcopy(reference).unload().state_dict())


def test_save_and_load_both_ways(tmp_path):
    base, pm, reference, _ = _pair("llama", lora_bias=True, r=5)
    pm.save_pretrained(tmp_path / "fused")
    reference.save_pretrained(tmp_path / "peft")
    _same_files(tmp_path / "fused", tmp_path / "peft")
    loaded, expected = (peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
                        for _ in range(2))
    fuse(loaded, backend="torch")
    for m in (loaded, expected):
        m.load_adapter(tmp_path / "fused", adapter_name="again", is_trainable=True)
    fuse(loaded, backend="torch")
    x = MODELS["llama"][2]()
    assert _fused_vs_peft(loaded, expected, x, train=True) == []
    _both(loaded, expected, lambda m: m.set_adapter("again"))
    assert _fused_vs_peft(loaded, expected, x, train=True) == []


def test_mixed_batch_adapter_names():
    _, pm, reference, _ = _pair("llama")
    _both(pm, reference, lambda m: m.add_adapter("second", peft.LoraConfig(
        target_modules=["q_proj"], r=3, lora_alpha=6, init_lora_weights=False)))
    fuse(pm, backend="torch")
    x = torch.randint(0, 64, (3, 6), device=DEVICE)
    with torch.no_grad():
        assert _fused_vs_peft(pm, reference, x, adapter_names=["second", "__base__", "default"]) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    """A 16-bit model: PEFT keeps the adapters in fp32 and runs their product in fp32; the fused layer runs the whole
    layer in the model's dtype (fp32 grads for the fp32 parameters). The same-dtype reference of the parity rule is
    therefore PEFT's model wholly in that dtype; the outputs and the trained set follow PEFT's own run too."""
    base = _base("llama").to(dtype)
    pm = _peft(base, "llama", lora_bias=True)
    reference = copy.deepcopy(pm)
    assert reference.base_model.model.lm_head.lora_A["default"].weight.dtype == torch.float32
    fuse(pm, backend="torch")
    x = MODELS["llama"][2]()
    y, g = _run(pm, x, train=True)
    y_peft, g_peft = _run(reference, x, train=True)
    y16, g16 = _run(copy.deepcopy(reference).to(dtype), x, train=True)
    y64, g64 = _run(copy.deepcopy(reference).double(), x, train=True)
    assert y.dtype == y_peft.dtype == dtype
    assert_parity("logits", y, y_peft, y64)
    assert sorted(g) == sorted(g_peft) == sorted(g16)
    for k in g:
        assert g[k].dtype == g_peft[k].dtype
        assert_parity(f"grad {k}", g[k].to(dtype), g16[k], g64[k])


def test_autocast_and_gradient_checkpointing():
    _, pm, reference, _ = _pair("llama", lora_bias=True, lora_dropout=0.0)
    for m in (pm, reference):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = MODELS["llama"][2]()
    assert _fused_vs_peft(pm, reference, x, train=True) == []
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, g = _run(pm, x, train=True)
        same = _same_dtype_runs(reference, x, train=True)
    y64, g64 = _run(copy.deepcopy(reference).double(), x, train=True)
    assert_parity("logits", y, [r[0] for r in same], y64)
    for k in g:
        assert_parity(f"grad {k}", g[k].bfloat16(), [r[1][k].bfloat16() for r in same], g64[k])


# --------------------------------------------------------------------------------------------------------------
# Hooks and offloading
# --------------------------------------------------------------------------------------------------------------
def _count_fused(monkeypatch):
    import lora_kernels.peft as lk_peft

    calls = []
    real = lk_peft.adapter_forward
    monkeypatch.setattr(lk_peft, "adapter_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_forward_hooks_on_the_base_layer_run_as_in_peft(monkeypatch):
    """A hook on the base layer sees the base layer's own input and output: PEFT's forward serves that layer."""
    _, pm, reference, _ = _pair("llama")
    seen = {}
    for name, m in (("fused", pm), ("peft", reference)):
        q = m.base_model.model.model.layers[0].self_attn.q_proj
        q.base_layer.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, out.detach()))
    x = MODELS["llama"][2]()
    calls = _count_fused(monkeypatch)
    assert _fused_vs_peft(pm, reference, x) == ["lora_kernels.peft: PEFT's own forward serves forward hooks on the "
                                                "base layer"]
    torch.testing.assert_close(seen["fused"], seen["peft"], rtol=0, atol=0)
    assert calls  # the other layers stay fused
    assert "forward hooks on the base layer" in fuse_report(pm).handed_back


@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload"])
def test_accelerate_offloading_served_fused(offload, monkeypatch, tmp_path):
    """accelerate's offloading (what device_map offloading uses) keeps weights on the meta device until its hooks
    load them: the fused path enters the hooks itself and serves the layers fused, with PEFT's results."""
    accelerate = pytest.importorskip("accelerate")
    _, pm, reference, _ = _pair("llama", target_modules=["q_proj", "v_proj"])
    if offload == "cpu_offload":
        accelerate.cpu_offload(pm, execution_device=DEVICE)
    else:
        accelerate.disk_offload(pm, str(tmp_path), execution_device=DEVICE)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.device.type == "meta" and q.lora_A["default"].weight.device.type == "meta"
    calls = _count_fused(monkeypatch)
    x = MODELS["llama"][2]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _out(pm, x)
    assert not _hand_backs(caught) and len(calls) == 4
    with torch.no_grad():
        torch.testing.assert_close(y, _out(reference, x))
    assert q.base_layer.weight.device.type == "meta"  # released again after the forward


# --------------------------------------------------------------------------------------------------------------
# The kernels (Triton, interpreted on CPU) on a subset
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,config", [("mlp", dict(r=4)), ("mlp", dict(lora_bias=True, r=3)),
                                         ("gpt2", dict(lora_bias=True)), ("llama", dict(r=24))],
                         ids=["r above min", "lora_bias mlp", "lora_bias gpt2", "r=24 llama"])
def test_triton_kernels_serve_the_new_cases(kind, config, monkeypatch):
    _, pm, reference, _ = _pair(kind, backend="triton", **config)
    calls = _count_fused(monkeypatch)
    with CountOps():
        assert _fused_vs_peft(pm, reference, MODELS[kind][2](), train=True) == []
    assert calls


# --------------------------------------------------------------------------------------------------------------
# bitsandbytes bases (QLoRA)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(lora_bias=True), dict(r=80), dict(use_dora=True)],
                         ids=["lora_bias", "r above min", "DoRA (QDoRA, fused)"])
def test_quantized_bases(config):
    """PEFT's LoRA over Linear4bit after fuse(): lora_bias, ranks above min(in, out) and DoRA (QDoRA) served
    (training mode, bitsandbytes' exact CPU path, parity rule against PEFT in fp64 on the same quantized weights)."""
    pm = peft.get_peft_model(llama_4bit(compute_dtype=None, layers=1), peft.LoraConfig(**{**dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False), **config}))
    reference = copy.deepcopy(pm)
    fuse(pm, backend="torch")
    x = torch.randint(0, 64, (2, 5), device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, g = _run(pm, x, train=True)
    y32, g32 = _run(reference, x, train=True)
    # fp64: the quantized weights dequantized into an fp64 copy of each layer (bitsandbytes computes in fp32 at best)
    y64, g64 = _run_dequantized_fp64(reference, x)
    assert_parity("logits", y, y32, y64)
    assert sorted(g) == sorted(g32)
    for k in g:
        assert_parity(f"grad {k}", g[k], g32[k], g64[k])
    assert _hand_backs(caught) == []


def _run_dequantized_fp64(pm, x):
    from lora_kernels import quantized, reference

    model = copy.deepcopy(pm)
    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and quantized.is_quantized_linear(base):
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=DEVICE)
            with torch.no_grad():
                dense.weight.copy_(reference.dequantize(quantized.quantized_weight(base), torch.float32))
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            module.base_layer = dense
    return _run(model.double(), x, train=True)


def test_native_layers_refuse_lora_bias_files_by_name(tmp_path):
    """inject()'s layers hold no lora_B bias: a PEFT file trained with lora_bias is refused naming it (never loaded
    without its bias), and the same file serves through PEFT + fuse()."""
    from lora_kernels import inject, load_adapter

    base, pm, reference, _ = _pair("llama", lora_bias=True)
    pm.save_pretrained(tmp_path / "a")
    ours = inject(copy.deepcopy(base), MODELS["llama"][1], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="lora_bias=True"):
        load_adapter(ours, tmp_path / "a")
    served = fuse(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a"), backend="torch")
    x = MODELS["llama"][2]()
    with torch.no_grad():
        torch.testing.assert_close(_out(served.eval(), x), _out(reference.eval(), x))
