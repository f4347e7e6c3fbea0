"""Tune plans ahead of time: ``python -m lora_kernels.tune``.

    python -m lora_kernels.tune --shapes 4096x4096x16,4096x14336x16 --tokens 1,16,2048,8192 [--kinds lora,nf4_dq,...]
    python -m lora_kernels.tune --model my_pkg.models:build_model --tokens 16,4096 [--dropout 0.05]

Each (rows, K, N, rank) key is timed as the first call of that key would time it (``lora_kernels.plan``): every
eligible forward and backward variant on scratch inputs, for training (with dropout as given) and for inference,
and the winner is written to the plan cache (``python -m lora_kernels.info`` shows it). ``--model`` takes an import
path ``module:callable`` returning a model whose LoRA layers (``FusedLoRALinear``, or PEFT layers after
``lora_kernels.peft.fuse``) give the shapes; build it on the meta device if you like: only shapes are read.
Needs a CUDA GPU: timings are what the cache stores.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from . import plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


FORMATS = ("nf4", "nf4_dq", "fp4", "fp4_dq", "int8")  # a quantized base's (QLoRA); "dora_<format>": QDoRA
KINDS = ("lora", "dora", *FORMATS)  # and "dora_<format>" (QDoRA), "mixed<n>" (a mixed batch over n adapters),
# "experts<E>" (LoRA on E MoE experts: rows are then slots, tokens times top-k)


def kind_fields(kind: str) -> dict:
    """The Call fields of a kind of call: {"dora", "quant"}, {"adapters"} or {"experts"}."""
    if kind.startswith("mixed") and kind[5:].isdigit():
        return {"adapters": int(kind[5:])}
    if kind.startswith("experts") and kind[7:].isdigit():
        return {"experts": int(kind[7:])}
    quant = kind[5:] if kind.startswith("dora_") else ("" if kind in ("lora", "dora") else kind)
    if quant and quant not in FORMATS:
        raise ValueError(f"kind: expected one of {KINDS}, dora_<format>, mixed<n> or experts<E>, got {kind!r}")
    return {"dora": kind == "dora" or kind.startswith("dora_"), "quant": quant}


def kind_of(call: plan.Call) -> str:
    """The kind of a call, as kind_fields reads it."""
    if call.adapters:
        return f"mixed{call.adapters}"
    if call.experts:
        return f"experts{call.experts}"
    return ("dora" + (f"_{call.quant}" if call.quant else "")) if call.dora else (call.quant or "lora")


def _layer_kind(base, dora: bool) -> str:
    """A layer's kind from its base layer (quantized or not) and whether the adapter is DoRA."""
    from .quantized import is_quantized_linear, quantized_weight

    quant = quantized_weight(base).quant if is_quantized_linear(base) else ""
    return ("dora" + (f"_{quant}" if quant else "")) if dora else (quant or "lora")


def model_shapes(model: torch.nn.Module) -> list[tuple[int, int, int, float, str]]:
    """(K, N, r, dropout, kind) of every LoRA layer of `model` (each adapter of a layer; kind: "lora", "dora", the
    quantized format of a QLoRA base, "dora_<format>" for QDoRA, "mixed<n>" for the layer's n adapters stacked,
    "experts<E>" for each projection of a LoRAExperts), without duplicates."""
    from .layers import FusedLoRALinear, LoRAExperts, QuantizedLoRALinear

    out = []
    for module in model.modules():
        if isinstance(module, LoRAExperts):
            for f in module.adapters.values():
                out.append((f.in_features, f.out_features, f.r, f.lora_dropout, f"experts{f.experts}"))
        elif isinstance(module, FusedLoRALinear):
            quantized = isinstance(module, QuantizedLoRALinear)
            for adapter in module.adapters.values():
                kind = _layer_kind(module.base_layer if quantized else None, adapter.use_dora)
                out.append((module.in_features, module.out_features, adapter.r, adapter.lora_dropout, kind))
            if len(module.adapters) > 1 and not quantized:
                out.append((module.in_features, module.out_features, sum(a.r for a in module.adapters.values()),
                            max(a.lora_dropout for a in module.adapters.values()), f"mixed{len(module.adapters)}"))
        elif hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and hasattr(module, "fused_backend"):
            base = module.get_base_layer()
            k, n = (base.in_features, base.out_features) if hasattr(base, "in_features") else base.weight.shape[::-1]
            for name, a in module.lora_A.items():
                drop = module.lora_dropout[name]
                kind = _layer_kind(base, name in module.lora_variant)
                out.append((k, n, a.weight.shape[0], getattr(drop, "p", 0.0), kind))
    return list(dict.fromkeys(out))


def load_model(path: str) -> torch.nn.Module:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"--model: expected 'module:callable', got {path!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory


def keys(shapes, tokens, dtype, device, modes, deterministic=False):
    """The calls to tune: each (K, N, r, dropout, kind) at each row count, per mode (train: with dX, dropout as given;
    infer), keyed as the layers of that kind key them (``plan.Call``)."""
    calls = []
    for K, N, r, p, kind in shapes:
        extra = kind_fields(kind)
        for M in tokens:
            for mode in modes:
                grads = 2 if mode == "train" else 0
                calls.append(plan.Call(device, dtype, M, K, N, r, p > 0 and mode == "train", grads, deterministic,
                                       **extra))
    return list(dict.fromkeys(calls))


class Bar:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def step(self, label: str):
        self.done += 1
        filled = 30 * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                         f"{time.time() - self.t0:5.0f}s {label[:50]:50s}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma-separated KxNxr (in_features x out_features x rank)")
    ap.add_argument("--model", help="module:callable returning a model with LoRA layers")
    ap.add_argument("--tokens", default="1,16,1024,4096,8192", help="rows per call (batch x sequence) to tune")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout of --shapes in training (0: none)")
    ap.add_argument("--kinds", default="lora",
                    help=f"kinds of call for --shapes: {', '.join(KINDS)}, dora_<format>, mixed<n>")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--modes", default="train,infer", help="train (forward+backward) and/or infer (forward)")
    ap.add_argument("--backend", default="auto", help="the backend whose plans to tune (default auto)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_kernels.tune needs a CUDA GPU (plans are timings on the GPU that runs them)")
        return 1
    shapes = []
    if args.shapes:
        for s in args.shapes.split(","):
            K, N, r = (int(v) for v in s.lower().split("x"))
            shapes += [(K, N, r, args.dropout, kind.strip()) for kind in args.kinds.split(",")]
    if args.model:
        shapes += model_shapes(load_model(args.model))
    if not shapes:
        ap.error("give --shapes or --model")
    plan.check_name(args.backend)
    device = torch.device("cuda", torch.cuda.current_device())
    calls = keys(shapes, [int(t) for t in args.tokens.split(",")], DTYPES[args.dtype], device,
                 [m.strip() for m in args.modes.split(",")])
    print(f"{torch.cuda.get_device_name(device)}: tuning {len(calls)} keys into {plan.cache_path(device)}")
    bar = Bar(len(calls))
    for call in calls:  # each key printed as it is done (a time-boxed run keeps what it measured)
        t0 = time.time()
        chosen, us = plan.tune(call, args.backend)
        seconds = time.time() - t0
        bar.step(f"M={call.M} K={call.K} N={call.N} r={call.r}")
        mode = "train" + (" p>0" if call.dropout else "") if call.grads else "infer"
        print(f"\nM={call.M} K={call.K} N={call.N} r={call.r} {args.dtype} {kind_of(call)} {mode}: "
              f"{chosen.spec if call.grads else chosen.forward}  (tuned in {seconds:.1f} s)")
        for label, t in sorted(us.items(), key=lambda kv: (kv[0].split(":")[0], kv[1] if isinstance(kv[1], float)
                                                           else float("inf"))):
            kind, name = label.split(":")
            win = name == (chosen.forward if kind == "forward" else chosen.backward)
            print(f"  {kind:8s} {name:22s} {t if isinstance(t, str) else f'{t:10.1f} us'}{'  <- chosen' if win else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
