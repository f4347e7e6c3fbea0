"""Host cost of one layer call, without the kernels: what a decode step pays per LoRA layer besides GPU time.

At decode sizes a layer's kernels take ~10-30 us of GPU time, so the Python and dispatcher work around them decides
whether the GPU waits. This measures that work on any machine (CPU is enough): the backend's kernels are replaced by
stand-ins that only allocate their outputs, and each call is counted in ATen ops dispatched (each a launch or a view
on a GPU) and timed in microseconds of host time.

    python -m bench.host [--adapters 1,8,32] [--calls 2000]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_kernels import FusedLoRALinear, backends


class CountOps(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block (each a kernel launch or a view on a GPU)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def kernels_stubbed(name: str = "torch"):
    """The backend's forward and mixed forward replaced by output allocation alone."""
    impl = backends.BACKENDS[name]
    saved = impl.forward, impl.mixed_forward

    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa):
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((0,))

    def mixed_forward(x, weight, bias, lora_A, lora_B, ids, owner, scalings, dropout_ps, seed, save):
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((0,))

    impl.forward, impl.mixed_forward = staticmethod(forward), staticmethod(mixed_forward)
    try:
        yield
    finally:
        impl.forward, impl.mixed_forward = saved


def measure(fn, calls: int) -> tuple[int, float]:
    """(ATen ops per call, median host microseconds per call over 5 rounds)."""
    fn()
    with CountOps() as ops:
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sum(ops.counts.values()), sorted(rounds)[2]


def rows(adapter_counts, calls: int, K: int = 256, M: int = 32):
    out = []
    with kernels_stubbed("torch"), torch.no_grad():
        for n in adapter_counts:
            layer = FusedLoRALinear(K, K, r=16, backend="torch").eval()
            for i in range(n - 1):
                layer.add_adapter(f"a{i}", r=16)
            x = torch.randn(M, K)
            ids = torch.arange(M) % n
            if n == 1:
                ops, us = measure(lambda: layer(x), calls)
                out.append({"call": "single adapter", "adapters": 1, "aten_ops": ops, "host_us": round(us, 1)})
            ops, us = measure(lambda: layer(x, adapter_ids=ids), calls)
            out.append({"call": "mixed batch", "adapters": n, "aten_ops": ops, "host_us": round(us, 1)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="1,8,32")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    print("host cost per FusedLoRALinear call in inference (kernels stubbed out; 32 rows, K = N = 256, r = 16)")
    for row in rows([int(n) for n in args.adapters.split(",")], args.calls):
        print(f"  {row['call']:15s} adapters={row['adapters']:3d}  ATen ops={row['aten_ops']:3d}  "
              f"host {row['host_us']:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
