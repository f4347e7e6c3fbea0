"""Triton kernels vs the fp64 reference (forward and every grad), through the op with plans of the Triton family.

On a machine without a GPU they run in Triton's interpreter on CPU tensors; with a GPU, natively on it.
Every comparison uses the parity rule of conftest.assert_parity.
"""

import pytest
import torch

from conftest import DEVICE, DTYPES, assert_parity, make_inputs, seed_tensor
from lora_kernels import backends, lora_linear, plan, reference
from lora_kernels.kernels import forward as triton_forward

SEED = 20261125
SCALING = 0.75
# (M, K, N, r): M = 0 and 1, K and N not multiples of the blocks, r = 1, r not a power of two,
# r = min(K, N), r large enough for the two-launch forward and the widest rank padding.
SHAPES = [
    (1, 33, 17, 1),
    (37, 45, 70, 3),
    (64, 64, 48, 16),
    (37, 100, 67, 33),
    (19, 80, 72, 65),
    (0, 32, 16, 4),
    (5, 20, 24, 20),
    (9, 260, 270, 256),
]


def _references(x, w, b, a, bb, gy, p, need_dx=True):
    """(same-dtype results, fp64 results): each a tuple (y, dx, dA, dB)."""
    out = []
    for dtype in (x.dtype, torch.float64):
        args = [t.detach().to(dtype) if t is not None else None for t in (x.reshape(-1, x.shape[-1]), w, b, a, bb)]
        y, xa = reference.lora_forward(*args, SCALING, p, SEED)
        g = gy.reshape(-1, w.shape[0]).to(dtype)
        dx, da, db = reference.lora_backward(g, args[0], args[1], args[3], args[4], xa, SCALING, p, SEED, need_dx)
        out.append((y.reshape(*x.shape[:-1], w.shape[0]), None if dx is None else dx.reshape(x.shape), da, db))
    return out


def triton_plan(i, dtype, p, r, need_dx=True):
    """A Triton-family plan that varies with i, so the parity cases cover every forward and backward kernel (fp32
    runs through cuBLAS: the family's aten variant)."""
    if dtype == torch.float32:
        return "aten+aten"
    fwd = ("triton_fused", "triton_xa_first", "triton_cublas")[i % 3]
    if fwd == "triton_fused" and (p > 0 or max(16, 1 << (r - 1).bit_length()) > plan.FUSED_MAX_RANK):
        fwd = "triton_xa_first"
    bwd = ("triton_split", "triton_fused", "triton_split", "aten")[i % 4]
    if bwd == "triton_fused" and not need_dx:
        bwd = "triton_split"
    return f"{fwd}+{bwd}"


def _run_and_check(x, w, b, a, bb, p, need_dx=True, backend="triton"):
    x.requires_grad_(need_dx)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, SCALING, p, backend=backend, seed=seed_tensor(SEED))
    gy = torch.randn_like(y)
    y.backward(gy)
    same, ref64 = _references(x, w, b, a, bb, gy, p, need_dx)
    assert_parity("y", y, same[0], ref64[0])
    if need_dx:
        assert_parity("grad x", x.grad, same[1], ref64[1])
    else:
        assert x.grad is None
    assert_parity("grad lora_A", a.grad, same[2], ref64[2])
    assert_parity("grad lora_B", bb.grad, same[3], ref64[3])


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}r{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_parity(dtype, shape, bias, p):
    M, K, N, r = shape
    i = SHAPES.index(shape) + 2 * bias
    _run_and_check(*make_inputs(M, K, N, r, dtype, bias=bias), p, backend=triton_plan(i, dtype, p, r))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_only_backward(dtype, p):
    """x needs no grad: the low-rank kernel alone, without the dY W0 GEMM."""
    _run_and_check(*make_inputs(45, 70, 52, 6, dtype), p, need_dx=False,
                   backend=triton_plan(0, dtype, p, 6, need_dx=False))


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("variant", list(backends.FORWARD))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_forward_variant(dtype, variant, p):
    """Each forward variant on its own, whichever the planner would pick, against the reference (fused has no
    dropout); the Triton ones in fp32 too (the planner sends fp32 to cuBLAS, the kernels still serve mixed batches)."""
    if variant == "triton_fused" and p > 0:
        pytest.skip("the fused forward runs without dropout only")
    if backends.BACKENDS[plan.family_of(variant)].unavailable_reason(DEVICE, dtype):
        pytest.skip(f"{variant}: {backends.BACKENDS[plan.family_of(variant)].unavailable_reason(DEVICE, dtype)}")
    x, w, b, a, bb = make_inputs(41, 72, 66, 12, dtype)
    seed = seed_tensor(SEED) if p > 0 else None
    y, xa = backends.FORWARD[variant](x, w, b, a, bb, seed, SCALING, p, True, 0)
    same_y, same_xa = reference.lora_forward(x, w, b, a, bb, SCALING, p, SEED)
    y64, xa64 = reference.lora_forward(*(t.double() for t in (x, w, b, a, bb)), SCALING, p, SEED)
    assert_parity("y", y, same_y, y64)
    assert_parity("xa", xa, same_xa.float(), xa64)


class LaunchSpy:
    """Stands in for an autotuned kernel: records (grid for the interpreter's config, SPLIT_K) of each launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid({"BLOCK_M": 32, "BLOCK_K": 32}), kwargs["SPLIT_K"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("target", [2, 3, 64], ids=lambda t: f"target{t}")
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_xa_kernel_split_over_k(dtype, p, target, monkeypatch):
    """Few rows: the xa kernel splits K over programs that add into xa with atomics (2, 3 -> 2 with an empty
    tail, 4 splits of K = 100 in 32-wide steps); y and xa still meet the parity rule."""
    monkeypatch.setattr(triton_forward, "XA_SPLIT_MIN_STEPS", 1)
    spy = LaunchSpy(triton_forward.lora_xa_kernel)
    monkeypatch.setattr(triton_forward, "lora_xa_kernel", spy)
    x, w, b, a, bb = make_inputs(5, 100, 66, 12, dtype)
    seed = seed_tensor(SEED) if p > 0 else None
    y, xa = triton_forward.lora_forward(x, w, b, a, bb, seed, SCALING, p, True, "xa_first", xa_splits=target)
    assert spy.launches == [((1, 1, min(target, 4)), True)]
    same_y, same_xa = reference.lora_forward(x, w, b, a, bb, SCALING, p, SEED)
    y64, xa64 = reference.lora_forward(*(t.double() for t in (x, w, b, a, bb)), SCALING, p, SEED)
    assert_parity("y", y, same_y, y64)
    assert_parity("xa", xa, same_xa.float(), xa64)


def test_xa_kernel_does_not_split_when_it_must_not(monkeypatch):
    """No split for the cuBLAS composite (its rounded copy of xa needs the whole sum), and the planner asks for none
    in deterministic mode (the partial sums would be added in any order) nor for variants without the thin kernel."""
    spy = LaunchSpy(triton_forward.lora_xa_kernel)
    monkeypatch.setattr(triton_forward, "lora_xa_kernel", spy)
    x, w, b, a, bb = make_inputs(5, 100, 66, 12, torch.bfloat16)
    triton_forward.lora_forward(x, w, b, a, bb, None, SCALING, 0.0, True, "cublas", xa_splits=64)
    assert [split for _, split in spy.launches] == [False]
    call = plan.Call(torch.device("cuda", 0), torch.bfloat16, 5, 100, 66, 12, False, 2, False)
    assert plan.xa_split_target(call, 132) == 264
    assert plan.xa_split_target(call._replace(deterministic=True), 132) == 0
    monkeypatch.setattr(plan.rules, "sm_count", lambda device: 132)
    assert plan.launch_splits(call, "triton_xa_first") == 264 and plan.launch_splits(call, "triton_cublas") == 0
    assert plan.launch_splits(call._replace(deterministic=True), "triton_xa_first") == 0


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("variant", ["triton_split", "triton_fused", "aten", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_backward_variant(dtype, variant, p, need_dx):
    """Each backward (split: low-rank kernel + cuBLAS; fused: one launch; aten: every product by ATen, the mask
    regenerated; torch: the reference) against the reference."""
    if variant == "triton_fused" and not need_dx:
        pytest.skip("the fused backward always computes dX")
    M, K, N, r = 43, 70, 58, 12
    x, w, _, a, bb = make_inputs(M, K, N, r, dtype, bias=False)
    gy = torch.randn(M, N, device=DEVICE, dtype=dtype)
    seed = seed_tensor(SEED) if p > 0 else None
    refs = []
    for dt in (dtype, torch.float64):
        args = [t.to(dt) for t in (gy, x, w, a, bb)]
        _, xa_dt = reference.lora_forward(args[1], args[2], None, args[3], args[4], SCALING, p, SEED)
        refs.append(reference.lora_backward(*args, xa_dt, SCALING, p, SEED, need_dx))
    xa = reference.lora_forward(x.float(), w.float(), None, a.float(), bb.float(),
                                                          SCALING, p, SEED)[1]
    dx, da, db = backends.BACKWARD[variant](gy, x, w, a, bb, xa, seed, SCALING, p, need_dx, False)
    if need_dx:
        assert_parity("grad x", dx, refs[0][0], refs[1][0])
    else:
        assert dx.numel() == 0
    assert_parity("grad lora_A", da, refs[0][1], refs[1][1])
    assert_parity("grad lora_B", db, refs[0][2], refs[1][2])


def test_noncontiguous_inputs_and_leading_dims():
    """Strided views (transposed x, transposed weight, sliced A/B) and 3-D x, no copies needed."""
    dtype = torch.float16
    x_base = torch.randn(40, 2, 3, 7, device=DEVICE, dtype=dtype)
    x = x_base.permute(1, 2, 3, 0)[..., :37]           # [2, 3, 7, 37]: last dim strided
    x = x[:, :, :5]                                      # [2, 3, 5, 37]
    w = torch.randn(37, 50, device=DEVICE, dtype=dtype).t() / 6  # [50, 37], column-major
    b = torch.randn(100, device=DEVICE, dtype=dtype)[::2]        # stride 2
    a = torch.randn(37, 10, device=DEVICE, dtype=dtype).t()[:5] / 6  # [5, 37] strided
    bb = torch.randn(5, 50, device=DEVICE, dtype=dtype).t()          # [50, 5] column-major
    assert not x.is_contiguous() and not w.is_contiguous() and not a.is_contiguous()
    _run_and_check(x, w, b, a, bb, 0.1)


@pytest.mark.parametrize("backward", ["triton_split", "triton_fused", "aten"])
def test_deterministic_mode_is_bitwise_repeatable(backward):
    """With torch's deterministic algorithms on, dA and dB use partial buffers, not atomics: two runs
    give identical bits, and the result still meets the parity rule."""
    x, w, b, a, bb = make_inputs(70, 90, 80, 8, torch.bfloat16)
    gy = torch.randn(70, 80, device=DEVICE, dtype=torch.bfloat16)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
            y = lora_linear(xs, w, b, as_, bs, SCALING, 0.1, backend=f"triton_xa_first+{backward}",
                            seed=seed_tensor(SEED))
            y.backward(gy)
            runs.append((y.detach(), xs.grad, as_.grad, bs.grad))
    finally:
        torch.use_deterministic_algorithms(prev)
    for t1, t2 in zip(*runs):
        assert torch.equal(t1, t2)
    same, ref64 = _references(x, w, b, a, bb, gy, 0.1)
    for name, out, s, r in zip(("y", "grad x", "grad lora_A", "grad lora_B"), runs[0], same, ref64):
        assert_parity(name, out, s, r)


@pytest.mark.parametrize("backward", ["triton_split", "triton_fused", "aten"])
def test_grad_output_with_zero_strides(backward):
    """y.sum().backward() hands the backward an expanded dY (strides 0, 0): read through strides, no copy."""
    x, w, b, a, bb = make_inputs(33, 40, 36, 5, torch.float16)
    for t in (x, a, bb):
        t.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, SCALING, 0.1, backend=f"triton_xa_first+{backward}", seed=seed_tensor(SEED))
    seen = []
    y.register_hook(lambda g: seen.append(g.stride()))
    y.sum().backward()
    assert seen == [(0, 0)]
    same, ref64 = _references(x, w, b, a, bb, torch.ones_like(y), 0.1)
    for name, out, s, r in zip(("grad x", "grad lora_A", "grad lora_B"), (x.grad, a.grad, bb.grad), same[1:], ref64[1:]):
        assert_parity(name, out, s, r)
