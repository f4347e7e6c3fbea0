"""Mixed batches: several adapters over one base layer, each row (token) with its own adapter.

Providers, per case (M tokens, K, N, n adapters of rank r, bf16):
  "base"    cuBLAS x @ W0^T alone (the floor; what a merged single adapter costs),
  "single"  this package's single-adapter layer with one adapter for every row (the issue's reference point),
  "mixed"   a FusedLoRALinear holding the n adapters, called with adapter_ids= (every row with its own adapter, one
            launch for the low-rank part) as `auto` plans it: what a server or trainer calls, host-side caching
            included (inference stacks the adapters once; training re-stacks each step, for autograd),
  "sorted"  the same layer with the plan "triton_sorted+triton_split": rows taken in adapter order, each tile
            computing only its own adapters' ranks (gated with dropout: the sorted variant runs without),
  "loop"    the algorithm of PEFT's mixed-batch path (forward with adapter_names=): the base GEMM, then a Python
            loop over the adapters present, each on its rows (index, lora_A, lora_B, scale, index_add).
Modes: "fwd" (inference, no grad) and "fwd+bwd" (grads of x and of every adapter).
"""

from __future__ import annotations

import dataclasses

import torch

from lora_kernels import FusedLoRALinear, lora_linear

PROVIDERS = ("base", "single", "mixed", "sorted", "loop")
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class MixedCase:
    M: int
    K: int
    N: int
    r: int
    adapters: int
    dtype: str = "bf16"

    @property
    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} {self.adapters} adapters r={self.r} {self.dtype}"


def cases(quick: bool = False):
    if quick:
        return [MixedCase(48, 64, 48, 4, 3, "fp32")]
    return [MixedCase(4096, 4096, 4096, 16, 8), MixedCase(32, 4096, 4096, 16, 32), MixedCase(1024, 4096, 4096, 16, 8)]


SORTED = "triton_sorted+triton_split"  # the plan of the "sorted" provider


def build(provider: str, case: MixedCase, device):
    """{mode: callable} for one provider on one case."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(case.M, case.K).requires_grad_(True)
    w = rnd(case.N, case.K, scale=case.K ** -0.5)
    As = [rnd(case.r, case.K, scale=case.K ** -0.5).requires_grad_(True) for _ in range(case.adapters)]
    Bs = [rnd(case.N, case.r, scale=0.1).requires_grad_(True) for _ in range(case.adapters)]
    ids = torch.randint(0, case.adapters, (case.M,), generator=g).to(device)
    if case.M == case.adapters:  # decode: one request per adapter
        ids = torch.arange(case.M, device=device)
    scalings = [2.0] * case.adapters
    params = [x, *As, *Bs]

    if provider == "base":
        def fwd():
            return x @ w.t()
    elif provider == "single":
        def fwd():
            return lora_linear(x, w, None, As[0], Bs[0], 2.0)
    elif provider in ("mixed", "sorted"):
        # adapters in W0's dtype, as the "single" provider's (fp32 ones would add a cast per adapter in training)
        layer = FusedLoRALinear(case.K, case.N, r=case.r, lora_alpha=2.0 * case.r, bias=False, _weight=w,
                                lora_dtype=w.dtype, backend=SORTED if provider == "sorted" else "auto")
        for i in range(1, case.adapters):
            layer.add_adapter(f"a{i}", r=case.r, lora_alpha=2.0 * case.r)
        with torch.no_grad():
            adapter_As = [a.lora_A for a in layer.adapters.values()]
            adapter_Bs = [a.lora_B for a in layer.adapters.values()]
            for dst, src in zip(adapter_As + adapter_Bs, As + Bs):
                dst.copy_(src)
        params = [x, *adapter_As, *adapter_Bs]

        def fwd():
            return layer(x, adapter_ids=ids)
    elif provider == "loop":
        def fwd():
            y = x @ w.t()
            for i in ids.unique().tolist():
                rows = (ids == i).nonzero().flatten()
                sub = x.index_select(0, rows)
                y = y.index_add(0, rows, (sub @ As[i].t() @ Bs[i].t()) * scalings[i])
            return y
    else:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")

    def inference():
        with torch.no_grad():
            return fwd()

    def train():
        for t in params:
            t.grad = None
        fwd().float().sum().backward()

    return {"fwd": inference, "fwd+bwd": train}
