"""``python -m bench``: LoRA layer microbenchmarks and the paper's Table 1, to CSV, a markdown summary and plots.

    python -m bench                      # the full sweep (GPU), about 5 minutes on an H100
    python -m bench --quick              # a CPU-friendly subset, about a minute on 2 cores
    python -m bench --providers cublas,eager,triton --M 4096,8192 --modes fwd+bwd --no-table1

Timing: triton.testing.do_bench on CUDA (L2 flushed between calls), torch.utils.benchmark on CPU; median
with 20th/80th percentiles. On CPU the Triton provider runs in Triton's interpreter: such rows are marked
"cpu" and measure nothing about the kernels' speed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the CPU path of the kernels

import lora_kernels  # noqa: E402

from . import mixed, providers, table1  # noqa: E402
from .providers import MODES, Case  # noqa: E402

CSV_COLUMNS = ["timestamp", "op", "provider", "mode", "metric", "unit", "M", "K", "N", "r", "dropout", "dtype",
               "p50", "p20", "p80", "plan", "device", "torch", "triton", "cuda", "lora_kernels", "commit"]
ALL_PROVIDERS = ("cublas", "merged", "eager", "peft", "torch", "aten", "triton", "cuda", "auto", "peft_dora", "dora",
                 "peft_qlora", "qlora")


def full_cases():
    """The LLM layer sweep: every M and K x N at r = 16 (dropout 0 and 0.1, bf16), plus r and fp16 variants."""
    cases = [Case(M, K, N, 16, p, "bf16") for M in (1, 16, 128, 1024, 4096, 8192, 16384)
             for K, N in ((4096, 4096), (8192, 8192), (4096, 14336)) for p in (0.0, 0.1)]
    cases += [Case(4096, 4096, 4096, r, p, "bf16") for r in (8, 64) for p in (0.0, 0.1)]
    cases += [Case(M, 4096, 4096, 16, 0.0, "fp16") for M in (16, 4096)]
    return cases


def quick_cases():
    return [Case(64, 128, 96, 8, 0.0, "fp32"), Case(64, 128, 96, 8, 0.1, "fp32")]


def _environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": gpu, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "",
            "lora_kernels": lora_kernels.__version__, "commit": commit or "unknown"}


def measure(fn, device: torch.device, grad_to_none=(), quick=False) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=10, rep=40 if quick else 60, quantiles=[0.5, 0.2, 0.8],
                                             grad_to_none=list(grad_to_none)))
    import torch.utils.benchmark as tb

    def call():
        for t in grad_to_none:
            t.grad = None
        fn()

    call()  # warm-up, excluded
    m = tb.Timer(stmt="call()", globals={"call": call}).blocked_autorange(min_run_time=0.05 if quick else 0.5)
    times = sorted(t * 1e3 for t in m.times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def _peak_memory_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def step(self, label: str):
        self.done += 1
        width = 30
        filled = width * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{time.time() - self.t0:5.0f}s {label[:60]:60s}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_layer(cases, provider_names, modes, device, env, quick=False, progress=None, sink=None, deadline=None):
    """Measure every case; `sink(rows)` receives each case's rows as soon as they exist (so a run that is cut
    short still leaves its CSV rows). Past `deadline` (time.monotonic()), no new case is started."""
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for i, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            print(f"\ntime box reached: {len(cases) - i} of {len(cases)} layer cases not run", file=sys.stderr)
            break
        floor = {}
        for name in provider_names:
            fns, params = providers.build(name, case, device)
            for mode in modes:
                if progress:
                    progress.step(f"{name} {mode} {case.label}")
                fn = fns.get(mode)
                if fn is None:
                    continue
                p50, p20, p80 = measure(fn, device, params, quick)
                if name == "cublas":
                    floor[mode] = p50
                common = dict(timestamp=stamp, op="lora_linear", provider=name, mode=mode, M=case.M, K=case.K,
                              N=case.N, r=case.r, dropout=case.dropout, dtype=case.dtype,
                              plan=providers.plan_of(name, case, device), **env)
                rows.append(dict(common, metric="time", unit="ms", p50=p50, p20=p20, p80=p80))
                if mode in floor:
                    rows.append(dict(common, metric="ratio_to_cublas", unit="x", p50=p50 / floor[mode], p20="", p80=""))
                rows.append(dict(common, metric="tflops", unit="TFLOP/s", p50=case.flops(mode) / p50 / 1e9,
                                 p20="", p80=""))
                rows.append(dict(common, metric="bandwidth", unit="GB/s", p50=case.min_bytes(mode) / p50 / 1e6,
                                 p20="", p80=""))
                if mode == "fwd+bwd":
                    rows.append(dict(common, metric="peak_memory", unit="MiB", p50=_peak_memory_mib(fn, device),
                                     p20="", p80=""))
            del fns, params
        if sink:
            sink([r for r in rows if (r["M"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) ==
                  (case.M, case.K, case.N, case.r, case.dropout, case.dtype)])
    return rows


def run_table1(device, env, quick=False, progress=None, methods=table1.METHODS, sink=None):
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n_layer = 2 if quick else 24
    columns = table1.COLUMNS[2:] if quick else table1.COLUMNS
    import transformers

    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
    base = transformers.GPT2LMHeadModel(cfg)
    for batch, seq, budget in columns:
        for method in methods:
            if progress:
                progress.step(f"table1 {method} {batch}x{seq}")
            model = table1.build(method, budget, device=device, dtype=dtype, base=base)
            p50, p20, p80 = measure(table1.forward_fn(model, batch, seq, device), device, quick=quick)
            rows.append(dict(timestamp=stamp, op=f"gpt2_medium_forward_{n_layer}l", provider=method, mode="fwd",
                             metric="time", unit="ms", M=batch * seq, K=batch, N=seq, r=budget,
                             dropout=0.0, dtype=str(dtype).replace("torch.", ""), p50=p50, p20=p20, p80=p80, **env))
            if sink:
                sink(rows[-1:])
            del model
    return rows


def run_mixed(cases, device, env, quick=False, progress=None, sink=None, deadline=None):
    """Mixed-batch cases (bench/mixed.py): every provider, inference and training."""
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            break
        new = []
        for name in mixed.PROVIDERS:
            fns = mixed.build(name, case, device)
            for mode in mixed.MODES:
                if progress:
                    progress.step(f"mixed {name} {mode} {case.label}")
                p50, p20, p80 = measure(fns[mode], device, (), quick)
                new.append(dict(timestamp=stamp, op=f"lora_mixed[{case.adapters}]", provider=name, mode=mode,
                                metric="time", unit="ms", M=case.M, K=case.K, N=case.N, r=case.r, dropout=0.0,
                                dtype=case.dtype, p50=p50, p20=p20, p80=p80, **env))
        rows += new
        if sink:
            sink(new)
    return rows


def write_csv(rows, path):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def summary_markdown(rows, env) -> str:
    lines = [f"# Benchmark summary: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda'] or '-'}, lora-kernels "
             f"{env['lora_kernels']} ({env['commit']}), {rows[0]['timestamp'] if rows else ''}", ""]
    if env["device"] == "cpu":
        lines += ["**CPU-only run**: the Triton provider ran in Triton's interpreter; these times say nothing "
                  "about GPU speed.", ""]
    layer = [r for r in rows if r["op"] == "lora_linear" and r["metric"] == "time"]
    if layer:
        provs = [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in layer)]
        lines += ["## LoRA layer: median ms (ratio to cuBLAS `x @ W0^T` / `dY @ W0` floor)", "",
                  "| mode | shape | " + " | ".join(provs) + " |", "|---|---|" + "---|" * len(provs)]
        keys = sorted({(r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) for r in layer},
                      key=lambda k: (MODES.index(k[0]), k[2], k[3], k[1], k[4], k[5], k[6]))
        for key in keys:
            mode, M, K, N, rank, p, dt = key
            cells = []
            for prov in provs:
                hit = [r for r in layer if (r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) == key
                       and r["provider"] == prov]
                if not hit:
                    cells.append("-")
                    continue
                ratio = [r for r in rows if r["metric"] == "ratio_to_cublas" and r["provider"] == prov and
                         (r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) == key]
                cells.append(f"{hit[0]['p50']:.3f}" + (f" ({ratio[0]['p50']:.2f}x)" if ratio else "")
                             + (f" `{hit[0]['plan']}`" if hit[0].get("plan") else ""))
            lines.append(f"| {mode} | M={M} K={K} N={N} r={rank} p={p} {dt} | " + " | ".join(cells) + " |")
        lines += ["", "`auto`: what users get (the planner's choice, measured on this GPU on its first call; its plan "
                  "in each cell).", ""]
    t1 = [r for r in rows if r["op"].startswith("gpt2_medium")]
    if t1:
        lines += [f"## Table 1: {t1[0]['op']} ({t1[0]['dtype']}), median ms (overhead over no adapter)", "",
                  "| method | " + " | ".join(f"{r['K']} x {r['N']}" for r in t1 if r["provider"] == "none")
                  + " |", "|---|" + "---|" * len([r for r in t1 if r["provider"] == "none"])]
        for method in table1.METHODS:
            cells = []
            for none in (r for r in t1 if r["provider"] == "none"):
                hit = [r for r in t1 if r["provider"] == method and r["M"] == none["M"]]
                cells.append(f"{hit[0]['p50']:.2f} ({100 * (hit[0]['p50'] / none['p50'] - 1):+.1f}%)" if hit else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Paper (Quadro RTX8000): Adapter^L +2.2% / +5.0% / +20.7%, Adapter^H +3.0% / +8.4% / "
                  "+30.3% for 32x512 / 16x256 / 1x128.", ""]
    mix = [r for r in rows if r["op"].startswith("lora_mixed")]
    if mix:
        lines += ["## Mixed batches (each row its own adapter): median ms (ratio to `single`)", "",
                  "| mode | case | " + " | ".join(mixed.PROVIDERS) + " |", "|---|---|" + "---|" * len(mixed.PROVIDERS)]
        for key in sorted({(r["mode"], r["op"], r["M"], r["K"], r["N"], r["r"], r["dtype"]) for r in mix}):
            hits = {r["provider"]: r["p50"] for r in mix if (r["mode"], r["op"], r["M"], r["K"], r["N"], r["r"],
                                                             r["dtype"]) == key}
            single = hits.get("single")
            cells = [f"{hits[p]:.3f}" + (f" ({hits[p] / single:.2f}x)" if single else "") if p in hits else "-"
                     for p in mixed.PROVIDERS]
            lines.append(f"| {key[0]} | {key[1].split('[')[1][:-1]} adapters r={key[5]}, M={key[2]} K={key[3]} "
                         f"N={key[4]} {key[6]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(rows, out_dir) -> list[str]:
    """speedup_vs_M.png (fused vs eager and vs cuBLAS, fwd+bwd) and table1.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    written = []
    env_dev = rows[0]["device"] if rows else ""
    layer = [r for r in rows if r["op"] == "lora_linear" and r["metric"] == "time" and r["mode"] == "fwd+bwd"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({(r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) for r in layer})
    for g in groups:
        pts = {}
        for r in layer:
            if (r["K"], r["N"], r["r"], r["dropout"], r["dtype"]) == g:
                pts.setdefault(r["M"], {})[r["provider"]] = r["p50"]
        fused = next((p for p in ("auto", "cuda", "triton") if all(p in v for v in pts.values())), None)
        ms = sorted(m for m, v in pts.items() if fused in v and "eager" in v)
        if fused and ms:
            ax.plot(ms, [pts[m]["eager"] / pts[m][fused] for m in ms], marker="o",
                    label=f"K={g[0]} N={g[1]} r={g[2]} p={g[3]} {g[4]}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup of fused over eager LoRA (fwd+bwd)")
    ax.set_title(f"LoRA layer, {env_dev}" + (" (CPU: interpreter, not a speed figure)" if env_dev == "cpu" else ""))
    if ax.get_legend_handles_labels()[0]:  # (the axhline has no label)
        ax.legend(fontsize=7)
    written.append(save(fig, "speedup_vs_M.png"))

    t1 = [r for r in rows if r["op"].startswith("gpt2_medium")]
    if t1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cols = [r for r in t1 if r["provider"] == "none"]
        width = 0.8 / len(table1.METHODS[1:])
        for i, method in enumerate(table1.METHODS[1:]):
            vals = []
            for none in cols:
                hit = [r for r in t1 if r["provider"] == method and r["M"] == none["M"]]
                vals.append(100 * (hit[0]["p50"] / none["p50"] - 1) if hit else 0.0)
            ax.bar([j + i * width for j in range(len(cols))], vals, width, label=method)
        ax.set_xticks([j + width * (len(table1.METHODS) - 2) / 2 for j in range(len(cols))])
        ax.set_xticklabels([f"{r['K']} x {r['N']}" for r in cols])
        ax.set_ylabel("latency overhead over no adapter (%)")
        ax.set_title(f"Table 1 reproduction ({t1[0]['op']}), {env_dev}")
        ax.legend(fontsize=8)
        written.append(save(fig, "table1.png"))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CPU-friendly subset (about a minute)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--providers", default=",".join(ALL_PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--M", help="comma-separated M values to keep")
    parser.add_argument("--KN", help="comma-separated KxN values to keep, e.g. 4096x4096")
    parser.add_argument("--r", help="comma-separated ranks to keep")
    parser.add_argument("--no-layer", action="store_true", help="skip the layer sweep")
    parser.add_argument("--no-table1", action="store_true", help="skip the Table 1 reproduction")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-batch (many adapters) cases")
    parser.add_argument("--max-minutes", type=float, help="time box: Table 1 first, then layer cases until the "
                        "box is spent; the summary and plots are written either way")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _environment()
    names = [p for p in args.providers.split(",") if p]
    unknown = set(names) - set(ALL_PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {', '.join(ALL_PROVIDERS)}")
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    cases = [] if args.no_layer else (quick_cases() if args.quick else full_cases())
    if args.M:
        cases = [c for c in cases if str(c.M) in args.M.split(",")]
    if args.KN:
        cases = [c for c in cases if f"{c.K}x{c.N}" in args.KN.split(",")]
    if args.r:
        cases = [c for c in cases if str(c.r) in args.r.split(",")]
    n_t1 = 0 if args.no_table1 else len(table1.METHODS) * (1 if args.quick else len(table1.COLUMNS))
    mixed_cases = [] if args.no_mixed else mixed.cases(args.quick)
    progress = Progress(len(cases) * len(names) * len(modes) + n_t1
                        + len(mixed_cases) * len(mixed.PROVIDERS) * len(mixed.MODES))
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    sink = lambda new_rows: write_csv(new_rows, csv_path)  # noqa: E731
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    rows = []
    if not args.no_table1 and deadline is not None:  # time-boxed: the paper's table first
        rows += run_table1(device, env, args.quick, progress, sink=sink)
    rows += run_layer(cases, names, modes, device, env, args.quick, progress, sink, deadline)
    rows += run_mixed(mixed_cases, device, env, args.quick, progress, sink, deadline)
    if not args.no_table1 and deadline is None:
        rows += run_table1(device, env, args.quick, progress, sink=sink)
    summary = summary_markdown(rows, env)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    written = plots_if_possible(rows, args.out)
    print(summary)
    print(f"\nwrote {os.path.join(args.out, 'results.csv')} (appended), summary.md"
          + "".join(", " + os.path.basename(p) for p in written))
    return 0


def plots_if_possible(rows, out_dir, draw=None) -> list:
    """The plots, or none (said once) when matplotlib is missing: the CSV and the summary do not need it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install 'lora-kernels[bench]' brings it)")
        return []
    return (draw or plots)(rows, out_dir)
