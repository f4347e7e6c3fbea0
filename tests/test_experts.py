"""LoRA on MoE experts: the experts op against the fp64 reference (every variant), its contract (bad input, saved
tensors, dropout, opcheck, torch.compile), and transformers' MoE models through PEFT (fuse) and natively (inject)."""

import copy
import tempfile
import warnings

import pytest
import torch

from conftest import DEVICE, assert_compiled_matches_eager, assert_parity, backends, reference, seed_tensor
from lora_kernels import experts as ex
from lora_kernels.experts import experts_linear, routing

TRITON = "triton_grouped+triton_grouped"


def _inputs(T, k, E, K, N, r, dtype, *, transposed=False, bias=True, empty=(), gather=True, seed=0):
    """Seeded experts inputs: tokens routed to k of E experts (experts in `empty` get none), B non-zero."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(DEVICE)  # noqa: E731
    x = rnd(T, K)
    w = rnd(E, K, N, scale=K ** -0.5) if transposed else rnd(E, N, K, scale=K ** -0.5)
    b = rnd(E, N) if bias else None
    a, bb = rnd(E, r, K, scale=K ** -0.5), rnd(E, N, r, scale=max(r, 1) ** -0.5)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = allowed[torch.stack([torch.randperm(len(allowed), generator=g)[:k] for _ in range(T)])].to(DEVICE)
    perm, offsets = routing(idx, E)
    if not gather:  # x already in slot order
        x = x[perm // k].contiguous()
    return x, w, b, a, bb, offsets, (perm // k if gather else None)


def _run(inputs, dtype, backend, p=0.0, transposed=False, scaling=0.7, seed=77):
    x, w, b, a, bb, offsets, gather = (t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs)
    x, a, bb = (t.clone().requires_grad_() for t in (x, a, bb))
    y = experts_linear(x, w, b, a, bb, offsets, scaling, p, gather=gather, transposed=transposed, backend=backend,
                       seed=seed_tensor(seed))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(y.device)
    return (y, *torch.autograd.grad(y, (x, a, bb), gy))


def _check(inputs, dtype, backend, **kw):
    ref64 = _run(inputs, torch.float64, "torch", **kw)
    same = _run(inputs, dtype, "torch", **kw)
    out = _run(inputs, dtype, backend, **kw)
    for name, o, s, r in zip(("y", "dx", "dA", "dB"), out, same, ref64):
        assert_parity(f"{backend} {name}", o, s, r)


SHAPES = [  # (T, k, E, K, N, r, empty experts)
    (37, 2, 5, 45, 70, 3, (4,)),
    (1, 1, 1, 33, 20, 1, ()),
    (16, 3, 3, 64, 48, 16, ()),
    (23, 2, 6, 40, 72, 5, (0, 3)),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_aten_matches_reference(shape, transposed, p):
    T, k, E, K, N, r, empty = shape
    inputs = _inputs(T, k, E, K, N, r, torch.float32, transposed=transposed, empty=empty)
    _check(inputs, torch.float32, "aten", p=p, transposed=transposed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,transposed,p,bias,gather", [
    (SHAPES[0], False, 0.0, True, True),
    (SHAPES[0], True, 0.25, True, True),
    (SHAPES[1], False, 0.1, False, True),
    (SHAPES[3], True, 0.0, False, False),
])
def test_triton_matches_reference(dtype, shape, transposed, p, bias, gather):
    T, k, E, K, N, r, empty = shape
    inputs = _inputs(T, k, E, K, N, r, dtype, transposed=transposed, empty=empty, bias=bias, gather=gather)
    _check(inputs, dtype, TRITON, p=p, transposed=transposed)


def test_aten_bf16_grouped_mm_matches_reference():
    """Shapes torch._grouped_mm takes (16-byte rows): the aten variant's grouped path, not its per-expert loop."""
    inputs = _inputs(40, 2, 4, 64, 96, 8, torch.bfloat16)
    from lora_kernels import grouped

    assert grouped._grouped_mm_takes(inputs[0], inputs[1].transpose(1, 2))
    _check(inputs, torch.bfloat16, "aten")


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "auto"), (torch.bfloat16, TRITON)])
def test_rank_zero_is_the_frozen_grouped_projection(dtype, backend):
    """r = 0 (a projection without an adapter in the experts block): the frozen grouped product, x's grad through
    W0 alone, empty factor grads."""
    inputs = _inputs(19, 2, 4, 32, 30, 2, dtype)
    x, w, b, _, _, offsets, gather = inputs
    E, N, K = w.shape
    empty = (w.new_zeros(E, 0, K), w.new_zeros(E, N, 0))
    out = _run((x, w, b, *empty, offsets, gather), dtype, backend)
    ref64 = _run((x, w, b, *empty, offsets, gather), torch.float64, "torch")
    same = _run((x, w, b, *empty, offsets, gather), dtype, "torch")
    for name, o, s, r in zip(("y", "dx", "dA", "dB"), out, same, ref64):
        assert_parity(name, o, s, r)
    assert out[2].shape == (E, 0, K) and out[3].shape == (E, N, 0)


def test_dropout_mask_per_slot_and_backward_reproduces_it():
    """The mask is drawn per slot row from the seed (keep rate 1 - p), every variant draws the same one, and the
    backward's dA uses the forward's mask (a different seed gives a different dA)."""
    p = 0.4
    x, w, _, a, bb, offsets, gather = _inputs(200, 2, 4, 64, 16, 4, torch.float64)
    keep = reference.dropout_keep_mask(77, gather.shape[0], 64, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    outs = {be: _run((x, w, None, a, bb, offsets, gather), torch.float64, be, p=p) for be in ("torch", "aten")}
    for got, want in zip(outs["aten"], outs["torch"]):
        torch.testing.assert_close(got, want)
    other = _run((x, w, None, a, bb, offsets, gather), torch.float64, "torch", p=p, seed=78)
    assert (other[2] - outs["torch"][2]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["torch", "aten"])
def test_nothing_expert_sized_is_saved(backend):
    """Saved for the backward: x, the gather, offsets, the seed, xa [S, r] (and W0 by reference): nothing [E, N, K]
    or [S, N] of the op's own."""
    x, w, b, a, bb, offsets, gather = _inputs(64, 2, 8, 96, 80, 4, torch.float32)
    a.requires_grad_()
    bb.requires_grad_()
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, b, a, bb, offsets, gather)}
    own = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            own.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts_linear(x, w, b, a, bb, offsets, 0.5, 0.1, gather=gather, backend=backend, seed=seed_tensor(3))
    S = gather.shape[0]  # every tensor of the op's own is at most [S, r] (xa): nothing [S, N] or [E, N, K]
    assert own and all(s[0] * (s[1] if len(s) > 1 else 1) <= S * 4 for s in own), own


@pytest.mark.parametrize("bad,match", [
    (dict(offsets="unsorted"), "offsets: expected each expert's end"),
    (dict(offsets="short"), "offsets: the last expert must end"),
    (dict(offsets="int16"), "offsets: expected an int32 or int64"),
    (dict(gather="range"), "gather: token indices"),
    (dict(lora_A="shape"), "lora_A: expected shape"),
    (dict(lora_B="shape"), r"lora_B: expected shape \[3, 20, 2\]"),
    (dict(bias="shape"), r"bias: expected shape \[3, 20\]"),
    (dict(weight="2d"), "weight: expected a 3-D tensor"),
    (dict(x="k"), "x: last dimension must be in_features = 12"),
    (dict(weight="dtype"), "weight: dtype"),
    (dict(lora_A="device"), "lora_A: on device meta"),
    (dict(weight="trained"), "the experts' base parameters must be frozen"),
])
def test_bad_input_raises_before_any_kernel(bad, match, monkeypatch):
    x, w, b, a, bb, offsets, gather = _inputs(9, 2, 3, 12, 20, 2, torch.float32)
    launched = []
    for table in (backends.EXPERTS_FORWARD, backends.EXPERTS_BACKWARD):
        for name in list(table):
            monkeypatch.setitem(table, name, lambda *args, **kw: launched.append(1))
    (key, how), = bad.items()
    if key == "offsets":
        offsets = {"unsorted": offsets.flip(0), "short": offsets - 1, "int16": offsets.to(torch.int16)}[how]
    elif key == "gather":
        gather = gather + 100
    elif key == "lora_A":
        a = a[:, :, :5] if how == "shape" else a.to("meta")
    elif key == "lora_B":
        bb = bb[:, :4]
    elif key == "bias":
        b = b[:, :3]
    elif key == "weight":
        w = {"2d": w[0], "dtype": w.double(), "trained": w.clone().requires_grad_()}[how]
    elif key == "x":
        x = x[:, :5]
    with pytest.raises((ValueError, TypeError), match=match):
        experts_linear(x, w, b, a, bb, offsets, 0.5, gather=gather, backend="torch")
    assert not launched


@pytest.mark.parametrize("backend", ["torch", "aten"])
def test_opcheck(backend):
    x, w, b, a, bb, offsets, gather = _inputs(11, 2, 3, 16, 24, 2, torch.float32)
    seed = seed_tensor(9)
    torch.library.opcheck(torch.ops.lora_kernels.experts_linear_fwd.default,
                          (x.clone().requires_grad_(), w, b, a.clone().requires_grad_(), bb.clone().requires_grad_(),
                           offsets, gather, seed, 0.5, 0.2, False, 2, backend))
    y, xa = torch.ops.lora_kernels.experts_linear_fwd(x, w, b, a, bb, offsets, gather, seed, 0.5, 0.2, False, 2,
                                                      backend)
    torch.library.opcheck(torch.ops.lora_kernels.experts_linear_bwd.default,
                          (torch.randn_like(y), x, w, a, bb, xa, offsets, gather, seed, 0.5, 0.2, False, True, False,
                           backend))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p):
    x, w, b, a, bb, offsets, gather = _inputs(13, 2, 4, 16, 24, 3, torch.float32)
    a, bb = a.requires_grad_(), bb.requires_grad_()

    def fn(x):
        return experts_linear(x, w, b, a, bb, offsets, 0.5, p, gather=gather, backend="aten")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(fn, compiled, [x], [a, bb])


# ------------------------------------------------------------------------------------------------------------
# transformers' MoE models: PEFT's target_parameters fused, and inject
# ------------------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _tiny(kind, dtype=torch.float64, implementation="eager"):
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=48, intermediate_size=64, moe_intermediate_size=40,
                                          num_experts=6, num_experts_per_tok=2, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                          decoder_sparse_step=1, mlp_only_layers=[])
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_local_experts=4,
                                        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=12, layer_types=["full_attention"] * 2)
        model = transformers.GptOssForCausalLM(cfg)
        with torch.no_grad():  # gpt-oss initialises its expert biases to zero: make them count
            for name, prm in model.named_parameters():
                if "experts" in name and name.endswith("_bias"):
                    prm.normal_(std=0.1)
    model.config._experts_implementation = implementation  # grouped_mm has no fp64 kernel
    return model.to(dtype).to(DEVICE)


def _step(model, ids):
    model.train()
    logits = model(ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("targets", [TARGETS, TARGETS[:1], TARGETS[1:]])
def test_fuse_serves_peft_experts_exactly(kind, targets):
    """fuse() on PEFT's ParamWrappers (nested when both projections are targeted): PEFT's logits and every LoRA grad
    in fp64, no warning, the experts op doing the work."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=targets,
                             init_lora_weights=False)
    model = peft.get_peft_model(_tiny(kind), config)
    fused = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lora_kernels.peft import fuse, fuse_report

        fuse(fused)
    assert not fuse_report(fused).handed_back
    assert "lora.ParamWrapper" in repr(fused)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    calls = []
    real = ex.experts_linear
    ex.experts_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        (y, grads), (y_ref, grads_ref) = _step(fused, ids), _step(model, ids)
    finally:
        ex.experts_linear = real
    assert len(calls) == 4  # two layers, two projections each (an untargeted one runs frozen)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_ref.keys() and any("experts" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_fuse_bf16_experts_within_parity():
    """A bf16 model with transformers' default grouped_mm experts: PEFT's bf16 output and the fused one, both against
    PEFT's fp64 (parity rule)."""
    config = peft.LoraConfig(r=8, lora_alpha=16, target_parameters=TARGETS, init_lora_weights=False)
    model64 = peft.get_peft_model(_tiny("qwen3_moe"), config)
    model16 = copy.deepcopy(model64).to(torch.bfloat16)
    model16.base_model.model.config._experts_implementation = "grouped_mm"
    fused = copy.deepcopy(model16)
    from lora_kernels.peft import fuse

    fuse(fused)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    y64, g64 = _step(model64, ids)
    y16, g16 = _step(model16, ids)
    yf, gf = _step(fused, ids)
    assert_parity("logits", yf, y16, y64)
    for n in g64:
        if "experts" in n:
            assert_parity(n, gf[n].float(), g16[n].float(), g64[n])


def test_fuse_hands_back_what_it_cannot_serve():
    """Disabled adapters and merged weights are PEFT's (silently); two active adapters go to PEFT's forward with one
    warning; the outputs are PEFT's in every case."""
    config = peft.LoraConfig(r=4, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(_tiny("qwen3_moe"), config)
    fused = copy.deepcopy(model)
    from lora_kernels.peft import fuse

    fuse(fused)
    ids = torch.randint(0, 64, (1, 7), device=DEVICE)
    with torch.no_grad():
        with model.disable_adapter(), fused.disable_adapter():
            torch.testing.assert_close(fused(ids).logits, model(ids).logits)
        for m in (model, fused):
            m.merge_adapter()
        torch.testing.assert_close(fused(ids).logits, model(ids).logits)
        for m in (model, fused):
            m.unmerge_adapter()
    for m in (model, fused):
        m.add_adapter("other", peft.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS,
                                               init_lora_weights=False))
        m.base_model.set_adapter(["default", "other"])
    fused.load_state_dict(model.state_dict())  # the same random "other" adapter in both
    backends.reset_warnings()
    with pytest.warns(RuntimeWarning, match="2 active adapters at once"), torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_inject_saves_files_peft_loads_and_reads_peft_files(kind):
    """inject(target_parameters=...) then save_adapter: PEFT loads the files and computes the same logits; PEFT's
    save_pretrained of them is byte-equal and load_adapter reads it back."""
    import lora_kernels as lk
    from safetensors.torch import load_file

    base = _tiny(kind)
    for prm in base.parameters():
        prm.requires_grad_(False)
    ours = lk.inject(copy.deepcopy(base), ["q_proj"], r=4, lora_alpha=8, target_parameters=TARGETS,
                     init_lora_weights=False)
    assert len(lk.experts_layers(ours)) == 2
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as d2:
        lk.save_adapter(ours, d)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), d)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-12, atol=1e-12)
        theirs.save_pretrained(d2)
        a, b = load_file(f"{d}/adapter_model.safetensors"), load_file(f"{d2}/adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        back = lk.inject(copy.deepcopy(base), ["q_proj"], r=4, lora_alpha=8, target_parameters=TARGETS)
        lk.load_adapter(back, d2)
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_inject_trains_like_peft():
    """A few AdamW steps on the experts' adapters (fp64): the same losses as PEFT's model from the same start."""
    import lora_kernels as lk

    base = _tiny("qwen3_moe")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = lk.inject(copy.deepcopy(base), target_parameters=TARGETS, r=4, lora_alpha=8)
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        lk.load_adapter(ours, d)
    lk.mark_only_lora_as_trainable(ours)
    from conftest import lm_losses

    ids = torch.randint(0, 64, (2, 11), device=DEVICE)
    ours_losses, theirs_losses = lm_losses(ours, ids, 4), lm_losses(theirs, ids, 4)
    assert ours_losses[-1] < ours_losses[0]
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-9, atol=1e-12)


def test_inject_dropout_on_experts():
    """Beyond PEFT: dropout on the experts' adapters in training (a fresh mask per step from torch's seed), none in
    eval; eval equals the merged model."""
    import lora_kernels as lk

    model = lk.inject(_tiny("qwen3_moe"), target_parameters=TARGETS, r=4, lora_dropout=0.5, init_lora_weights=False)
    ids = torch.randint(0, 64, (1, 7), device=DEVICE)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        first = model(ids).logits
        torch.manual_seed(1)
        again = model(ids).logits
        torch.manual_seed(2)
        other = model(ids).logits
        model.eval()
        plain = model(ids).logits
        merged = lk.unload(copy.deepcopy(model))(ids).logits
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-6 and (first - plain).abs().max() > 1e-6
    torch.testing.assert_close(plain, merged, rtol=1e-10, atol=1e-12)


EXPERTS_CLASSES = [  # (module, config class, experts class, config kwargs)
    ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeExperts", dict(moe_intermediate_size=40, num_experts=6)),
    ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeExperts", dict(moe_intermediate_size=40, num_experts=6)),
    ("mixtral", "MixtralConfig", "MixtralExperts", dict(intermediate_size=40, num_local_experts=5)),
    ("olmoe", "OlmoeConfig", "OlmoeExperts", dict(intermediate_size=40, num_experts=5)),
    ("deepseek_v3", "DeepseekV3Config", "DeepseekV3Experts", dict(moe_intermediate_size=40, n_routed_experts=6)),
    ("gpt_oss", "GptOssConfig", "GptOssExperts", dict(intermediate_size=40, num_local_experts=4)),
]


@pytest.mark.parametrize("module,config_cls,experts_cls,kwargs", EXPERTS_CLASSES, ids=[c[0] for c in EXPERTS_CLASSES])
def test_experts_block_is_each_models_experts_with_the_merged_update(module, config_cls, experts_cls, kwargs):
    """For every transformers experts class the block serves: experts_block with an adapter per projection equals the
    module's own (eager) forward over W0 + s B_e A_e, in fp64."""
    import importlib

    config = getattr(transformers, config_cls)(hidden_size=48, num_experts_per_tok=2, **kwargs)
    config._experts_implementation = "eager"
    lib = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    experts = getattr(lib, experts_cls)(config).double().to(DEVICE)
    assert ex.is_experts_module(experts) is None
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for prm in experts.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=prm.dtype) * 0.2)
    E, k, T = experts.num_experts, 2, 13
    hidden = torch.randn(T, 48, generator=g, dtype=torch.float64).to(DEVICE)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64).to(DEVICE)
    adapters = {}
    merged = copy.deepcopy(experts)
    for name in ex.projections(experts):
        p = getattr(experts, name)
        K, N = (p.shape[1], p.shape[2]) if experts.is_transposed else (p.shape[2], p.shape[1])
        a = torch.randn(E, 3, K, generator=g, dtype=torch.float64).to(DEVICE) * 0.3
        b = torch.randn(E, N, 3, generator=g, dtype=torch.float64).to(DEVICE) * 0.3
        adapters[name] = ex.ExpertAdapter(a, b, 0.5)
        delta = torch.bmm(b, a) * 0.5
        with torch.no_grad():
            getattr(merged, name).add_(delta.transpose(1, 2) if experts.is_transposed else delta)
    with torch.no_grad():
        got = ex.experts_block(experts, hidden, index, weights, adapters)
        want = merged(hidden, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tune_keys_experts_layers_as_their_calls_are_keyed():
    """python -m lora_kernels.tune reads a LoRAExperts' projections as experts<E> kinds, keyed as the op keys them."""
    import lora_kernels as lk
    from lora_kernels import tune

    model = lk.inject(_tiny("qwen3_moe"), target_parameters=TARGETS, r=4)
    shapes = tune.model_shapes(model)
    assert sorted(shapes) == [(40, 48, 4, 0.0, "experts6"), (48, 80, 4, 0.0, "experts6")]
    calls = tune.keys(shapes, [64], torch.bfloat16, DEVICE, ["train"])
    assert {c.experts for c in calls} == {6} and {tune.kind_of(c) for c in calls} == {"experts6"}


def test_fused_experts_take_an_input_of_another_dtype_as_transformers_does():
    """A bf16 model fed fp32 hidden states outside autocast: transformers' grouped_mm experts cast the input to the
    experts' dtype; the fused block does the same (no raise where PEFT runs) and returns the input's dtype."""
    config = peft.LoraConfig(r=4, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(_tiny("qwen3_moe", torch.bfloat16, "grouped_mm"), config)
    fused = copy.deepcopy(model)
    from lora_kernels.peft import fuse

    fuse(fused)
    wrapper = model.base_model.model.model.layers[0].mlp.experts
    fused_wrapper = fused.base_model.model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(7, 48, generator=g).to(DEVICE)
    index = torch.randint(0, 6, (7, 2), generator=g).to(DEVICE)
    weights = torch.rand(7, 2, generator=g).to(DEVICE)
    model64 = copy.deepcopy(model).double()
    model64.base_model.model.config._experts_implementation = "eager"
    wrapper64 = model64.base_model.model.model.layers[0].mlp.experts
    with torch.no_grad():
        want, got = wrapper(hidden, index, weights), fused_wrapper(hidden, index, weights)
        want64 = wrapper64(hidden.double(), index, weights.double())
    assert got.dtype == want.dtype == torch.float32
    assert_parity("experts output", got, want, want64)


def test_experts_block_compiles_fullgraph_with_dropout():
    """A LoRAExperts (routing, both projections, the gate, dropout) under torch.compile(fullgraph=True): the eager
    outputs and grads for the same seed."""
    import lora_kernels as lk

    model = lk.inject(_tiny("qwen3_moe", torch.float32), target_parameters=TARGETS, r=4, lora_dropout=0.1,
                      init_lora_weights=False)
    layer = lk.experts_layers(model)["model.layers.0.mlp.experts"]
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 6, (9, 2), generator=g).to(DEVICE)
    weights = torch.rand(9, 2, generator=g).to(DEVICE)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert_compiled_matches_eager(lambda x: layer(x, index, weights),
                                  torch.compile(lambda x: layer(x, index, weights), fullgraph=True,
                                                backend="aot_eager"),
                                  [torch.randn(9, 48, generator=g).to(DEVICE)], params)
