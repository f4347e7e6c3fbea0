"""The bugs that lived in the seams between the kinds of call, the planner and the caches: each test failed before
the one entry path (lora_kernels.entry) and the planner's fixes."""

import gc
import json
import os
import threading
import warnings
import weakref

import pytest
import torch
from torch import nn

from conftest import DEVICE, make_inputs
import lora_kernels
from lora_kernels import FusedLoRALinear, backends, plan
from lora_kernels.plan import Call


@pytest.fixture
def fresh_plans(tmp_path, monkeypatch):
    """A planner with its own cache directory and measuring on (CPU calls are measured through plan.tune)."""
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_KERNELS_TUNE", "on")
    plan.reset()
    yield tmp_path
    monkeypatch.undo()
    plan.reset()


# 1. QLoRA's caches keep nothing of a deleted layer -------------------------------------------------------------
def test_deleted_quantized_layers_free_their_storage():
    bnb = pytest.importorskip("bitsandbytes")
    from lora_kernels import quantized

    alive = []
    for seed in range(3):
        torch.manual_seed(seed)
        base = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True)
        base.load_state_dict(nn.Linear(128, 64).state_dict())
        layer = FusedLoRALinear.from_linear(base.to(DEVICE), r=4, backend="torch")
        layer(torch.randn(3, 128, device=DEVICE)).sum().backward()  # reads and checks the quantized weight
        alive.append(weakref.ref(quantized.quantized_weight(layer.base_layer).data))
        del layer, base
    gc.collect()
    assert [r() is None for r in alive] == [True, True, True]


# 2. mixed-batch adapter ids are per thread ---------------------------------------------------------------------
def test_adapter_ids_blocks_of_two_threads_do_not_mix():
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 12, r=2, init_lora_weights=False, backend="torch").to(DEVICE)
    layer.add_adapter("other", r=3, init_lora_weights=False)
    x = torch.randn(4, 16, device=DEVICE)
    want = {}
    with torch.no_grad():
        for i in (0, 1):
            ids = torch.full((4,), i, device=DEVICE)
            want[i] = layer(x, adapter_ids=ids)
    wrong, barrier = [], threading.Barrier(2)

    def serve(i):
        ids = torch.full((4,), i, device=DEVICE)
        barrier.wait()
        for _ in range(200):
            with torch.no_grad(), lora_kernels.adapter_ids(ids):
                if not torch.equal(layer(x), want[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_adapter_ids_under_torch_compile():
    """Compiled code reads the one thread's block; blocks of several threads at once are refused there by name."""
    torch._dynamo.reset()  # other tests compiled the same forward: count this test's compilations alone
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 12, r=2, init_lora_weights=False, backend="torch").to(DEVICE).eval()
    layer.add_adapter("other", r=3, init_lora_weights=False)
    x = torch.randn(4, 16, device=DEVICE)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        for i in (0, 1):
            ids = torch.full((4,), i, device=DEVICE)
            with lora_kernels.adapter_ids(ids):
                torch.testing.assert_close(compiled(x), layer(x, adapter_ids=ids))
        other_thread_inside = threading.Event()
        release = threading.Event()

        def hold():
            with lora_kernels.adapter_ids(torch.zeros(4, dtype=torch.int64, device=DEVICE)):
                other_thread_inside.set()
                release.wait()

        t = threading.Thread(target=hold)
        t.start()
        other_thread_inside.wait()
        try:
            with lora_kernels.adapter_ids(torch.ones(4, dtype=torch.int64, device=DEVICE)):
                with pytest.raises(Exception, match="several threads"):
                    compiled(x)
        finally:
            release.set()
            t.join()


# 3. cached plans are checked against what can run now ----------------------------------------------------------
def test_cached_plan_that_cannot_run_here_is_chosen_again(fresh_plans):
    call = Call(DEVICE, torch.float32, 8, 32, 24, 4, False, 2, False)
    path = plan.cache_path(DEVICE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:  # written by a process where the CUDA C++ extension was there
        json.dump({"format": 1, "context": plan.context(DEVICE),
                   "entries": {plan.entry_key("auto", call): {"plan": "cuda_decode+cuda", "us": {}}}}, f)
    plan.reset()
    with pytest.warns(RuntimeWarning, match="cannot run here now"):
        chosen = plan.choose(call, "auto")
    assert plan.plan_unfit(chosen, call) is None and not chosen.forward.startswith("cuda")


def test_context_is_read_again_after_a_build(fresh_plans, monkeypatch):
    from lora_kernels import cuda_ext

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(cuda_ext, "built", lambda: False)
    before = plan.cache_path(cuda)
    monkeypatch.setattr(cuda_ext, "built", lambda: True)
    assert plan.context(cuda)["cuda_ext"] == "built" and plan.cache_path(cuda) != before


# 4. a candidate's failure is never written to the cache --------------------------------------------------------
@pytest.mark.parametrize("error,persisted", [(RuntimeError("CUDA error: an illegal memory access"), False),
                                             (torch.cuda.OutOfMemoryError("out of memory"), False),
                                             (RuntimeError("out of resources: shared memory"), True)])
def test_transient_failure_leaves_the_key_unmeasured_on_disk(fresh_plans, error, persisted):
    """Out of memory or a CUDA error says nothing about the candidate: the key is not written (another process times
    it); a compile or resource limit is the candidate's own: the others' winner is kept, the error recorded."""
    call = Call(DEVICE, torch.bfloat16, 16, 32, 24, 4, False, 2, False)

    def timer(label, fn):
        if label == "forward:aten":
            raise error
        return {"forward:torch": 2.0}.get(label, 1.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen, us = plan.tune(call, "auto", timer=timer)
    assert isinstance(us["forward:aten"], str) and chosen.forward != "aten"
    assert any("nothing is written to the cache" in str(w.message) for w in caught) != persisted
    path = plan.cache_path(DEVICE)
    entries = json.load(open(path))["entries"] if os.path.exists(path) else {}
    assert (plan.entry_key("auto", call) in entries) == persisted


# 5. one key for eager and compiled calls; DoRA's key; tune covers every kind -----------------------------------
def test_eager_and_compiled_calls_look_up_the_same_key(monkeypatch):
    seen = []
    real = plan.choose
    monkeypatch.setattr(plan, "choose", lambda call, *a, **k: seen.append(call) or real(call, *a, **k))
    x, w, b, a, bb = make_inputs(6, 16, 12, 2, torch.float32)
    a.requires_grad_(True)  # the adapters need grads, x does not: grads = 1

    def f(x, a):
        return lora_kernels.lora_linear(x, w, b, a, bb, 2.0, backend="torch")

    f(x, a).sum().backward()
    torch.compile(f, backend="aot_eager", fullgraph=True)(x, a).sum().backward()
    forward_keys = {plan.memo_key("torch", c) for c in seen if c.M == 6}
    assert {c.grads for c in seen} == {1} and len(forward_keys) == 1, seen


def test_dora_key_says_what_its_forward_runs():
    dora = Call(DEVICE, torch.bfloat16, 64, 64, 64, 8, True, 2, False, dora=True)
    lora = dora._replace(dora=False)
    assert plan.forward_unfit("triton_fused", dora) is None  # DoRA's forward runs without dropout
    assert plan.forward_unfit("triton_fused", lora) is not None
    assert plan.memo_key("auto", dora) != plan.memo_key("auto", lora)
    assert plan.entry_key("auto", dora) != plan.entry_key("auto", lora)


def test_tune_keys_cover_every_kind():
    from lora_kernels import tune

    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
    lora_kernels.inject(model, ["0"], r=2)
    lora_kernels.inject(model, ["1"], r=3, use_dora=True)
    model[0].add_adapter("other", r=4)
    shapes = tune.model_shapes(model)
    assert sorted(s[-1] for s in shapes) == ["dora", "lora", "lora", "mixed2"]
    calls = tune.keys(shapes + [(64, 64, 8, 0.0, "nf4_dq"), (64, 64, 8, 0.0, "dora_fp4")], [16], torch.bfloat16,
                      DEVICE, ["train"])
    assert {(c.dora, c.quant, c.adapters) for c in calls} == {(False, "", 0), (True, "", 0), (False, "", 2),
                                                              (False, "nf4_dq", 0), (True, "fp4", 0)}
    assert next(c for c in calls if c.adapters).r == 6  # the stacked rank
    assert sorted(map(tune.kind_of, calls)) == ["dora", "dora_fp4", "lora", "lora", "mixed2", "nf4_dq"]
    with pytest.raises(ValueError, match="kind: expected one of"):
        tune.keys([(64, 64, 8, 0.0, "dora_nf5")], [16], torch.bfloat16, DEVICE, ["train"])


# 6. one measurement per new key, whatever the threads ----------------------------------------------------------
def test_two_threads_measure_a_new_key_once(fresh_plans, monkeypatch):
    call = Call(DEVICE, torch.bfloat16, 16, 32, 24, 4, False, 0, False)
    timed, barrier = [], threading.Barrier(2)

    def timer(label, fn):
        timed.append(label)
        return 1.0

    monkeypatch.setattr(plan.lookup, "why_not_measure", lambda call: None)  # measure on CPU as on a GPU
    monkeypatch.setattr(plan.measure, "cuda_event_timer", timer)
    monkeypatch.setattr(plan.measure, "run_forward", lambda *a, **k: None)
    plans = []

    def lookup():
        barrier.wait()
        plans.append(plan.choose(call, "auto"))

    threads = [threading.Thread(target=lookup) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(plans) == 2 and plans[0] == plans[1]
    assert len(timed) == len(set(timed)), timed  # each candidate timed once


# 7. a forced torch / aten backend never launches Triton --------------------------------------------------------
@pytest.fixture
def no_triton(monkeypatch):
    """Every auxiliary Triton kernel entry raises."""
    from lora_kernels.kernels import dora as kdora, dropout as kdropout, quantized as kquant

    def refuse(*a, **k):
        raise AssertionError("a Triton kernel was launched")

    for module, name in ((kdropout, "dropout_apply"), (kdora, "weight_norm"), (kdora, "scale"),
                         (kdora, "grad_scale"), (kquant, "dequantize")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("backend", ["torch", "aten"])
def test_torch_and_aten_never_launch_triton(backend, no_triton):
    x, w, b, a, bb = make_inputs(5, 64, 64, 4, torch.bfloat16)
    x.requires_grad_(True)
    lora_kernels.lora_linear(x, w, b, a, bb, 2.0, 0.1, backend=backend).float().sum().backward()
    layer = FusedLoRALinear(64, 64, r=4, lora_dropout=0.1, use_dora=True, backend=backend, dtype=torch.bfloat16)
    layer(x.detach()).float().sum().backward()
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.bfloat16)
    base.load_state_dict(nn.Linear(64, 64).state_dict())
    q = FusedLoRALinear.from_linear(base.to(DEVICE), r=4, lora_dropout=0.1, backend=backend)
    q(x.detach()).float().sum().backward()


def test_the_triton_family_does_launch_its_kernels(monkeypatch):
    if not backends.triton_serves(DEVICE, torch.bfloat16):
        pytest.skip("Triton cannot run here")
    from lora_kernels.kernels import dropout as kdropout

    calls = []
    real = kdropout.dropout_apply
    monkeypatch.setattr(kdropout, "dropout_apply", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b, a, bb = make_inputs(5, 64, 64, 4, torch.bfloat16)
    layer = FusedLoRALinear(64, 64, r=4, lora_dropout=0.1, use_dora=True, backend="triton", dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert calls
    calls.clear()  # the aten composition picked within the Triton family keeps the family's mask kernel
    x.requires_grad_(True)
    lora_kernels.lora_linear(x, w, b, a, bb, 2.0, 0.1, backend="triton_xa_first+aten").float().sum().backward()
    assert len(calls) == 2  # the backward's two regenerated masks (dA and dX); the forward's is in its own kernel


def test_aux_kernels_follow_the_backend_asked_for():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert all(plan.aux_kernels_for(b, cuda) for b in ("auto", "triton", "cuda", "triton_xa_first+aten"))
    assert not any(plan.aux_kernels_for(b, cuda) for b in ("aten", "torch", "aten+aten", "torch+torch"))
    assert not plan.aux_kernels_for("auto", cpu)  # auto runs the torch reference on CPU
