"""Mixed batches (several adapters over one base, one adapter per row) vs the per-adapter fp64 reference."""

import pytest
import torch

from conftest import DEVICE, DTYPES, assert_compiled_matches_eager, assert_parity, seed_tensor
from lora_kernels import FusedLoRALinear, lora_linear, lora_linear_mixed, reference, stack_adapters
from lora_kernels.kernels import forward as triton_forward

SEED = 4242


def _adapters(K, N, ranks, dtype):
    As = [torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5 for r in ranks]
    Bs = [torch.randn(N, r, device=DEVICE, dtype=dtype) / r**0.5 for r in ranks]
    return stack_adapters(As, Bs)


def _run(M, K, N, ranks, scalings, ps, ids, dtype, backend, bias=True, need_dx=True):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    a, bb, owner = _adapters(K, N, ranks, dtype)
    ids = torch.tensor(ids, device=DEVICE, dtype=torch.int64)
    xg, ag, bg = (t.clone().requires_grad_(req) for t, req in ((x, need_dx), (a, True), (bb, True)))
    y = lora_linear_mixed(xg, w, b, ag, bg, owner, ids, scalings, ps, backend=backend, seed=seed_tensor(SEED))
    gy = torch.randn_like(y)
    y.backward(gy)
    refs = []
    for dt in (dtype, torch.float64):
        args = [t.to(dt) if t is not None else None for t in (x, w, b, a, bb)]
        ry, xs = reference.lora_mixed_forward(*args, ids, owner, scalings, ps, SEED)
        refs.append((ry, *reference.lora_mixed_backward(gy.to(dt), args[0], args[1], args[3], args[4], xs, ids,
                                                        owner, scalings, ps, SEED, need_dx)))
    assert_parity("y", y, refs[0][0], refs[1][0])
    if need_dx:
        assert_parity("grad x", xg.grad, refs[0][1], refs[1][1])
    assert_parity("grad lora_A", ag.grad, refs[0][2], refs[1][2])
    assert_parity("grad lora_B", bg.grad, refs[0][3], refs[1][3])
    return ag.grad, bg.grad, owner, ids


def _ids(M, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n, (M,), generator=g).tolist()


@pytest.mark.parametrize("path", ["triton_gated", "triton_gated_cublas", "triton_gated@64", "triton_sorted",
                                  "triton_sorted@64"])
@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.3)], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_batch_parity(dtype, ps, path, monkeypatch):
    """Three adapters of ranks 3, 16 and 1 (one of them with no rows), rows of the base layer alone (-1); the
    gated xa kernel also with K split over programs (@64: as for decode-sized batches on a GPU)."""
    if path.endswith("@64"):
        monkeypatch.setattr(triton_forward, "XA_SPLIT_MIN_STEPS", 1)
    forward, _, splits = path.partition("@")
    if forward == "triton_sorted" and any(ps):  # rows in adapter order run without dropout
        forward = "triton_gated"
    ids = [i if i != 1 else 2 for i in _ids(37, 3)]  # adapter 1 gets no rows
    plan = f"{forward}+triton_split" + (f"@{splits}" if splits else "")
    da, db, owner, _ = _run(37, 45, 70, [3, 16, 1], [0.5, 2.0, 1.5], list(ps), ids, dtype, plan)
    assert not da[owner == 1].any() and not db[:, owner == 1].any()  # an adapter without rows gets no grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_odd_shapes_and_edge_batches(backend):
    dt = torch.bfloat16
    _run(1, 33, 17, [1, 4], [1.0, 3.0], [0.0, 0.2], [1], dt, backend)                 # M = 1
    _run(19, 80, 72, [5, 7], [1.0, 0.25], [0.2, 0.2], [0] * 19, dt, backend)         # all rows on one adapter
    _run(9, 40, 24, [2, 2], [1.0, 1.0], [0.0, 0.0], [-1] * 9, dt, backend)           # base layer only
    _run(0, 32, 16, [4], [1.0], [0.0], [], dt, backend)                               # no rows
    _run(23, 64, 48, [8, 3], [2.0, 1.0], [0.1, 0.0], _ids(23, 2, 1), dt, backend, bias=False, need_dx=False)


def test_one_adapter_equals_the_single_adapter_op():
    """All rows on adapter 0 with dropout: the same numbers (and dropout mask) as lora_linear with that adapter."""
    dt = torch.float16
    M, K, N = 29, 70, 52
    x = torch.randn(M, K, device=DEVICE, dtype=dt)
    w = torch.randn(N, K, device=DEVICE, dtype=dt) / K**0.5
    a, bb, owner = _adapters(K, N, [6, 5], dt)
    ids = torch.zeros(M, dtype=torch.int64, device=DEVICE)
    y_mixed = lora_linear_mixed(x, w, None, a, bb, owner, ids, [1.5, 9.0], [0.25, 0.0], backend="triton",
                                seed=seed_tensor(SEED))
    y_single = lora_linear(x, w, None, a[:6], bb[:, :6], 1.5, 0.25, backend="triton", seed=seed_tensor(SEED))
    y64, _ = reference.lora_forward(x.double(), w.double(), None, a[:6].double(), bb[:, :6].double(), 1.5, 0.25,
                                    SEED)
    assert_parity("y", y_mixed, y_single, y64)


def test_bad_mixed_inputs_raise_clear_errors():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    a, bb, owner = _adapters(8, 6, [2, 3], torch.float32)
    ids = torch.tensor([0, 1, -1, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"adapter_ids: values must be in \[-1, 2\).*found 2"):
        lora_linear_mixed(x, w, None, a, bb, owner, torch.tensor([0, 2, 0, 0], device=DEVICE), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"adapter_ids: expected shape \[4\]"):
        lora_linear_mixed(x, w, None, a, bb, owner, ids[:3], [1.0, 1.0])
    with pytest.raises(TypeError, match="adapter_ids: expected an int32 or int64 tensor"):
        lora_linear_mixed(x, w, None, a, bb, owner, ids.float(), [1.0, 1.0])
    with pytest.raises(ValueError, match="scalings, dropout_ps: expected one per adapter"):
        lora_linear_mixed(x, w, None, a, bb, owner, ids, [1.0, 1.0], [0.1])
    with pytest.raises(ValueError, match=r"dropout_ps\[1\]: expected a probability in \[0, 1\)"):
        lora_linear_mixed(x, w, None, a, bb, owner, ids, [1.0, 1.0], [0.1, 1.0])
    with pytest.raises(ValueError, match=r"rank_owner: expected shape \[5\]"):
        lora_linear_mixed(x, w, None, a, bb, owner[:4], ids, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"rank_owner: values must be adapter indices in \[0, 1\)"):
        lora_linear_mixed(x, w, None, a, bb, owner, torch.zeros_like(ids), [1.0])
    with pytest.raises(ValueError, match=r"lora_B: expected shape \[6, 5\]"):
        lora_linear_mixed(x, w, None, a, bb[:, :4], owner, ids, [1.0, 1.0])


def test_mixed_op_registration():
    """opcheck: schema, fake (meta) implementation and autograd registration of the mixed-batch op."""
    x = torch.randn(7, 16, device=DEVICE)
    w = torch.randn(12, 16, device=DEVICE)
    a, bb, owner = _adapters(16, 12, [2, 4], torch.float32)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1], device=DEVICE)
    torch.library.opcheck(torch.ops.lora_kernels.lora_mixed_fwd.default,
                          (x, w, None, a.requires_grad_(), bb.requires_grad_(), ids, owner, [1.0, 2.0], [0.0, 0.0],
                           None, True, "torch"))


# ------------------------------------------------------------------ named adapters on layers and models
def _layer_with_adapters(dtype=torch.float32, backend="triton"):
    from lora_kernels import FusedLoRALinear

    torch.manual_seed(0)
    layer = FusedLoRALinear(40, 36, r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                            backend=backend, device=DEVICE, dtype=dtype)
    layer.add_adapter("math", r=6, lora_alpha=3, lora_dropout=0.2, init_lora_weights=False)
    layer.add_adapter("code", r=1, lora_alpha=2, use_rslora=True, init_lora_weights=False)
    return layer


def test_named_adapters_and_task_switch():
    layer = _layer_with_adapters()
    assert layer.adapter_names == ["default", "math", "code"]
    x = torch.randn(5, 40, device=DEVICE)
    layer.eval()
    outs = {}
    for name in layer.adapter_names:
        layer.set_adapter(name)
        outs[name] = layer(x)
        A, B, hp = layer._adapter(name)
        same, _ = reference.lora_forward(x, layer.weight, layer.bias, A.detach(), B.detach(), hp["scaling"])
        ref64, _ = reference.lora_forward(*(t.detach().double() for t in (x, layer.weight, layer.bias, A, B)),
                                          hp["scaling"])
        assert_parity(f"y[{name}]", outs[name], same, ref64)
    assert layer._adapter("code")[2]["scaling"] == 2.0  # rsLoRA: alpha / sqrt(r)
    # a merged layer switches by taking one adapter out of W0 and putting the other in
    layer.set_adapter("math")
    layer.merge()
    layer.set_adapter("default")
    torch.testing.assert_close(layer(x), outs["default"], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x, adapter_ids=torch.zeros(5, dtype=torch.int64, device=DEVICE))
    layer.unmerge()
    with pytest.raises(ValueError, match="cannot be deleted"):
        layer.delete_adapter("default")
    layer.set_adapter("code")
    with pytest.raises(ValueError, match="is active"):
        layer.delete_adapter("code")
    layer.set_adapter("default")
    layer.delete_adapter("code")
    assert layer.adapter_names == ["default", "math"]
    with pytest.raises(KeyError, match="no such adapter"):
        layer.set_adapter("code")
    with pytest.raises(ValueError, match="name: expected a new identifier"):
        layer.add_adapter("math")


@pytest.mark.parametrize("training", [False, True])
def test_layer_mixed_batch_rows_follow_their_adapter(training):
    """Each row of a mixed batch equals that row through its own adapter; grads reach only the adapters used."""
    layer = _layer_with_adapters(torch.bfloat16)
    layer.train(training)
    x = torch.randn(3, 7, 40, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 2, -1, 0, 2, 2, 0], [2, 2, 2, 0, -1, -1, 0], [0] * 7], device=DEVICE)  # no "math" row
    seed = 99
    torch.manual_seed(seed)
    y = layer(x, adapter_ids=ids)
    y.float().square().sum().backward()
    assert layer.adapters["math"].lora_A.grad is None or not layer.adapters["math"].lora_A.grad.any()
    assert layer.lora_A.grad.any() and layer.adapters["code"].lora_B.grad.any()
    # the same through the functional op and the reference, with the seed the layer drew
    names = layer.adapter_names
    parts = [layer._adapter(n) for n in names]
    a, bb, owner = stack_adapters([p[0].detach() for p in parts], [p[1].detach() for p in parts])
    ps = [p[2]["lora_dropout"] if training else 0.0 for p in parts]
    torch.manual_seed(seed)
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE).item() if training else None
    args = (x.reshape(-1, 40), layer.weight, layer.bias, a, bb)  # the adapters in fp32 (the layer casts them)
    same, _ = reference.lora_mixed_forward(*(t.bfloat16() for t in args), ids.reshape(-1), owner,
                                           [p[2]["scaling"] for p in parts], ps, drawn)
    ref64, _ = reference.lora_mixed_forward(*(t.double() for t in args), ids.reshape(-1), owner,
                                            [p[2]["scaling"] for p in parts], ps, drawn)
    assert_parity("y", y.reshape(-1, 36).detach(), same, ref64)


def test_whole_model_serves_a_mixed_batch_with_the_context_manager():
    import lora_kernels

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).to(DEVICE)
    lora_kernels.inject(model, ["0", "2"], r=4, init_lora_weights=False, backend="triton")
    lora_kernels.add_adapter(model, "other", r=2, lora_alpha=4, init_lora_weights=False)
    lora_kernels.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.adapters.{a}.{k}" for m in ("0", "2") for a in ("default", "other")
                         for k in ("lora_A", "lora_B")}
    assert set(lora_kernels.lora_state_dict(model)) == {
        f"{m}.{k}" for m in ("0", "2") for k in ("lora_A", "lora_B", "adapters.other.lora_A", "adapters.other.lora_B")}
    model.eval()
    x = torch.randn(4, 5, 24, device=DEVICE)
    per_seq = torch.tensor([1, -1, 0, 1], device=DEVICE)  # one adapter per sequence
    with lora_kernels.adapter_ids(per_seq):
        y = model(x)
    for row, adapter in enumerate(per_seq.tolist()):
        if adapter == -1:
            with lora_kernels.adapter_ids(torch.full((1,), -1, device=DEVICE)):
                expected = model(x[row:row + 1])
            plain = torch.nn.Sequential(*(lora_kernels.lora_layers(model)[m].to_base_layer(merge=False)
                                          if m in ("0", "2") else model[int(m)] for m in ("0", "1", "2")))
            torch.testing.assert_close(expected, plain(x[row:row + 1]), rtol=1e-5, atol=1e-5)
        else:
            lora_kernels.set_adapter(model, ["default", "other"][adapter])
            expected = model(x[row:row + 1])
        torch.testing.assert_close(y[row:row + 1], expected, rtol=1e-5, atol=1e-5)
    lora_kernels.set_adapter(model, "default")
    with pytest.raises(ValueError, match="adapter_ids: expected shape"):
        with lora_kernels.adapter_ids(torch.zeros(3, dtype=torch.int64, device=DEVICE)):
            model(x)


def test_mixed_batch_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) through a layer serving a mixed batch, forward and backward."""
    layer = _layer_with_adapters(torch.float32, backend="torch")
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 1, 2, -1, 1, 0], device=DEVICE)
    layer.eval()
    compiled = torch.compile(lambda t: layer(t, adapter_ids=ids), fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, layer(x, adapter_ids=ids), rtol=1e-5, atol=1e-5)
    assert x.grad is not None and layer.adapters["math"].lora_B.grad.any()


def test_compile_mixed_layers_with_different_hyperparameters():
    """Compiled mixed batches on layers whose adapters' scalings and dropouts differ (symbolic floats on
    recompilation): no graph break, same results as eager."""
    for r, alpha, p in [(4, 8, 0.0), (2, 1, 0.1), (8, 3, 0.05)]:
        layer = FusedLoRALinear(16, 12, r=r, lora_alpha=alpha, lora_dropout=p, init_lora_weights=False,
                                device=DEVICE)
        layer.add_adapter("b", r=r + 1, lora_alpha=alpha * 2, lora_dropout=p / 2, init_lora_weights=False)
        ids = torch.tensor([0, 1, -1, 1], device=DEVICE)
        x = torch.randn(4, 16, device=DEVICE)
        eager = lambda x, ids: layer(x, adapter_ids=ids)  # noqa: E731
        compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
        assert_compiled_matches_eager(eager, compiled, [x, ids], [layer.lora_A, layer.adapters["b"].lora_B])


def test_sorted_variant_takes_rows_in_adapter_order(monkeypatch):
    """The sorted variant: the kernels get the rows' order and each adapter's first rank, and the result
    is the per-adapter reference's; 70 rows over 3 interpreter tiles, several adapters per tile, base-only rows,
    an adapter without rows, ranks 5, 2, 17."""
    seen = []
    real = triton_forward._launch_gemm
    monkeypatch.setattr(triton_forward, "_launch_gemm",
                        lambda *a, **k: seen.append(k.get("sorted_rows")) or real(*a, **k))
    ids = [i if i != 1 else -1 for i in _ids(70, 3, seed=5)]  # adapter 1: no rows
    _run(70, 40, 36, [5, 2, 17], [1.5, 0.5, 2.0], [0.0] * 3, ids, torch.bfloat16, "triton_sorted+triton_split")
    order, sorted_ids, starts = seen[0]
    assert starts.tolist() == [0, 5, 7, 24]
    assert torch.equal(sorted_ids[order.long()], torch.sort(torch.tensor(ids, dtype=torch.int32)).values)


def test_sorted_variant_refuses_a_shuffled_rank_owner_and_dropout():
    from lora_kernels import BackendUnavailableError
    from lora_kernels.kernels.forward import rank_starts

    with pytest.raises(ValueError, match="rank_owner: the sorted mixed-batch variant needs each adapter's ranks"):
        rank_starts(torch.tensor([0, 1, 0], dtype=torch.int32, device=DEVICE), 2)
    assert rank_starts(torch.tensor([0, 0, 2], dtype=torch.int32, device=DEVICE), 3).tolist() == [0, 2, 2, 3]
    x, a = torch.randn(4, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    xa = torch.empty(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="the sorted mixed-batch variant runs without dropout"):
        triton_forward.launch_xa(x, a, xa, None, None, 1.0, 0.0, gating=None, any_dropout=True,
                                  sort=(torch.arange(4, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)))
    w = torch.randn(6, 8, device=DEVICE)
    a, bb, owner = _adapters(8, 6, [2, 3], torch.float32)
    with pytest.raises(BackendUnavailableError, match="forward 'triton_sorted' cannot run this call: it runs without "
                                                      "dropout"):
        lora_linear_mixed(x, w, None, a, bb, owner, torch.tensor([0, 1, -1, 0], device=DEVICE), [1.0, 1.0],
                          [0.1, 0.0], backend="triton_sorted+triton_split")
