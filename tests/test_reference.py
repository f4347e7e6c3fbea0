"""The pure-PyTorch reference: its formulas against autograd, and its Philox against published answers."""

import pytest
import torch

from conftest import make_inputs
from lora_kernels import reference

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32(*[torch.tensor([c]) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


def _forward(x, w, b, a, bb, scaling, p, seed):
    y, _ = reference.lora_forward(x, w, b, a, bb, scaling, p, seed)
    return y


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_gradcheck(p, bias):
    """The reference forward is differentiable by autograd; gradcheck it in fp64."""
    x, w, b, a, bb = make_inputs(5, 7, 6, 3, torch.float64, device="cpu", bias=bias)
    for t in (x, a, bb):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, a, bb: _forward(x, w, b, a, bb, 0.7, p, 11), (x, a, bb))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("need_dx", [True, False])
def test_reference_backward_matches_autograd(p, need_dx):
    """lora_backward's hand-written formulas equal autograd through lora_forward (fp64)."""
    x, w, b, a, bb = make_inputs(9, 12, 10, 4, torch.float64, device="cpu")
    for t in (x, a, bb):
        t.requires_grad_(True)
    y, xa = reference.lora_forward(x, w, b, a, bb, 1.5, p, 1234)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, da, db = reference.lora_backward(gy, x.detach(), w, a.detach(), bb.detach(), xa.detach(), 1.5, p, 1234,
                                         need_dx)
    torch.testing.assert_close(da, a.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, bb.grad, rtol=1e-12, atol=1e-12)
    if need_dx:
        torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    else:
        assert dx is None


def test_dropout_mask_rate_and_independence():
    p = 0.1
    keep = reference.dropout_keep_mask(seed=7, m=600, k=1001, p=p)
    n = keep.numel()
    rate = 1 - keep.double().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5
    # The four words of one Philox call serve four neighbouring columns: they must not be correlated.
    k = keep[:, :1000].double().reshape(600, 250, 4)
    corr = torch.corrcoef(k.permute(2, 0, 1).reshape(4, -1))
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 0.02
    other = reference.dropout_keep_mask(seed=8, m=600, k=1001, p=p)
    assert (keep != other).any()
    assert torch.equal(keep, reference.dropout_keep_mask(seed=7, m=600, k=1001, p=p))


def test_dropout_mask_does_not_depend_on_shape_of_the_call():
    """Row i of an M-row mask is the same as row i of a longer one: a pure function of (seed, i, j)."""
    full = reference.dropout_keep_mask(seed=3, m=50, k=37, p=0.5)
    part = reference.dropout_keep_mask(seed=3, m=20, k=37, p=0.5)
    assert torch.equal(full[:20], part)


def test_large_seed_and_counter_words():
    """Seeds over 2**32 and counters over 2**32 use the high words (no silent truncation)."""
    a = reference.dropout_keep_mask(seed=5, m=4, k=64, p=0.5)
    b = reference.dropout_keep_mask(seed=5 + 2**40, m=4, k=64, p=0.5)
    assert not torch.equal(a, b)
    c_hi = reference.philox4x32(torch.tensor([2**32]), torch.tensor([1]), 0, 0, 0, 0)
    c_lo = reference.philox4x32(torch.tensor([0]), torch.tensor([0]), 0, 0, 0, 0)
    assert [int(v) for v in c_hi] != [int(v) for v in c_lo]


def test_mask_in_row_blocks_equals_one_pass():
    """dropout_keep_mask works through blocks of rows (2**16 counters each): the same bits as one pass over every
    counter (here 130 rows of 513 counters: blocks of 127 rows and a 3-row tail), and p = 0 keeps everything."""
    seed, m, k, p = 2**35 + 99, 130, 2050, 0.37
    k4 = (k + 3) // 4
    counter = torch.arange(m, dtype=torch.int64)[:, None] * k4 + torch.arange(k4, dtype=torch.int64)[None, :]
    words = reference.philox4x32(counter & 0xFFFFFFFF, counter >> 32, 0, 0, seed & 0xFFFFFFFF, seed >> 32)
    bits = torch.stack(words, dim=-1).reshape(m, 4 * k4)[:, :k]
    expected = (bits >> 1) >= int(p * 2**31)
    assert torch.equal(reference.dropout_keep_mask(seed, m, k, p), expected)
    assert 0.3 < 1 - expected.float().mean().item() < 0.44
    assert reference.dropout_keep_mask(seed, m, k, 0.0).all()
