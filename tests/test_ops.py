"""The op contract: opcheck, torch.compile, autograd extras, backend choice, bad input."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import DEVICE, assert_compiled_matches_eager, assert_parity, make_inputs, seed_tensor
from lora_kernels import BackendUnavailableError, FusedLoRALinear, backends, lora_linear, reference

BACKENDS = ["torch", "triton"]


def _fwd_args(backend, dtype=torch.float32, p=0.1, M=13, K=24, N=20, r=4, requires_grad=True):
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype)
    for t in (x, a, bb):
        t.requires_grad_(requires_grad)
    return (x, w, b, a, bb, seed_tensor(99) if p > 0 else None, 0.5, p, True, backend)


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward(backend, p):
    dtype = torch.float64 if backend == "torch" else torch.float32
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, _fwd_args(backend, dtype, p))


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend, need_dx):
    x, w, b, a, bb, seed, s, p, _, _ = _fwd_args(backend, p=0.2, requires_grad=False)
    _, xa = torch.ops.lora_kernels.lora_linear_fwd(x, w, b, a, bb, seed, s, p, True, backend)
    gy = torch.randn(x.shape[0], w.shape[0], device=DEVICE)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd.default,
                          (gy, x, w, a, bb, xa, seed, s, p, need_dx, False, backend))


class _Block(nn.Module):
    def __init__(self, backend, p):
        super().__init__()
        self.up = FusedLoRALinear(24, 40, r=4, lora_alpha=8, lora_dropout=p, backend=backend,
                                  init_lora_weights=False, device=DEVICE)
        self.down = FusedLoRALinear(40, 24, r=3, lora_alpha=6, lora_dropout=p, backend=backend,
                                    init_lora_weights=False, device=DEVICE)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) + x


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, p):
    """The ops trace into one graph (no graph break) and the compiled model matches eager, grads included."""
    model = _Block(backend, p)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(model, compiled, [torch.randn(2, 5, 24, device=DEVICE)],
                                  [model.up.lora_A, model.down.lora_B])


def test_torch_compile_inductor_forward():
    """Inductor (the default backend) treats the op as an opaque call and keeps it in the graph."""
    layer = FusedLoRALinear(16, 12, r=2, init_lora_weights=False, device=DEVICE).eval()
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_and_bias_grads_when_requested(backend):
    """W0 and bias are frozen in LoRA; if a caller makes them trainable, their grads are right."""
    x, w, b, a, bb = make_inputs(11, 20, 14, 3, torch.float32)
    for t in (x, w, b, a, bb):
        t.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, 0.5, backend=backend)
    gy = torch.randn_like(y)
    y.backward(gy)
    x64 = x.detach().double()
    assert_parity("grad weight", w.grad, (gy.t() @ x.detach()), gy.double().t() @ x64)
    assert_parity("grad bias", b.grad, gy.sum(0), gy.double().sum(0))


def test_no_grad_inference_saves_nothing():
    x, w, b, a, bb = make_inputs(6, 20, 14, 3, torch.float32)
    y, xa = torch.ops.lora_kernels.lora_linear_fwd(x, w, b, a, bb, None, 1.0, 0.0, False, "triton")
    assert xa.numel() == 0
    torch.testing.assert_close(y, reference.lora_forward(x, w, b, a, bb, 1.0)[0])


def test_dropout_seed_from_torch_generator():
    """Without an explicit seed, torch.manual_seed makes the dropout repeatable; other seeds differ."""
    x, w, b, a, bb = make_inputs(20, 32, 16, 4, torch.float32)
    runs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        runs.append(lora_linear(x, w, b, a, bb, 1.0, 0.5, backend="triton"))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_env_override_of_auto(monkeypatch):
    from lora_kernels import plan

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    plan.reset()
    call = plan.Call(DEVICE, torch.float16, 8, 32, 16, 4, False, 2, False)
    try:
        assert plan.choose(call).forward.startswith("triton_")
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "aten")
        plan.reset()
        assert plan.choose(call).spec == "aten+aten"
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
        with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND: backend: unknown name 'bogus'"):
            plan.reset()
    finally:
        monkeypatch.delenv("LORA_KERNELS_BACKEND")
        plan.reset()


def test_auto_fallback_warns_once(monkeypatch):
    """On a GPU where the Triton kernels cannot run, `auto` serves the ATen composition and says so once."""
    from lora_kernels import plan

    monkeypatch.setattr(backends.TritonBackend, "unavailable_reason", staticmethod(lambda d, t: "no triton here"))
    monkeypatch.setattr(plan.rules, "cuda_unavailable_without_build", lambda d, t: "not built")
    monkeypatch.setenv("LORA_KERNELS_TUNE", "off")
    plan.reset()
    call = plan.Call(torch.device("cuda", 0), torch.bfloat16, 64, 32, 16, 4, False, 2, False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert plan.choose(call).spec == "aten+aten"
            assert plan.choose(call._replace(M=2048)).spec == "aten+aten"
        msgs = [str(w.message) for w in caught if "cannot run" in str(w.message)]
        assert len(msgs) == 1 and "no triton here" in msgs[0] and "lora_kernels.info" in msgs[0]
    finally:
        monkeypatch.delenv("LORA_KERNELS_TUNE")
        plan.reset()


def test_info_reports_backends_and_the_planner():
    from lora_kernels import info

    report = info(as_dict=True)
    cpu = report["devices"]["cpu"]["backends"]
    assert cpu["torch"] == "available" and cpu["aten"] == "available"
    assert cpu["cuda"].startswith("unavailable: ")
    assert report["planner (LORA_KERNELS_TUNE)"].startswith("measure each new call shape on CUDA")
    assert "cache" in report["devices"]["cpu"]["planner"]
    env = dict(os.environ, LORA_KERNELS_TUNE="off", LORA_KERNELS_BACKEND="aten")
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "first config of each table" in out.stdout and "static defaults only" in out.stdout, out.stdout
    assert "M=8192 K=4096 N=4096 r=16 train p>0" in out.stdout and "aten+aten" in out.stdout, out.stdout
    assert "RuntimeWarning" not in out.stderr
    env["LORA_KERNELS_TUNE"] = "sometimes"
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0 and "LORA_KERNELS_TUNE: expected one of on, cached, off, got 'sometimes'" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# Bad input: one case per kind; each must raise before any kernel runs, naming the argument.
# ---------------------------------------------------------------------------------------------------------
def _good():
    x, w, b, a, bb = make_inputs(4, 8, 6, 2, torch.float32)
    return dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=1.0, dropout_p=0.0)


BAD = {
    "x last dim": (lambda d: d.update(x=d["x"][:, :7]), ValueError, r"x: last dimension must be in_features = 8"),
    "lora_A shape": (lambda d: d.update(lora_A=d["lora_A"][:, :7]), ValueError, r"lora_A: expected shape \[r, 8\]"),
    "lora_B shape": (lambda d: d.update(lora_B=d["lora_B"][:5]), ValueError, r"lora_B: expected shape \[6, 2\]"),
    "rank mismatch": (lambda d: d.update(lora_B=torch.zeros(6, 3)), ValueError, r"lora_B: expected shape \[6, 2\]"),
    "rank zero": (lambda d: d.update(lora_A=torch.zeros(0, 8), lora_B=torch.zeros(6, 0)), ValueError,
                  r"rank r .* must be >= 1, got 0"),
    "bias shape": (lambda d: d.update(bias=torch.zeros(5)), ValueError, r"bias: expected shape \[6\]"),
    "weight dims": (lambda d: d.update(weight=d["weight"][None]), ValueError, r"weight: expected a 2-D tensor"),
    "dtype mismatch": (lambda d: d.update(lora_A=d["lora_A"].half()), TypeError,
                       r"lora_A: dtype torch.float16 does not match x's dtype torch.float32"),
    "unsupported dtype": (lambda d: d.update(**{k: d[k].int() for k in ("x", "weight", "bias", "lora_A", "lora_B")}),
                          TypeError, r"x: unsupported dtype torch.int32"),
    "device mismatch": (lambda d: d.update(lora_B=d["lora_B"].to("meta")), ValueError,
                        r"lora_B: on device meta, expected x's device"),
    "dropout 1": (lambda d: d.update(dropout_p=1.0), ValueError, r"dropout_p: expected a probability in \[0, 1\)"),
    "dropout negative": (lambda d: d.update(dropout_p=-0.1), ValueError, r"dropout_p: expected a probability"),
    "scaling nan": (lambda d: d.update(scaling=float("nan")), ValueError, r"scaling: expected a finite number"),
    "scaling inf": (lambda d: d.update(scaling=float("inf")), ValueError, r"scaling: expected a finite number"),
    "x not a tensor": (lambda d: d.update(x=[1.0] * 8), TypeError, r"x: expected a torch.Tensor"),
}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_launch(kind, backend, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    for name in backends.FORWARD:
        monkeypatch.setitem(backends.FORWARD, name, must_not_run)
    args = _good()
    mutate, exc, pattern = BAD[kind]
    mutate(args)
    with pytest.raises(exc, match=pattern):
        lora_linear(backend=backend, **args)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend: unknown name 'fast'; expected 'auto', a backend \('torch', 'aten'"):
        lora_linear(backend="fast", **_good())


def test_unavailable_backend_says_why():
    on_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot run .* on cpu .*needs? CUDA tensors"):
        lora_linear(backend="cuda", **on_cpu)


def test_triton_rejects_float64():
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 and float32, not torch.float64"):
        lora_linear(backend="triton", **args)
    with pytest.raises(BackendUnavailableError, match="forward 'triton_xa_first' cannot run this call: it supports "
                                                      "float16, bfloat16 and float32, not torch.float64"):
        lora_linear(backend="triton_xa_first+triton_split", **args)


def test_triton_on_cpu_without_interpreter_says_how():
    """In a process without TRITON_INTERPRET, CPU tensors and backend='triton' explain the interpreter."""
    code = ("import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from lora_kernels import lora_linear\n"
            "x = torch.randn(2, 8); w = torch.randn(6, 8); a = torch.randn(2, 8); b = torch.randn(6, 2)\n"
            "try:\n    lora_linear(x, w, None, a, b, 1.0, backend='triton')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("with a GPU present the message differs; the CPU case is what is checked")
    assert "BackendUnavailableError" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_seed_required_for_dropout_in_op():
    x, w, b, a, bb, _, s, _, _, _ = _fwd_args("torch")
    with pytest.raises(ValueError, match="seed: dropout_p > 0 needs a one-element int64 tensor"):
        torch.ops.lora_kernels.lora_linear_fwd(x, w, b, a, bb, None, s, 0.3, True, "torch")


def test_torch_compile_layers_with_different_hyperparameters():
    """Several compiled layers whose scaling and dropout differ: on recompilation dynamo makes the changed floats
    symbolic; the trace must not break on them (fullgraph) and the results must match eager."""
    for r, alpha, p in [(4, 8, 0.0), (2, 1, 0.1), (8, 3, 0.05)]:
        layer = FusedLoRALinear(16, 12, r=r, lora_alpha=alpha, lora_dropout=p, init_lora_weights=False,
                                device=DEVICE)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert_compiled_matches_eager(layer, compiled, [torch.randn(3, 16, device=DEVICE)], [layer.lora_A])


def test_bad_scaling_still_raises_under_compile():
    """Values that are symbolic while tracing are checked when the op runs, before any kernel."""
    args = _good()
    fn = torch.compile(lambda x, s: lora_linear(x, args["weight"], args["bias"], args["lora_A"], args["lora_B"], s),
                       fullgraph=True, backend="aot_eager", dynamic=True)
    fn(args["x"], 1.5)
    with pytest.raises(Exception, match="scaling: expected a finite number"):
        fn(args["x"], float("inf"))
