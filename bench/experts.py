"""One MoE experts block, forward + backward, LoRA on its projections: ``python -m bench.experts``.

Every expert of one MoE layer at a real model's width (random weights, random top-k routing of T tokens), LoRA on
gate_up_proj and down_proj. Contenders, with the same weights, routing and adapters:

  frozen        transformers' grouped_mm experts forward, no adapter: the floor
  peft          PEFT 0.21's ``target_parameters`` (ParamWrapper: W0 + s B A formed per expert, baddbmm)
  aten          ``inject(target_parameters=...)`` forced to the split-LoRA ATen composition (grouped products)
  lora_kernels  ``inject(target_parameters=...)`` with ``auto`` (the Triton grouped kernels on a GPU)

On a GPU: milliseconds per forward + backward (CUDA events, median of rounds), the ratios the targets read (PEFT over
lora_kernels; lora_kernels over the frozen floor times 1 + LoRA's share of the FLOPs), and the outputs and LoRA grads
of every contender against PEFT's (a benchmark of a wrong result is worthless). On CPU: a tiny config that checks the
same agreement (times not worth reading).

    python -m bench.experts [--models qwen3-30b-a3b,gpt-oss-20b] [--tokens 4096] [--r 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import lora_kernels  # noqa: E402

from .memory import EXPERTS_MODELS, ExpertsBlock  # noqa: E402

CONTENDERS = ("frozen", "peft", "aten", "lora_kernels")
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
TINY = {"qwen3_moe": dict(hidden_size=64, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2),
        "mixtral": dict(hidden_size=64, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "gpt_oss": dict(hidden_size=64, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)}


class RoutedBlock(ExpertsBlock):
    """An experts block with a fixed random routing for its token count (the same for every contender)."""

    def forward(self, x):
        g = torch.Generator(device="cpu").manual_seed(x.shape[0])
        E = self.experts.num_experts
        index = torch.stack([torch.randperm(E, generator=g)[:self.top_k] for _ in range(x.shape[0])]).to(x.device)
        weights = torch.softmax(torch.randn(x.shape[0], self.top_k, generator=g), -1).to(x.device, x.dtype)
        return self.experts(x, index, weights)


def build(name: str, device, dtype, tiny: bool) -> RoutedBlock:
    import importlib

    import transformers

    module, config_cls, experts_cls, kwargs, _ = EXPERTS_MODELS[name]
    kwargs = TINY[module] if tiny else kwargs
    config = getattr(transformers, config_cls)(**kwargs)
    config._experts_implementation = "grouped_mm" if dtype != torch.float64 else "eager"
    lib = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    torch.manual_seed(0)
    experts = getattr(lib, experts_cls)(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        for prm in experts.parameters():
            prm.normal_(std=prm.shape[-1] ** -0.5 if prm.dim() == 3 else 0.02)
            prm.requires_grad_(False)
    return RoutedBlock(experts, kwargs["num_experts_per_tok"])


def contenders(name: str, device, dtype, r: int, tiny: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    frozen = build(name, device, dtype, tiny)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(frozen), config)
    out = {"frozen": frozen, "peft": peft}
    for contender, backend in (("aten", "aten"), ("lora_kernels", "auto")):
        model = lora_kernels.inject(copy.deepcopy(frozen), target_parameters=TARGETS, r=r, lora_alpha=2 * r,
                                    backend=backend)
        with torch.no_grad():  # PEFT's adapters, in the same layout
            for layer_name, layer in lora_kernels.experts_layers(model).items():
                wrapped = peft.base_model.model.get_submodule(layer_name)
                while hasattr(wrapped, "parameter_name"):
                    factors = layer.adapters[wrapped.parameter_name]
                    factors.lora_A.copy_(wrapped.lora_A["default"].weight)
                    factors.lora_B.copy_(wrapped.lora_B["default"].weight)
                    wrapped = wrapped.base_layer
        out[contender] = model
    return out


def step(model, x, gy):
    x.grad = None
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.backward(gy)
    return y


def lora_grads(model) -> dict:
    """{projection: (dA, dB)} in PEFT's layout, whatever the contender."""
    out = {}
    for module in model.modules():
        if hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
            out[module.parameter_name] = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
        elif isinstance(module, lora_kernels.LoRAExperts):
            out.update((n, (f.lora_A.grad, f.lora_B.grad)) for n, f in module.adapters.items())
    return out


def timed(fn, device) -> float:
    """Milliseconds per call: CUDA events around back-to-back calls on a GPU (median of 5 rounds), the wall clock
    otherwise."""
    if device.type == "cuda":
        from lora_kernels.plan import cuda_event_timer

        return cuda_event_timer("experts", fn) * 1e3
    fn()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        rounds.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(rounds)


def lora_flops_share(name: str, r: int) -> float:
    """LoRA's FLOPs over the frozen block's (forward x W0^T and backward dX per projection): 6 r (K + N) / (4 K N)
    summed over both projections (dA, dB, G and the low-rank terms of y and dX)."""
    kw = EXPERTS_MODELS[name][3]
    H = kw["hidden_size"]
    inter = kw.get("moe_intermediate_size", kw.get("intermediate_size"))
    shapes = ((H, 2 * inter), (inter, H))  # (K, N) of gate_up and down
    base = sum(4 * K * N for K, N in shapes)
    return sum(6 * r * (K + N) for K, N in shapes) / base


def row(name: str, tokens: int, r: int, device, dtype, tiny: bool) -> dict:
    models = contenders(name, device, dtype, r, tiny)
    H = models["frozen"].experts.gate_up_proj.shape[-1 if not models["frozen"].experts.is_transposed else 1]
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(tokens, H, generator=g).to(device, dtype).requires_grad_()
    gy = torch.randn(tokens, H, generator=g).to(device, dtype)
    results = {c: step(m, x, gy).detach() for c, m in models.items()}
    dx = {}
    for c, m in models.items():
        step(m, x, gy)
        dx[c] = (x.grad.clone(), lora_grads(m))
    out = {"model": name, "tokens": tokens, "r": r, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    peft_y, (peft_dx, peft_g) = results["peft"], dx["peft"]
    scale = peft_y.abs().max().item() or 1.0

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / max(b.float().abs().max(), 1e-30)).item()

    for c in ("aten", "lora_kernels"):  # agreement with PEFT, relative to its largest magnitude (dx and the factors)
        err = (results[c].float() - peft_y.float()).abs().max().item() / scale
        gerr = max([rel(dx[c][0], peft_dx)] + [rel(dx[c][1][n][i], peft_g[n][i]) for n in peft_g for i in (0, 1)])
        out[f"{c}_rel_err_y"], out[f"{c}_rel_err_grads"] = round(err, 6), round(gerr, 6)
    for c, m in models.items():
        out[f"{c}_ms"] = round(timed(lambda m=m: step(m, x, gy), device), 3)
    share = lora_flops_share(name, r) if not tiny else 0.0
    out["peft_over_lora_kernels"] = round(out["peft_ms"] / out["lora_kernels_ms"], 2)
    out["aten_over_lora_kernels"] = round(out["aten_ms"] / out["lora_kernels_ms"], 2)
    out["lora_kernels_over_floor"] = round(out["lora_kernels_ms"] / (out["frozen_ms"] * (1 + share)), 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-30b-a3b,gpt-oss-20b")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        for tokens in ([int(t) for t in args.tokens.split(",")] if gpu else [48]):
            rows.append(row(name, tokens, args.r if gpu else 4, device, dtype, tiny=not gpu))
            print(rows[-1], flush=True)
    where = f"bf16 on {torch.cuda.get_device_name()}" if gpu else "CPU, tiny configs (agreement only)"
    lines = [f"MoE experts block, forward + backward, {where} ({datetime.date.today()})", "",
             "| model | tokens | frozen ms | PEFT ms | aten ms | lora_kernels ms | PEFT / lora_kernels | "
             "aten / lora_kernels | lora_kernels / (floor x (1 + LoRA FLOPs)) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r_ in rows:
        lines.append(f"| {r_['model']} | {r_['tokens']} | {r_['frozen_ms']} | {r_['peft_ms']} | {r_['aten_ms']} | "
                     f"{r_['lora_kernels_ms']} | {r_['peft_over_lora_kernels']} | {r_['aten_over_lora_kernels']} | "
                     f"{r_['lora_kernels_over_floor']} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "experts.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(args.out, "experts.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
