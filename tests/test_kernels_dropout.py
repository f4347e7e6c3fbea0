"""Dropout inside the kernels: the same mask as the reference, in the forward and in the backward."""

import pytest
import torch

from conftest import DEVICE, seed_tensor
from lora_kernels import lora_linear, reference
from lora_kernels.kernels.dropout import dropout_mask


@pytest.mark.parametrize("seed", [0, 1, 2**33 + 5, 2**62 - 1])
@pytest.mark.parametrize("m,k,p", [(37, 45, 0.1), (64, 128, 0.5), (5, 3, 0.9)])
def test_triton_mask_equals_reference_bitwise(seed, m, k, p):
    expected = reference.dropout_keep_mask(seed, m, k, p, device=DEVICE)
    # the mask kernel the fp32 paths use, and the in-kernel generator through it
    assert torch.equal(dropout_mask(seed_tensor(seed), m, k, p), expected)


def _identity_layer(n, dtype=torch.float32):
    """K = N = r = n, W0 = 0, A = B = I, scaling 1: xa = dropout(x), and dX = dY * D."""
    w = torch.zeros(n, n, device=DEVICE, dtype=dtype)
    eye = torch.eye(n, device=DEVICE, dtype=dtype)
    return w, eye.clone().requires_grad_(True), eye.clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("need_dx", [True, False])
def test_forward_and_backward_use_the_same_mask(need_dx, dtype):
    """fp32 applies the mask kernel's output around cuBLAS products; 16-bit regenerates it inside the kernels."""
    n, m, p = 32, 50, 0.3
    w, a, b = _identity_layer(n, dtype)
    x = (torch.rand(m, n, device=DEVICE) + 0.5).to(dtype).requires_grad_(need_dx)  # no zeros of its own
    y = lora_linear(x, w, None, a, b, 1.0, p, backend="triton", seed=seed_tensor(77))
    keep_fwd = y != 0
    expected = reference.dropout_keep_mask(77, m, n, p, device=DEVICE)
    assert torch.equal(keep_fwd, expected)
    torch.testing.assert_close(y[keep_fwd], (x / (1 - p))[keep_fwd].detach())
    y.backward(torch.ones_like(y))
    # dA = G^T (x D) with G = dY B = ones: column sums of the dropped x, which are zero exactly where dropped
    dropped_x = torch.where(expected, x.detach().float() / (1 - p), 0.0)
    torch.testing.assert_close(a.grad, (torch.ones(n, m, device=DEVICE) @ dropped_x).to(dtype))
    if need_dx:
        keep_bwd = x.grad != 0
        assert torch.equal(keep_bwd, keep_fwd)


def test_mask_rate_close_to_p_in_kernels():
    n, m, p = 64, 512, 0.2
    w, a, b = _identity_layer(n)
    x = torch.rand(m, n, device=DEVICE) + 0.5
    with torch.no_grad():
        y = lora_linear(x, w, None, a, b, 1.0, p, backend="triton", seed=seed_tensor(3))
    rate = (y == 0).double().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / y.numel()) ** 0.5


def test_dropout_repeatable_and_seed_dependent():
    n = 32
    w, a, b = _identity_layer(n)
    x = torch.rand(20, n, device=DEVICE) + 0.5
    with torch.no_grad():
        y1 = lora_linear(x, w, None, a, b, 1.0, 0.5, backend="triton", seed=seed_tensor(10))
        y2 = lora_linear(x, w, None, a, b, 1.0, 0.5, backend="triton", seed=seed_tensor(10))
        y3 = lora_linear(x, w, None, a, b, 1.0, 0.5, backend="triton", seed=seed_tensor(11))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
