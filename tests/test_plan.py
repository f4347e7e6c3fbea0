"""The planner (lora_kernels/plan.py): measured choice with an injected timer, every candidate's parity, the plan
cache on disk (round trip, corrupt and foreign files, unwritable places, two processes at once), the guards that
keep measuring out of compiled code, graph capture, deterministic mode and the interpreter, forced plans."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import DEVICE, assert_parity, make_inputs, seed_tensor
from lora_kernels import BackendUnavailableError, backends, lora_linear, plan, reference

SEED = 777


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh plan cache directory and a planner that has forgotten everything."""
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path / "plans"))
    plan.reset()
    yield tmp_path / "plans"
    monkeypatch.undo()
    plan.reset()


def fake_timer(times: dict, default=1e-3, ran=None):
    """A timer that runs each candidate once (it must work on scratch inputs) and reports the given seconds."""
    def timer(label, fn):
        fn()
        if ran is not None:
            ran.append(label)
        return times.get(label, default)
    return timer


def _call(M=37, K=45, N=70, r=3, dropout=False, grads=2, dtype=torch.bfloat16, adapters=0):
    return plan.Call(DEVICE, dtype, M, K, N, r, dropout, grads, False, adapters)


# ----------------------------------------------------------------------------------------------------------------
# Measured choice
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("winner", [("triton_xa_first", "triton_split"), ("aten", "triton_fused"),
                                    ("triton_cublas", "aten"), ("triton_fused", "triton_split")])
def test_injected_timer_decides_and_the_call_follows(winner, cache_dir, monkeypatch):
    fwd, bwd = winner
    ran = []
    chosen, us = plan.tune(_call(), timer=fake_timer({f"forward:{fwd}": 1e-6, f"backward:{bwd}": 2e-6}, ran=ran))
    assert chosen[:2] == winner
    fwds, bwds, _ = plan.candidates(_call())
    assert sorted(ran) == sorted([f"forward:{v}" for v in fwds] + [f"backward:{v}" for v in bwds])
    assert us[f"forward:{fwd}"] == 1.0 and us[f"backward:{bwd}"] == 2.0
    seen = []
    for table, name in ((backends.FORWARD, "forward"), (backends.BACKWARD, "backward")):
        for v, fn in list(table.items()):
            monkeypatch.setitem(table, v, lambda *a, v=v, fn=fn, name=name: seen.append(f"{name}:{v}") or fn(*a))
    x, w, b, a, bb = make_inputs(37, 45, 70, 3, torch.bfloat16)
    for t in (x, a, bb):
        t.requires_grad_(True)
    lora_linear(x, w, b, a, bb, 0.5).float().sum().backward()
    assert seen == [f"forward:{fwd}", f"backward:{bwd}"]


def test_inference_keys_time_the_forward_alone(cache_dir):
    ran = []
    chosen, _ = plan.tune(_call(grads=0), timer=fake_timer({"forward:triton_fused": 1e-6}, ran=ran))
    assert chosen.forward == "triton_fused" and all(label.startswith("forward:") for label in ran)


def test_a_failing_candidate_is_left_out(cache_dir):
    def timer(label, fn):
        if label == "forward:triton_fused":
            raise RuntimeError("out of resources: shared memory")
        fn()
        return 1e-6 if label == "forward:triton_cublas" else 1e-3

    chosen, us = plan.tune(_call(), timer=timer)
    assert chosen.forward == "triton_cublas"
    assert us["forward:triton_fused"].startswith("RuntimeError: out of resources")


def test_tuning_leaves_torch_random_stream_alone(cache_dir):
    """Scratch inputs come from a private generator: a run's dropout masks do not depend on when it tuned."""
    state = torch.get_rng_state()
    plan.tune(_call(dropout=True), timer=fake_timer({}))
    assert torch.equal(torch.get_rng_state(), state)


def test_mixed_batches_are_tuned_among_their_variants(cache_dir):
    call = _call(M=40, r=12, adapters=3)
    ran = []
    chosen, _ = plan.tune(call, timer=fake_timer({"forward:triton_sorted": 1e-6}, ran=ran))
    assert chosen[:2] == ("triton_sorted", "triton_split")
    assert {label.split(":")[1] for label in ran} >= {"triton_gated", "triton_gated_cublas", "triton_sorted", "torch"}


@pytest.mark.parametrize("winner", [("triton_grouped", "aten"), ("aten", "triton_grouped")])
def test_experts_calls_are_tuned_among_their_variants_and_keyed_apart(winner, cache_dir, monkeypatch):
    """An experts call (Call.experts = E) times the grouped variants (on scratch inputs split over the experts), keeps
    the fastest, and is keyed apart from the dense call of the same shape; the call then runs what was chosen."""
    from lora_kernels.experts import experts_linear, routing

    call = _call(M=40, K=32, N=48, r=4)._replace(experts=4)
    fwd, bwd = winner
    ran = []
    chosen, _ = plan.tune(call, timer=fake_timer({f"forward:{fwd}": 1e-6, f"backward:{bwd}": 1e-6}, ran=ran))
    assert chosen[:2] == winner
    assert {label.split(":")[1] for label in ran} == {"triton_grouped", "aten"}  # (auto never measures torch)
    assert plan.entry_key("auto", call) != plan.entry_key("auto", call._replace(experts=0))
    seen = []
    for table, name in ((backends.EXPERTS_FORWARD, "forward"), (backends.EXPERTS_BACKWARD, "backward")):
        for v, fn in list(table.items()):
            monkeypatch.setitem(table, v, lambda *a, v=v, fn=fn, name=name: seen.append(f"{name}:{v}") or fn(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    w = torch.randn(4, 48, 32, generator=g).to(DEVICE, torch.bfloat16)
    a = torch.randn(4, 4, 32, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    bb = torch.randn(4, 48, 4, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    perm, offsets = routing(torch.randint(0, 4, (20, 2), generator=g).to(DEVICE), 4)
    experts_linear(x, w, None, a, bb, offsets, 0.5, gather=perm // 2).float().sum().backward()
    assert seen == [f"forward:{fwd}", f"backward:{bwd}"]


# ----------------------------------------------------------------------------------------------------------------
# Every candidate: the same result
# ----------------------------------------------------------------------------------------------------------------
def _plans(dtype, p, grads):
    call = _call(dtype=dtype, dropout=p > 0, grads=grads)
    fwds, bwds, _ = plan.candidates(call)
    return [f"{f}+{b}" for f in fwds for b in (bwds if grads else bwds[:1])]


@pytest.mark.parametrize("grads", [2, 1, 0], ids=["train", "train-no-dx", "inference"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(1, 33, 17, 1), (37, 45, 70, 3)], ids=lambda s: "M{}K{}N{}r{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_candidate_meets_the_parity_rule(dtype, shape, p, grads):
    M, K, N, r = shape
    specs = _plans(dtype, p, grads)
    assert len(specs) >= (1 if dtype == torch.float32 else 6 if grads else 3)
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype)
    gy = torch.randn(M, N, device=DEVICE, dtype=dtype)
    refs = []
    for dt in (dtype, torch.float64):
        args = [t.to(dt) for t in (x, w, b, a, bb)]
        y, xa = reference.lora_forward(*args, 0.75, p, SEED)
        refs.append((y, *reference.lora_backward(gy.to(dt), args[0], args[1], args[3], args[4], xa, 0.75, p, SEED)))
    for spec in specs:
        xs, As, Bs = (t.clone().requires_grad_(req) for t, req in ((x, grads == 2), (a, grads > 0), (bb, grads > 0)))
        with torch.set_grad_enabled(grads > 0):
            y = lora_linear(xs, w, b, As, Bs, 0.75, p, backend=spec, seed=seed_tensor(SEED))
        assert_parity(f"{spec} y", y, refs[0][0], refs[1][0])
        if grads:
            y.backward(gy)
            if grads == 2:
                assert_parity(f"{spec} grad x", xs.grad, refs[0][1], refs[1][1])
            assert_parity(f"{spec} grad lora_A", As.grad, refs[0][2], refs[1][2])
            assert_parity(f"{spec} grad lora_B", Bs.grad, refs[0][3], refs[1][3])


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
def test_cache_round_trips_through_the_file(cache_dir, monkeypatch):
    call = _call()
    chosen, _ = plan.tune(call, timer=fake_timer({"forward:triton_cublas": 1e-6, "backward:aten": 1e-6}))
    path = plan.cache_path(DEVICE)
    assert path.startswith(str(cache_dir)) and os.path.exists(path)
    data = json.load(open(path))
    assert data["context"] == plan.context(DEVICE)
    entry = data["entries"][plan.entry_key("auto", call)]
    assert entry["plan"] == "triton_cublas+aten" and "forward:triton_fused" in entry["us"]
    plan.reset()  # a new process: memory empty, the file read again

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached key was measured again")

    monkeypatch.setattr(plan.lookup, "tune_call", no_timing)
    assert plan.choose(call) == chosen
    assert plan.choose(call._replace(M=50)) == chosen  # the same power-of-two bucket of rows
    assert plan.choose(call._replace(M=65)) == plan.default_plan(call._replace(M=65))  # another bucket: not measured


def test_context_names_what_the_plans_were_measured_on():
    ctx = plan.context(DEVICE)
    assert set(ctx) == {"device", "cuda", "driver", "torch", "triton", "lora_kernels", "cuda_ext"}
    assert ctx["torch"] == torch.__version__ and os.path.basename(plan.cache_path(DEVICE)).startswith("plans-")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "context": {"device": "Other GPU"},
                                                               "entries": {}}), json.dumps([1, 2])],
                         ids=["corrupt", "foreign", "wrong-shape"])
def test_unusable_cache_file_warns_once_and_is_ignored(content, cache_dir):
    call = _call()
    path = plan.cache_path(DEVICE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = plan.choose(call)
        plan.choose(call._replace(M=200))
        plan.choose(call._replace(K=46))
    msgs = [str(w.message) for w in caught if "plan cache" in str(w.message)]
    assert len(msgs) == 1 and path in msgs[0] and "ignored" in msgs[0]
    assert first == plan.default_plan(call)
    # measuring again writes a good file in its place
    chosen, _ = plan.tune(call, timer=fake_timer({"forward:triton_xa_first": 1e-6}))
    assert json.load(open(path))["entries"][plan.entry_key("auto", call)]["plan"] == chosen.spec


def test_unwritable_cache_warns_once_and_keeps_plans_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(blocker / "plans"))
    plan.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen, _ = plan.tune(_call(), timer=fake_timer({"forward:triton_cublas": 1e-6}))
            plan.tune(_call(M=300), timer=fake_timer({}))
        msgs = [str(w.message) for w in caught if "cannot be written" in str(w.message)]
        assert len(msgs) == 1 and "in memory only" in msgs[0]
        assert plan.choose(_call()) == chosen
    finally:
        monkeypatch.undo()
        plan.reset()


_WORKER = """
import os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
import torch
from lora_kernels import plan
def timer(label, fn):
    time.sleep(0.01)  # long enough for the two processes' writes to interleave
    return 1e-6 if label == "forward:aten" else 1e-3
first = int(sys.argv[1])
for M in range(first, first + 6):
    plan.tune(plan.Call(torch.device("cpu"), torch.bfloat16, 2 ** M, 32, 16, 4, False, 0, False), timer=timer)
"""


def test_two_processes_tuning_at_once_keep_both_entries(cache_dir):
    env = dict(os.environ, LORA_KERNELS_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(first)], env=env, stderr=subprocess.PIPE, text=True)
             for first in (1, 7)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read()
    data = json.load(open(plan.cache_path(torch.device("cpu"))))
    rows = sorted(int(k.split("|")[2][1:]) for k in data["entries"])
    assert rows == [2 ** M for M in range(1, 13)]
    assert {e["plan"].split("+")[0] for e in data["entries"].values()} == {"aten"}


# ----------------------------------------------------------------------------------------------------------------
# When nothing is timed
# ----------------------------------------------------------------------------------------------------------------
def _cuda_call(**kw):
    return plan.Call(torch.device("cuda", 0), torch.bfloat16, 4096, 64, 64, 8, False, 2, False)._replace(**kw)


@pytest.fixture
def measurable(monkeypatch, cache_dir):
    """A CUDA call on this machine with every guard open (no interpreter, no capture, not compiling): measuring is
    allowed; tune_call is a spy."""
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    monkeypatch.setattr(backends.TritonBackend, "unavailable_reason", staticmethod(lambda d, t: None))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(plan.rules, "cuda_unavailable_without_build", lambda d, t: "not built")
    timed = []
    monkeypatch.setattr(plan.lookup, "tune_call", lambda call, backend="auto", timer=None: timed.append(call) or (
        plan.Plan("aten", "aten"), {}))
    monkeypatch.setattr(plan.lookup, "cache_for", lambda device: type("C", (), {"entries": {}})())
    return timed


def test_guards_open_measures(measurable):
    assert plan.why_not_measure(_cuda_call()) is None
    assert plan.choose(_cuda_call()).spec == "aten+aten" and len(measurable) == 1
    plan.choose(_cuda_call(M=3000))  # the same bucket: remembered, not measured again
    assert len(measurable) == 1


@pytest.mark.parametrize("guard", ["compiling", "capturing", "deterministic", "interpreter", "tune-off", "tune-cached",
                                   "cpu"])
def test_each_guard_stops_measuring(guard, measurable, monkeypatch):
    call = _cuda_call()
    if guard == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif guard == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    elif guard == "deterministic":
        call = call._replace(deterministic=True)
    elif guard == "interpreter":
        monkeypatch.setattr(backends, "triton_interpreting", lambda: True)
    elif guard.startswith("tune"):
        monkeypatch.setenv("LORA_KERNELS_TUNE", guard.split("-")[1])
        plan.reset()
    else:
        call = call._replace(device=torch.device("cpu"))
    assert plan.why_not_measure(call) is not None
    chosen = plan.choose(call)
    assert measurable == [] and chosen.spec == plan.default_plan(call).spec
    if guard in ("compiling", "capturing"):  # a passing state: the key is measured once it is over
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        plan.choose(call)
        assert len(measurable) == 1


def test_compiled_graphs_hold_the_backend_and_never_time(cache_dir, monkeypatch):
    """Under torch.compile the op gets the backend name and resolves the plan when it runs, without timing."""
    monkeypatch.setattr(plan.lookup, "tune_call", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    seen = []
    real = plan.resolve_spec
    monkeypatch.setattr(plan, "resolve_spec", lambda spec, call: seen.append(spec) or real(spec, call))
    x, w, b, a, bb = make_inputs(6, 16, 12, 2, torch.float32)
    fn = torch.compile(lambda x: lora_linear(x, w, b, a, bb, 1.0, backend="aten"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x), lora_linear(x, w, b, a, bb, 1.0, backend="aten"))
    assert seen and set(seen) == {"aten"}


# ----------------------------------------------------------------------------------------------------------------
# Forced plans, knobs, static defaults
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,kwargs,why", [
    ("triton_fused+triton_split", dict(p=0.1), "forward 'triton_fused' cannot run this call: it runs without dropout"),
    ("triton_xa_first+triton_fused", dict(x_grad=False), "backward 'triton_fused' cannot run this call: it computes dX"),
    ("cuda_decode+cuda", dict(), "forward 'cuda_decode' cannot run this call"),
    ("triton_fused+aten", dict(r=70), "it serves ranks up to 64"),
    ("triton_sorted+triton_split", dict(), "'triton_sorted' is not a forward variant"),
    ("triton_xa_first+aten", dict(dtype=torch.float32), "fp32 runs through cuBLAS"),
])
def test_forced_plan_that_does_not_fit_raises_before_any_kernel(spec, kwargs, why, monkeypatch):
    def must_not_run(*args, **kw):
        raise AssertionError("a kernel ran before the plan was checked")

    for table in (backends.FORWARD, backends.BACKWARD):
        for v in table:
            monkeypatch.setitem(table, v, must_not_run)
    x, w, b, a, bb = make_inputs(20, 80, 72, kwargs.get("r", 4), kwargs.get("dtype", torch.bfloat16))
    x.requires_grad_(kwargs.get("x_grad", True))
    a.requires_grad_(True)
    with pytest.raises(BackendUnavailableError, match=why.replace("(", r"\(")):
        lora_linear(x, w, b, a, bb, 1.0, kwargs.get("p", 0.0), backend=spec)


def test_forced_plan_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton_xa_first+triton_split")
    plan.reset()
    try:
        assert plan.choose(_call()).spec == "triton_xa_first+triton_split"
        with pytest.raises(BackendUnavailableError, match="forward 'triton_xa_first' cannot run this call"):
            plan.choose(_call(dtype=torch.float64))
    finally:
        monkeypatch.delenv("LORA_KERNELS_BACKEND")
        plan.reset()


def test_static_defaults_follow_the_h100_figures():
    """The first fitting variant of the order of preference (availability aside)."""
    def first(call):
        pf, pb = plan.preferences(call)
        f = next(v for v in pf if not plan.forward_unfit(v, call))
        b = next(v for v in pb if not plan.backward_unfit(v, call))
        return f, b

    cuda = torch.device("cuda", 0)
    big = plan.Call(cuda, torch.bfloat16, 8192, 4096, 4096, 16, False, 2, False)
    assert first(big) == ("triton_cublas", "aten")
    assert first(big._replace(N=14336)) == ("triton_cublas", "triton_split")
    assert first(big._replace(M=16)) == ("triton_fused", "triton_fused")
    assert first(big._replace(M=16, dropout=True)) == ("triton_xa_first", "triton_fused")
    assert first(big._replace(M=16, grads=1)) == ("triton_fused", "triton_split")
    assert first(big._replace(M=16, r=128)) == ("triton_xa_first", "triton_fused")
    assert first(big._replace(dtype=torch.float32)) == ("aten", "aten")
    assert first(big._replace(dtype=torch.float64)) == ("torch", "torch")
    mixed = big._replace(adapters=4)
    assert first(mixed) == ("triton_gated_cublas", "triton_split")
    assert first(mixed._replace(M=32)) == ("triton_gated", "triton_split")


def test_bad_knobs_are_named(monkeypatch):
    for var, value, message in (("LORA_KERNELS_TUNE", "always", "LORA_KERNELS_TUNE: expected one of on, cached, off"),
                                ("LORA_KERNELS_BACKEND", "fastest", "LORA_KERNELS_BACKEND: backend: unknown name")):
        monkeypatch.setenv(var, value)
        try:
            with pytest.raises(ValueError, match=message):
                plan.reset()
        finally:
            monkeypatch.delenv(var)
            plan.reset()


def test_a_warm_call_costs_one_lookup(monkeypatch):
    """Plans are kept per key in memory: the second call of a key does not choose again."""
    x, w, b, a, bb = make_inputs(9, 16, 12, 2, torch.bfloat16)
    lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    monkeypatch.setattr(plan.lookup, "choose_uncached", lambda *a, **k: (_ for _ in ()).throw(AssertionError("chose again")))
    lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    x2 = make_inputs(11, 16, 12, 2, torch.bfloat16)[0]
    lora_linear(x2, w, b, a, bb, 1.0, backend="triton")  # rows 11 and 9 share the bucket of 16
