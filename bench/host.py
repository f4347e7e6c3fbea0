"""Host cost of a layer call, without the kernels: what a step pays per LoRA layer besides GPU time.

At small batches a layer's kernels take ~10-30 us of GPU time, so the Python and dispatcher work around them decides
whether the GPU waits. This measures that work on any machine (CPU is enough): every ATen op runs for real (on tiny
tensors, a few microseconds each, about what launching it costs on a GPU), while Triton kernel launches are
stubbed at the launch boundary and counted; each is charged ``--launch-us`` (10 us: a Triton 3.x launch on a fast
host). Reported per call: ATen ops dispatched, Triton launches, and host microseconds (measured + charged).

    python -m bench.host [--train] [--adapters 1,8,32] [--calls 2000] [--launch-us 10] [--out DIR]

--train: one training step (forward + backward) of one layer, M=16, K=64, N=48, r=8, bf16 base with fp32
adapters (PEFT's default), one thread: PEFT's own LoRA Linear, the eager composition, and FusedLoRALinear under
each plan (``auto``'s static default on a GPU, and every other plan that fits).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the launchers' CPU path

from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lora_kernels import FusedLoRALinear, plan  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block (each a kernel launch or a view on a GPU)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class Launches:
    count = 0


@contextlib.contextmanager
def triton_launches_stubbed():
    """Every Triton kernel launch (autotuned, JIT, or interpreted) replaced by a counter: the launchers' Python runs,
    the kernels do not (their outputs stay as allocated)."""
    from triton.runtime import autotuner, interpreter, jit

    def launch(self, *args, **kwargs):
        Launches.count += 1

    targets = [(autotuner.Autotuner, "run"), (jit.JITFunction, "run"), (interpreter.InterpretedFunction, "run")]
    saved = [(cls, name, cls.__dict__[name]) for cls, name in targets]
    for cls, name in targets:
        setattr(cls, name, launch)
    try:
        yield Launches
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def measure(fn, calls: int, launch_us: float = 10.0) -> dict:
    """ATen ops and Triton launches per call, and host microseconds per call (median of 5 rounds) with each launch
    charged `launch_us`."""
    fn()
    with CountOps() as ops:
        before = Launches.count
        fn()
        launches = Launches.count - before
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    measured = statistics.median(rounds)
    return {"aten_ops": sum(ops.counts.values()), "launches": launches, "measured_us": round(measured, 1),
            "host_us": round(measured + launches * launch_us, 1)}


def rows(adapter_counts, calls: int, K: int = 256, M: int = 32, launch_us: float = 10.0):
    """Inference calls of one layer, bf16 (single adapter, and mixed batches over n adapters), as the Triton family's
    static plans run them."""
    out = []
    with triton_launches_stubbed(), torch.no_grad():
        for n in adapter_counts:
            layer = FusedLoRALinear(K, K, r=16, backend="triton", dtype=torch.bfloat16).eval()
            for i in range(n - 1):
                layer.add_adapter(f"a{i}", r=16)
            x = torch.randn(M, K, dtype=torch.bfloat16)
            ids = torch.arange(M) % n
            if n == 1:
                out.append({"call": "single adapter", "adapters": 1, **measure(lambda: layer(x), calls, launch_us)})
            out.append({"call": "mixed batch", "adapters": n,
                        **measure(lambda: layer(x, adapter_ids=ids), calls, launch_us)})
        try:  # QLoRA: the same call over an NF4 base layer (bitsandbytes), the 4-bit kernel's plan
            from lora_kernels.quantized import quantize_linear

            base = quantize_linear(nn.Linear(K, K, bias=False, dtype=torch.bfloat16), compute_dtype=torch.bfloat16)
            layer = FusedLoRALinear.from_linear(base, r=16, backend="triton_quantized+triton_split").eval()
            x = torch.randn(M, K, dtype=torch.bfloat16)
            out.append({"call": "QLoRA (nf4)", "adapters": 1, **measure(lambda: layer(x), calls, launch_us)})
        except ImportError:  # no bitsandbytes
            pass
    return out


# ------------------------------------------------------------------------------------------------------------
# Training step, side by side with PEFT
# ------------------------------------------------------------------------------------------------------------
def gpu_default_spec(M, K, N, r, dropout: bool, dtype=torch.bfloat16) -> str:
    """The plan `auto` runs on a GPU for this training call where nothing is measured (the static default)."""
    chosen = plan.static_plan(plan.Call(torch.device("cuda"), dtype, M, K, N, r, dropout, 2, False))
    return f"{chosen.forward}+{chosen.backward}"


def _peft_layer(base: nn.Linear, r: int, alpha: float, p: float):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p,
                                                           target_modules=["0"], init_lora_weights=False))
    return model.base_model.model[0].train()


class EagerLoRA(nn.Module):
    """The layer as PEFT writes it, without PEFT's bookkeeping: base(x) + lora_B(lora_A(dropout(x))) * s, with the
    adapters in x's dtype (no casts)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, p: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def train_rows(calls: int = 300, M: int = 16, K: int = 64, N: int = 48, r: int = 8, dtype=torch.bfloat16,
               dropouts=(0.0, 0.1), launch_us: float = 10.0, plans=None):
    """One training step (forward + backward) per call: [{layer, plan, dropout, aten_ops, launches, host_us, ...}]."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        with triton_launches_stubbed():
            for p in dropouts:
                torch.manual_seed(0)
                base = nn.Linear(K, N, bias=False, dtype=dtype)
                base.weight.requires_grad_(False)
                x = torch.randn(M, K, dtype=dtype, requires_grad=True)
                dy = torch.randn(M, N, dtype=dtype)
                contenders = []
                try:
                    contenders.append(("peft", "PEFT LoRA Linear (fp32 adapters)", _peft_layer(base, r, 2 * r, p)))
                except ImportError:
                    pass
                contenders.append(("eager", "eager composition (bf16 adapters)", EagerLoRA(base, r, 2 * r, p)))
                default = gpu_default_spec(M, K, N, r, p > 0, dtype)
                specs = plans or [default] + [s for s in ("aten+aten", "triton_xa_first+aten",
                                                          "triton_xa_first+triton_split", "triton_fused+triton_split",
                                                          "triton_cublas+triton_split") if s != default]
                for spec in specs:
                    fwd = plan.parse_spec(spec).forward
                    if fwd == "triton_fused" and p > 0:
                        continue
                    layer = FusedLoRALinear.from_linear(base, r=r, lora_alpha=2 * r, lora_dropout=p, backend=spec,
                                                        init_lora_weights=False).train()
                    label = "lora_kernels " + spec + (" (auto's static default on a GPU)" if spec == default else "")
                    contenders.append(("lora_kernels", label, layer))
                for kind, label, layer in contenders:
                    params = [t for t in layer.parameters() if t.requires_grad]

                    def step(layer=layer, params=params):
                        x.grad = None
                        for t in params:
                            t.grad = None
                        layer(x).backward(dy)

                    out.append({"layer": kind, "label": label, "dropout": p, **measure(step, calls, launch_us)})
    finally:
        torch.set_num_threads(threads)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="a training step of one layer, side by side with PEFT")
    ap.add_argument("--adapters", default="1,8,32")
    ap.add_argument("--calls", type=int, default=None)
    ap.add_argument("--launch-us", type=float, default=10.0, help="host cost charged per Triton launch")
    ap.add_argument("--out", default=None, help="folder for host.csv")
    args = ap.parse_args(argv)
    if args.train:
        table = train_rows(calls=args.calls or 300, launch_us=args.launch_us)
        print(f"host time of one training step (forward + backward) of one layer: M=16 K=64 N=48 r=8, bf16 base, one "
              f"thread, ATen ops real, Triton launches stubbed and charged {args.launch_us:g} us each")
        for p in sorted({row["dropout"] for row in table}):
            ref = next((row["host_us"] for row in table if row["dropout"] == p and row["layer"] == "peft"), None)
            print(f"\n  dropout {p}")
            for row in (r for r in table if r["dropout"] == p):
                ratio = f"{row['host_us'] / ref:5.2f}x PEFT" if ref else ""
                print(f"    {row['label']:66s} ATen ops {row['aten_ops']:3d}  launches {row['launches']}  "
                      f"host {row['host_us']:7.1f} us  {ratio}")
    else:
        table = rows([int(n) for n in args.adapters.split(",")], args.calls or 2000, launch_us=args.launch_us)
        print(f"host cost per FusedLoRALinear call in inference (Triton launches stubbed, charged {args.launch_us:g} "
              "us each; 32 rows, K = N = 256, r = 16, bf16)")
        for row in table:
            print(f"  {row['call']:15s} adapters={row['adapters']:3d}  ATen ops={row['aten_ops']:3d}  "
                  f"launches={row['launches']}  host {row['host_us']:7.1f} us")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_train.csv" if args.train else "host.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
