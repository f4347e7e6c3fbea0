"""The host-side caches of mixed batches (lora_kernels/stacking.py): reused when nothing changed, rebuilt when
anything did, never a stale adapter or an unchecked id."""

import copy
import io

import pytest
import torch

import lora_kernels
from conftest import DEVICE, CountOps
from lora_kernels import FusedLoRALinear, stack_adapters
from lora_kernels.stacking import AdapterStack


def _layer(n_adapters=3, backend="torch", dtype=torch.float32):
    layer = FusedLoRALinear(24, 20, r=4, lora_alpha=8, init_lora_weights=False, backend=backend, device=DEVICE,
                            dtype=dtype)
    for i in range(n_adapters - 1):
        layer.add_adapter(f"a{i}", r=2 + i, lora_alpha=4 + i, init_lora_weights=False)
    return layer.eval()


def _expected(layer, x, ids):
    """Each row through its own adapter, one at a time with set_adapter (no mixed-batch code involved)."""
    out = torch.empty(x.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
    active = layer.active_adapter
    for row, i in enumerate(ids.tolist()):
        if i < 0:
            out[row] = torch.nn.functional.linear(x[row], layer.base_weight(), layer.bias)
        else:
            layer.set_adapter(layer.adapter_names[i])
            out[row] = layer(x[row:row + 1])[0]
    layer.set_adapter(active)
    return out


def _check(layer, x, ids):
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_ids=ids), _expected(layer, x, ids), rtol=1e-5, atol=1e-5)


def test_inference_reuses_the_stacked_adapters_and_checked_ids():
    layer = _layer(4)
    x = torch.randn(9, 24, device=DEVICE)
    ids = torch.tensor([0, 1, 2, 3, -1, 3, 2, 1, 0], device=DEVICE)
    with torch.no_grad():
        first = layer(x, adapter_ids=ids)
        with CountOps() as ops:
            again = layer(x, adapter_ids=ids)
    assert torch.equal(first, again)
    # no stacking copy (cat), no rank-owner build (full / repeat_interleave), no id check (all) or cast (_to_copy)
    assert not {"cat", "full", "repeat_interleave", "all", "_to_copy"} & set(ops.counts), ops.counts
    _check(layer, x, ids)


@pytest.mark.parametrize("change", ["in_place", "optimizer_step", "load_state_dict", "add_adapter",
                                    "delete_adapter", "new_parameter", "dtype"])
def test_a_changed_adapter_is_restacked(change):
    layer = _layer(3)
    x = torch.randn(6, 24, device=DEVICE)
    ids = torch.tensor([0, 1, 2, 2, 1, 0], device=DEVICE)
    _check(layer, x, ids)  # fills the cache
    with torch.no_grad():
        if change == "in_place":
            layer.adapters["a1"].lora_B.mul_(-3.0)
        elif change == "optimizer_step":
            for p in layer.parameters():
                p.grad = torch.ones_like(p) if p.requires_grad else None
            torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5).step()
        elif change == "load_state_dict":
            state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
            layer.load_state_dict(state)
        elif change == "add_adapter":
            layer.add_adapter("late", r=3, init_lora_weights=False)
            ids = torch.tensor([3, 1, 3, 2, -1, 0], device=DEVICE)
        elif change == "delete_adapter":
            layer.delete_adapter("a0")
            ids = torch.tensor([0, 1, 1, -1, 1, 0], device=DEVICE)
        elif change == "new_parameter":
            layer.adapters["a0"].lora_A = torch.nn.Parameter(torch.randn_like(layer.adapters["a0"].lora_A))
        elif change == "dtype":
            layer.double()
            x = x.double()
    _check(layer, x, ids)


def test_grads_reach_each_adapter_after_cached_inference():
    """Training after inference: the stacked copy is not used where grads are needed."""
    layer = _layer(3)
    x = torch.randn(5, 24, device=DEVICE)
    ids = torch.tensor([0, 2, 2, -1, 0], device=DEVICE)
    with torch.no_grad():
        layer(x, adapter_ids=ids)
    layer.train()
    assert layer._stack._cache is None  # train() frees the copy
    layer(x, adapter_ids=ids).square().sum().backward()
    assert layer.lora_A.grad.any() and layer.adapters["a1"].lora_B.grad.any()
    assert layer.adapters["a0"].lora_A.grad is None or not layer.adapters["a0"].lora_A.grad.any()  # no row uses it
    # the same grads as the uncached functional path
    a, b, owner = stack_adapters([layer.lora_A.detach(), *[a.lora_A.detach() for a in list(layer.adapters.values())[1:]]],
                                 [layer.lora_B.detach(), *[a.lora_B.detach() for a in list(layer.adapters.values())[1:]]])
    a.requires_grad_()
    y = lora_kernels.lora_linear_mixed(x, layer.weight, layer.bias, a, b, owner, ids,
                                       [a.scaling for a in layer.adapters.values()],
                                       backend="torch")
    y.square().sum().backward()
    torch.testing.assert_close(a.grad[:4], layer.lora_A.grad)


def test_ids_are_checked_once_per_tensor_and_again_when_changed():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, 24))
    model.to(DEVICE)
    lora_kernels.inject(model, ["0", "1", "2"], r=4, init_lora_weights=False, backend="torch")
    lora_kernels.add_adapter(model, "b", r=2, init_lora_weights=False)
    model.eval()
    x = torch.randn(2, 3, 24, device=DEVICE)
    ids = torch.tensor([1, 0], device=DEVICE)
    with torch.no_grad(), lora_kernels.adapter_ids(ids):
        with CountOps() as ops:
            model(x)
        assert ops.counts["all"] == 1, ops.counts  # the first layer checks, the other two reuse it
        ids[1] = 5  # in place: a new version of the same tensor
        with pytest.raises(ValueError, match=r"adapter_ids: values must be in \[-1, 2\).*found 5"):
            model(x)
    with torch.no_grad(), lora_kernels.adapter_ids(torch.tensor([1, -2], device=DEVICE)):
        with pytest.raises(ValueError, match="found -2"):
            model(x)
    # a different input shape with the same ids is re-expanded (and re-checked)
    with torch.no_grad(), lora_kernels.adapter_ids(torch.tensor([1, 0], device=DEVICE)):
        assert model(torch.randn(2, 5, 24, device=DEVICE)).shape == (2, 5, 24)


def test_layers_with_a_cache_copy_and_pickle():
    layer = _layer(2)
    x = torch.randn(4, 24, device=DEVICE)
    ids = torch.tensor([1, 0, 1, -1], device=DEVICE)
    with torch.no_grad():
        y = layer(x, adapter_ids=ids)
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert other._stack._cache is None
        with torch.no_grad():
            torch.testing.assert_close(other(x, adapter_ids=ids), y)
        with torch.no_grad():
            other.adapters["a0"].lora_B.zero_()  # the copy's adapters are its own
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_ids=ids), y)


def test_inference_mode_tensors_take_the_uncached_path():
    with torch.inference_mode():
        layer = _layer(3)
        x = torch.randn(4, 24, device=DEVICE)
        ids = torch.tensor([2, 0, 1, -1], device=DEVICE)
        y = layer(x, adapter_ids=ids)
        assert layer._stack._cache is None
        layer.adapters["a1"].lora_B.mul_(2.0)  # inference tensors have no version counter: nothing may be cached
        y2 = layer(x, adapter_ids=ids)
        assert not torch.equal(y[0], y2[0]) and torch.equal(y[1:], y2[1:])


def test_adapter_stack_matches_stack_adapters():
    As = [torch.randn(r, 10, device=DEVICE) for r in (1, 3, 2)]
    Bs = [torch.randn(7, r, device=DEVICE) for r in (1, 3, 2)]
    cache = AdapterStack()
    for got in (cache.get(As, Bs), cache.get(As, Bs)):
        for g, e in zip(got, stack_adapters(As, Bs)):
            assert torch.equal(g, e) and g.dtype == e.dtype
    half = cache.get(As, Bs, dtype=torch.float16)
    assert half[0].dtype == torch.float16 and torch.equal(half[0], stack_adapters(As, Bs)[0].half())


def test_layer_rejects_ids_of_the_wrong_type_or_device():
    layer = _layer(2)
    x = torch.randn(3, 24, device=DEVICE)
    with pytest.raises(TypeError, match="adapter_ids: expected an int32 or int64 tensor, got torch.float32"):
        layer(x, adapter_ids=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="adapter_ids: on device meta, expected x's device"):
        layer(x, adapter_ids=torch.zeros(3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"adapter_ids: values must be in \[-1, 2\)"):
        layer(x, adapter_ids=torch.tensor([0, 2, 1], device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_on_a_transposed_base_weight(backend):
    """fan_in_fan_out layers (GPT-2's Conv1D: W0 stored [in, out]) serve mixed batches like any other."""
    layer = FusedLoRALinear(24, 20, r=3, lora_alpha=6, init_lora_weights=False, backend=backend,
                            fan_in_fan_out=True, device=DEVICE)
    layer.add_adapter("b", r=5, lora_alpha=5, init_lora_weights=False)
    layer.eval()
    x = torch.randn(2, 4, 24, device=DEVICE)
    ids = torch.tensor([1, -1], device=DEVICE)  # per sequence
    with torch.no_grad():
        y = layer(x, adapter_ids=ids)
        flat_ids = ids[:, None].expand(2, 4).reshape(-1)
        torch.testing.assert_close(y.reshape(8, 20), _expected(layer, x.reshape(8, 24), flat_ids), rtol=1e-4,
                                   atol=1e-4)


def test_copies_kept_in_inference_mode_serve_later_calls_with_grads():
    """A server warms the caches inside torch.inference_mode(); a later call that saves tensors for a backward
    (adapters frozen, input grads wanted) must get normal tensors from them, not inference tensors."""
    layer = _layer(3, dtype=torch.bfloat16)  # fp32 adapters next to bf16 W0: the mixed path keeps a cast stack
    layer.requires_grad_(False)
    x = torch.randn(4, 24, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.tensor([2, 0, 1, -1], device=DEVICE)
    with torch.inference_mode():
        single, mixed = layer(x), layer(x, adapter_ids=ids)
    assert layer._stack._cache is not None  # kept
    for kwargs, expected in (({}, single), ({"adapter_ids": ids}, mixed)):
        xg = x.clone().requires_grad_()
        y = layer(xg, **kwargs)
        y.float().sum().backward()
        assert torch.equal(y, expected) and xg.grad is not None and torch.isfinite(xg.grad).all()
