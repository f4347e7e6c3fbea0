"""The implementations a LoRA layer is measured with, side by side, on one shape.

Every provider builds, for a case (M, K, N, r, dropout, dtype), callables per mode:
  "fwd"      training forward (autograd graph recorded where the provider trains anything),
  "bwd"      backward only, from graphs recorded beforehand (retain_graph), grads reset each call,
  "fwd+bwd"  both.
Inputs rotate among several buffers so repeated calls do not measure a warm cache.

Providers: "cublas" (the floor: x @ W0^T forward, dY @ W0 backward), "merged" (inference with W0 + s B A,
forward only), "eager" (the layer written as HF PEFT writes it: base(x) + lora_B(lora_A(dropout(x))) * s),
"peft_dora" (PEFT's DoRA layer) and "dora" (this package's DoRA, as `auto` plans it),
"peft" (PEFT's own LoRA Linear, when peft is installed), "torch" / "aten" / "triton" / "cuda" (this package's backend
families, the planner choosing within each), "auto" (what users get: the planner's choice among all of them).
QLoRA (W0 in NF4 with double quantization, bitsandbytes' Linear4bit, compute dtype the case's): "peft_qlora" (PEFT's
LoRA layer over it, bitsandbytes' kernels for the base product) and "qlora" (this package's, as `auto` plans it).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import nn

from lora_kernels import backends, lora_linear, plan, qlora_linear, quantized_weight
from lora_kernels.quantized import quantize_linear
from lora_kernels.dora import dora_linear, dora_weight_norm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    dropout: float
    dtype: str

    @property
    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} p={self.dropout} {self.dtype}"

    def flops(self, mode: str) -> float:
        """Model FLOPs of the LoRA layer (the same for every provider, so TFLOP/s compare)."""
        M, K, N, r = self.M, self.K, self.N, self.r
        fwd = 2 * M * K * N + 2 * M * K * r + 2 * M * N * r
        bwd = 2 * M * N * K + 2 * M * N * r * 2 + 2 * M * K * r * 2  # dX, G and dB, dA and G A
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def min_bytes(self, mode: str) -> float:
        """Bytes a perfect implementation moves: each operand read once, each result written once."""
        e = DTYPES[self.dtype].itemsize
        M, K, N = self.M, self.K, self.N
        fwd = (M * K + N * K + M * N) * e
        bwd = (M * N + N * K + M * K * 2) * e  # read dY, W0, x; write dX
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


class _Ring:
    """Round-robin over a few input buffers (and their matching state)."""

    def __init__(self, items):
        self.items = list(items)
        self._it = itertools.cycle(range(len(self.items)))

    def next(self):
        return self.items[next(self._it)]


def n_buffers(case: Case, device: torch.device) -> int:
    """Enough copies of x that consecutive calls never find it in L2 (about 50 MB on an H100)."""
    if device.type != "cuda":
        return 2
    size = case.M * case.K * DTYPES[case.dtype].itemsize
    return max(2, min(8, -(-100 * 2**20 // max(size, 1))))


@dataclasses.dataclass
class Layer:
    """The tensors of one case: frozen W0, trainable A and B (non-zero, so nothing is skipped), DoRA's magnitude."""
    weight: torch.Tensor
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scaling: float
    magnitude: nn.Parameter | None = None
    _quantized: nn.Module | None = None

    def quantized(self) -> nn.Module:
        """W0 as a bitsandbytes Linear4bit (NF4, double quantization), made once."""
        if self._quantized is None:
            N, K = self.weight.shape
            dense = nn.Linear(K, N, bias=False, device="meta")
            dense.weight = nn.Parameter(self.weight, requires_grad=False)
            self._quantized = quantize_linear(dense, compute_dtype=self.weight.dtype)
        return self._quantized

    @classmethod
    def make(cls, case: Case, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = DTYPES[case.dtype]
        mk = lambda *s, scale: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)  # noqa: E731
        layer = cls(mk(case.N, case.K, scale=case.K**-0.5), nn.Parameter(mk(case.r, case.K, scale=case.K**-0.5)),
                    nn.Parameter(mk(case.N, case.r, scale=case.r**-0.5)), 2.0)
        norm = dora_weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)[0]
        layer.magnitude = nn.Parameter((norm * 1.1).to(dt))  # off the norms: the magnitude counts
        return layer


def eager_forward(x, layer: Layer, p: float):
    """PEFT's LoRA Linear forward, written out: base(x) + lora_B(lora_A(dropout(x))) * scaling."""
    result = nn.functional.linear(x, layer.weight)
    dropped = nn.functional.dropout(x, p, training=True) if p > 0 else x
    return result + nn.functional.linear(nn.functional.linear(dropped, layer.lora_A), layer.lora_B) * layer.scaling


def _peft_layer(layer: Layer, case: Case, use_dora: bool = False):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = nn.Linear(case.K, case.N, bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
    base.weight = nn.Parameter(layer.weight, requires_grad=False)
    cfg = LoraConfig(r=case.r, lora_alpha=layer.scaling * case.r, lora_dropout=case.dropout, target_modules=["x"],
                     use_dora=use_dora)
    module = PeftLinear(base, "default", config=cfg, r=case.r, lora_alpha=layer.scaling * case.r,
                        lora_dropout=case.dropout, use_dora=use_dora)
    module.lora_A["default"].weight = layer.lora_A
    module.lora_B["default"].weight = layer.lora_B
    if use_dora:
        module.lora_magnitude_vector["default"].weight = layer.magnitude
    return module.train()


def _peft_qlora_layer(layer: Layer, case: Case):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(layer.quantized()), LoraConfig(
        r=case.r, lora_alpha=layer.scaling * case.r, lora_dropout=case.dropout, target_modules=["0"]))
    module = model.base_model.model[0]
    module.lora_A["default"].weight = layer.lora_A
    module.lora_B["default"].weight = layer.lora_B
    return module.train()


def forward_fn(provider: str, layer: Layer, case: Case):
    """x -> y for a provider (None if the provider cannot run here)."""
    p = case.dropout
    if provider == "cublas":
        return lambda x: x @ layer.weight.t()
    if provider == "merged":
        merged = (layer.weight.float() + layer.scaling * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
                  ).to(layer.weight.dtype)
        return lambda x: nn.functional.linear(x, merged)
    if provider == "eager":
        return lambda x: eager_forward(x, layer, p)
    if provider in ("peft", "peft_dora"):
        try:
            module = _peft_layer(layer, case, use_dora=provider == "peft_dora")
        except ImportError:
            return None
        return module
    if provider in ("peft_qlora", "qlora"):
        try:
            if provider == "peft_qlora":
                return _peft_qlora_layer(layer, case)
            qweight = quantized_weight(layer.quantized())
        except ImportError:  # no bitsandbytes (or peft)
            return None
        return lambda x: qlora_linear(x, qweight, None, layer.lora_A, layer.lora_B, layer.scaling, p)
    if provider == "dora":
        return lambda x: dora_linear(x, layer.weight, None, layer.lora_A, layer.lora_B, layer.magnitude,
                                     layer.scaling, p)
    if provider in ("torch", "aten", "triton", "cuda", "auto"):
        if provider != "auto" and backends.BACKENDS[provider].unavailable_reason(layer.weight.device,
                                                                                 layer.weight.dtype):
            return None
        return lambda x: lora_linear(x, layer.weight, None, layer.lora_A, layer.lora_B, layer.scaling, p,
                                     backend=provider)
    raise ValueError(f"unknown provider {provider!r}")


TRAINABLE = {"eager", "peft", "peft_dora", "torch", "aten", "triton", "cuda", "auto", "dora", "peft_qlora",
             "qlora"}  # with a backward


def plan_of(provider: str, case: Case, device) -> str:
    """The plan a provider of this package ran for the case's training call ("" for the others): the planner's
    memory after the timing runs."""
    if provider not in ("torch", "aten", "triton", "cuda", "auto", "dora", "qlora"):
        return ""
    call = plan.Call(torch.device(device), DTYPES[case.dtype], case.M, case.K, case.N, case.r, case.dropout > 0, 2,
                     torch.are_deterministic_algorithms_enabled(), 0, "nf4_dq" if provider == "qlora" else "")
    provider = "auto" if provider in ("dora", "qlora") else provider
    try:
        return plan.choose(call, provider, measure=False).spec
    except Exception:  # a backend that cannot run here has no plan
        return ""


def build(provider: str, case: Case, device: torch.device):
    """{mode: callable} for a provider on a case, plus the tensors to reset; {} if it cannot run here."""
    layer = Layer.make(case, device)
    fwd = forward_fn(provider, layer, case)
    if fwd is None:
        return {}, []
    dt = DTYPES[case.dtype]
    nbuf = n_buffers(case, device)
    xs = [torch.randn(case.M, case.K, device=device, dtype=dt, requires_grad=provider != "merged")
          for _ in range(nbuf)]
    dys = [torch.randn(case.M, case.N, device=device, dtype=dt) for _ in range(nbuf)]
    params = [layer.lora_A, layer.lora_B] + xs + ([layer.magnitude] if "dora" in provider else [])
    if provider == "cublas":
        w = layer.weight
        ring = _Ring(zip(xs, dys))

        def floor_fwd():
            x, _ = ring.next()
            return x.detach() @ w.t()

        def floor_bwd():
            _, dy = ring.next()
            return dy @ w

        def floor_both():
            x, dy = ring.next()
            return x.detach() @ w.t(), dy @ w

        return {"fwd": floor_fwd, "bwd": floor_bwd, "fwd+bwd": floor_both}, []
    if provider == "merged":
        ring = _Ring(xs)
        return {"fwd": lambda: fwd(ring.next())}, []
    ring = _Ring(zip(xs, dys))

    def train_fwd():
        x, _ = ring.next()
        return fwd(x)

    def train_both():
        x, dy = ring.next()
        fwd(x).backward(dy)

    graphs = None

    def train_bwd():
        nonlocal graphs
        if graphs is None:  # recorded on first use, outside what is timed after warm-up
            graphs = _Ring([(fwd(x), dy) for x, dy in zip(xs, dys)])
        y, dy = graphs.next()
        y.backward(dy, retain_graph=True)

    return {"fwd": train_fwd, "bwd": train_bwd, "fwd+bwd": train_both}, params
