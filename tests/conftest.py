"""Test setup: where kernels run, the parity rule, seeded inputs.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before
triton is imported, hence here, at the very top). With a GPU they run on it, natively.
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Plans measured or written by the tests stay out of the user's cache (and a user's cache out of the tests).
if "LORA_KERNELS_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["LORA_KERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora-kernels-test-plans-")

import pytest  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import backends, reference  # noqa: E402
from lora_kernels.kernels import memory  # noqa: E402
from bench.host import CountOps  # noqa: E402,F401  (tests count the ATen ops of a call with it)

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test starts from a fixed seed, and kernel outputs start as NaN so unwritten elements show."""
    torch.manual_seed(0)
    memory.POISON = True
    yield
    memory.POISON = False


def assert_parity(name, out, ref_same_dtype, ref64, floor_ulps=2.0):
    """The parity rule: max |out - ref64| <= 2 * max |ref_same_dtype - ref64| + floor.

    The floor is `floor_ulps` units in the last place of the output dtype at the reference's largest
    magnitude: it keeps the rule meaningful when the same-dtype reference happens to be exact. `ref_same_dtype` may be
    a list of same-dtype computations of the same quantity in different (equally valid) orders: their largest error
    is the reference's (one sample of a rounding error can be unusually small where the quantity is ill-conditioned,
    a gradient deep inside a model).
    """
    refs = list(ref_same_dtype) if isinstance(ref_same_dtype, (list, tuple)) else [ref_same_dtype]
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert all(out.dtype == r.dtype for r in refs), f"{name}: dtype {out.dtype} != {refs[0].dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed elements)"
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    ref_err = max((r.double() - ref64).abs().max().item() for r in refs)
    floor = floor_ulps * EPS[out.dtype] * max(ref64.abs().max().item(), 1e-30)
    assert err <= 2 * ref_err + floor, (
        f"{name}: error {err:.3e} > 2 x same-dtype reference error {ref_err:.3e} + floor {floor:.3e}")


def make_inputs(M, K, N, r, dtype, device=DEVICE, bias=True, lead=None):
    """Seeded random LoRA inputs with B non-zero (a zero B would hide every bug in the low-rank path)."""
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(shape, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device, dtype=dtype) / K**0.5)
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    a = torch.randn(r, K, device=device, dtype=dtype) / K**0.5
    bb = torch.randn(N, r, device=device, dtype=dtype) / r**0.5
    return x, w, b, a, bb


def lm_losses(model, ids, steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps of a causal LM on its trainable parameters, the batch `ids` as its own labels: the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def llama_4bit(fmt="nf4", dq=True, compute_dtype=torch.float32, layers=2):
    """A small Llama whose decoder linears are bitsandbytes Linear4bit (sizes multiples of 64, which bitsandbytes'
    CPU kernels serve exactly in training mode)."""
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    for name, module in list(model.model.named_modules()):
        if type(module) is torch.nn.Linear:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=fmt, compress_statistics=dq)
            q.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.model.get_submodule(parent), child, q)
    return model.to(DEVICE)


def seed_tensor(value, device=DEVICE):
    return torch.tensor([value], dtype=torch.int64, device=device)


def assert_compiled_matches_eager(eager, compiled, inputs, params, seed=123, **tol):
    """Runs `eager` and `compiled` on clones of `inputs` with the same RNG seed (the same dropout masks); their
    outputs, the inputs' grads and the grads of `params` must match (default: float32 round-off)."""
    runs = []
    for fn in (eager, compiled):
        torch.manual_seed(seed)
        for t in params:
            t.grad = None
        xs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*xs)
        y.float().square().mean().backward()
        runs.append([y.detach()] + [t.grad for t in xs if t.is_floating_point()] + [t.grad.clone() for t in params])
    tol = tol or dict(rtol=1e-5, atol=1e-6)
    for eager_out, compiled_out in zip(*runs):
        torch.testing.assert_close(compiled_out, eager_out, **tol)


__all__ = ["DEVICE", "assert_compiled_matches_eager", "DTYPES", "HAS_GPU", "assert_parity", "make_inputs", "seed_tensor",
           "requires_gpu", "llama_4bit",
           "lora_kernels", "backends", "reference"]


def pytest_runtest_logreport(report):
    """With LORA_KERNELS_FAIL_LOG=path, each failure's report is appended there as soon as it happens, so a
    run that is cut short (a time-limited GPU job) still leaves its tracebacks."""
    path = os.environ.get("LORA_KERNELS_FAIL_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
