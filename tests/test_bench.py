"""The benchmark harness: every provider computes the right thing (a benchmark of a wrong kernel is worthless),
the outputs have their columns, the plots are written, --quick runs. No timing is asserted."""

import csv
import os

import pytest
import torch

from conftest import DEVICE, assert_parity
from lora_kernels import reference

bench_providers = pytest.importorskip("bench.providers")
from bench import mixed, run, table1  # noqa: E402
from bench.providers import Case, Layer, build, forward_fn  # noqa: E402

CASE = Case(M=24, K=40, N=36, r=4, dropout=0.0, dtype="fp32")


@pytest.mark.parametrize("provider", ["merged", "eager", "peft", "torch", "aten", "triton", "auto"])
def test_provider_forward_and_grads_match_reference(provider):
    if provider == "peft":
        pytest.importorskip("peft")
    layer = Layer.make(CASE, DEVICE)
    fwd = forward_fn(provider, layer, CASE)
    assert fwd is not None
    x = torch.randn(CASE.M, CASE.K, device=DEVICE, requires_grad=True)
    y = fwd(x)
    args = (layer.weight, None, layer.lora_A.detach(), layer.lora_B.detach())
    same, xa = reference.lora_forward(x.detach(), *args, layer.scaling)
    ref64, xa64 = reference.lora_forward(x.detach().double(), *[a.double() if a is not None else None for a in args],
                                         layer.scaling)
    # merged: W0 + s B A is rounded once to fp32 before the product, which the floor allows for
    assert_parity(f"{provider} y", y, same, ref64, floor_ulps=8 if provider == "merged" else 2)
    if provider == "merged":
        return
    gy = torch.randn_like(y)
    y.backward(gy)
    g_same = reference.lora_backward(gy, x.detach(), layer.weight, args[2], args[3], xa, layer.scaling)
    g64 = reference.lora_backward(gy.double(), x.detach().double(), layer.weight.double(), args[2].double(),
                                  args[3].double(), xa64, layer.scaling)
    for name, out, s, r in zip(("dx", "dA", "dB"), (x.grad, layer.lora_A.grad, layer.lora_B.grad), g_same, g64):
        assert_parity(f"{provider} {name}", out, s, r)


def test_cublas_floor_is_the_base_gemm():
    fns, _ = build("cublas", CASE, DEVICE)
    y, dx = fns["fwd+bwd"]()
    assert y.shape == (CASE.M, CASE.N) and dx.shape == (CASE.M, CASE.K)


def test_every_mode_runs_for_every_provider():
    for provider in ("cublas", "merged", "eager", "triton"):
        fns, params = build(provider, CASE, DEVICE)
        for mode, fn in fns.items():
            for _ in range(3):  # the rings rotate; the backward graphs are reused
                fn()


def test_adapter_budgets_match_the_paper():
    for method, per_block in (("adapter_H", 2), ("adapter_L", 1)):
        for budget in (0.5e6, 11e6):
            b = table1.bottleneck(method, budget, 1024, 24)
            params = 24 * per_block * (2 * 1024 * b + b + 1024)
            assert abs(params - budget) / budget < 0.1


def test_table1_models_run_and_adapters_are_inserted():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=1024, n_head=16, n_positions=64, vocab_size=128)
    base = transformers.GPT2LMHeadModel(cfg)
    outs = {}
    for method in table1.METHODS:
        model = table1.build(method, 11e6, base=base)
        if method.startswith("adapter"):
            assert len(model.adapters) == (4 if method == "adapter_H" else 2)
        outs[method] = table1.forward_fn(model, 1, 8, "cpu")()
        assert outs[method].shape == (1, 8, 128)
    assert not torch.equal(outs["adapter_H"], outs["none"])  # the adapters are in the forward


def test_quick_run_writes_csv_summary_and_plots(tmp_path):
    assert run.main(["--quick", "--out", str(tmp_path), "--providers", "cublas,eager,triton,auto",
                     "--no-table1"]) == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == run.CSV_COLUMNS
    layer_rows = [r for r in rows if r["op"] == "lora_linear"]
    assert {r["provider"] for r in layer_rows} == {"cublas", "eager", "triton", "auto"}
    assert {r["plan"] for r in layer_rows if r["provider"] in ("cublas", "eager")} == {""}
    assert all("+" in r["plan"] for r in layer_rows if r["provider"] in ("triton", "auto"))
    assert {r["provider"] for r in rows if r["op"].startswith("lora_mixed")} == set(mixed.PROVIDERS)
    assert {r["metric"] for r in rows} >= {"time", "ratio_to_cublas", "tflops", "bandwidth", "peak_memory"}
    assert all(float(r["p50"]) > 0 for r in rows if r["metric"] == "time")
    summary = (tmp_path / "summary.md").read_text()
    assert "| fwd+bwd |" in summary and "## Mixed batches" in summary and "`auto`: what users get" in summary
    assert ("CPU-only run" in summary) == (torch.device(DEVICE).type == "cpu")  # the CPU caveat, and only on CPU
    assert os.path.getsize(tmp_path / "speedup_vs_M.png") > 1000
    # appending: a second run adds rows under the same header
    run.main(["--quick", "--out", str(tmp_path), "--providers", "cublas", "--no-table1", "--modes", "fwd",
              "--no-mixed"])
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) > len(rows)


def test_time_box_still_writes_the_summary(tmp_path):
    """--max-minutes: once the box is spent no new case starts, and summary.md is written anyway."""
    assert run.main(["--quick", "--out", str(tmp_path), "--providers", "cublas", "--no-table1",
                     "--max-minutes", "1e-9"]) == 0
    assert not (tmp_path / "results.csv").exists()  # no case started
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmark summary")


def test_mixed_providers_compute_the_same_layer():
    """The mixed-batch providers agree with each other (fwd) and all train every adapter that has rows."""
    case = mixed.MixedCase(40, 64, 48, 4, 3, "fp32")
    outs = {}
    for name in ("mixed", "sorted", "loop"):
        fns = mixed.build(name, case, DEVICE)
        outs[name] = fns["fwd"]()
    torch.testing.assert_close(outs["mixed"], outs["loop"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["sorted"], outs["loop"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs["mixed"], mixed.build("base", case, DEVICE)["fwd"](), atol=1e-3)


def test_decode_bench_providers_compute_the_same_layer(capsys):
    """bench.decode's providers are the same layer (merged = base + s B A); without a GPU it says so and exits 0."""
    from bench import decode

    torch.manual_seed(0)
    w, a, b = torch.randn(24, 40) / 7, torch.randn(4, 40) / 7, torch.randn(24, 4) / 2
    x = torch.randn(3, 40)
    fns = decode.providers(w, a, b, 2.0)
    ref = fns["eager"](x)
    torch.testing.assert_close(fns["merged"](x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fns["base"](x), ref)
    if not torch.cuda.is_available():
        assert decode.main([]) == 0 and "needs a GPU" in capsys.readouterr().out


def test_decode_bench_mixed_step_checks_its_rows():
    """The mixed-batch decode case serves each request with its own adapter (checked inside, against a per-row
    computation) and reports the bytes floor; here with a stand-in timer (no GPU)."""
    from bench import decode

    w = torch.randn(48, 64, device=DEVICE) / 8
    ring = [torch.randn(5, 64, device=DEVICE)]
    calls = []
    row = decode.mixed_decode_row(w, 4, 5, ring, timer=lambda fn, ring: calls.append(fn(ring[0]).shape) or 2.0)
    assert calls == [(5, 48)] * 3  # base, mixed, mixed with rows sorted by adapter
    assert row["mixed_vs_base"] == 1.0 and row["bytes_floor"] == round(1 + 5 * 4 * (64 + 48) / (64 * 48), 3)


def test_host_bench_counts_the_ops_of_a_layer_call():
    """bench.host: Triton launches stubbed (restored afterwards) and counted; a warm mixed-batch call dispatches as few
    ATen ops whatever the number of adapters (no per-adapter stacking or id checks)."""
    from triton.runtime import autotuner

    from bench import host

    run = autotuner.Autotuner.run
    rows = host.rows([1, 5], calls=3, K=32, M=8)
    assert autotuner.Autotuner.run is run
    ops = {(r["call"], r["adapters"]): r["aten_ops"] for r in rows}
    assert ops[("mixed batch", 5)] == ops[("mixed batch", 1)] <= 10, ops
    assert all(r["host_us"] > 0 and r["launches"] >= 1 for r in rows)


def test_host_bench_training_step_side_by_side():
    """bench.host --train: PEFT's layer, the eager composition and every plan that fits, each with its ATen ops and
    Triton launches counted; the static default on a GPU is labelled. No timing is asserted here."""
    from bench import host

    rows = host.train_rows(calls=2, dropouts=(0.0,), plans=["triton_fused+triton_fused", "aten+aten"])
    by = {r["label"]: r for r in rows}
    assert by["lora_kernels aten+aten"]["launches"] == 0
    fused = next(r for label, r in by.items() if label.startswith("lora_kernels triton_fused+triton_fused"))
    assert fused["launches"] == 2 and fused["aten_ops"] < by["PEFT LoRA Linear (fp32 adapters)"]["aten_ops"]
    assert host.gpu_default_spec(16, 64, 48, 8, False) == "triton_fused+triton_fused"


def test_bench_without_matplotlib_writes_csv_and_summary(tmp_path, monkeypatch, capsys):
    """A new user without the [bench] extra: the CSV and the summary are written, the plots are skipped with a line
    that names the extra."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert run.main(["--quick", "--out", str(tmp_path), "--providers", "cublas", "--no-table1", "--no-mixed",
                     "--modes", "fwd"]) == 0
    out = capsys.readouterr().out
    assert "plots skipped (pip install 'lora-kernels[bench]' brings it)" in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "summary.md").exists()
    assert not (tmp_path / "speedup_vs_M.png").exists()


def test_demo_runs_and_passes_parity():
    """The README's first command ends in `python -m bench.demo`: it runs here (the Triton kernels in the
    interpreter), every usable backend passes the parity rule, and the timing table is printed."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the demo sets it itself without a GPU
    out = subprocess.run([sys.executable, "-m", "bench.demo"], capture_output=True, text=True, cwd=root, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    passes = [line.split()[0] for line in out.stdout.splitlines() if line.rstrip().endswith("PASS")]
    assert "FAIL" not in out.stdout and {"torch", "triton"} <= set(passes), out.stdout
    assert "median time per call" in out.stdout and "fused, backend=triton" in out.stdout, out.stdout


def test_train_bench_quick_runs_every_contender_with_equal_losses(tmp_path, capsys):
    """bench.train on CPU: the tiny config trains with PEFT, PEFT + fuse and inject, LoRA, DoRA, QLoRA and QDoRA, and their
    losses (dropout off) meet the parity rule against an fp64 PEFT model (QLoRA's: on the dequantized weights); the rows
    go into bench's CSV."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from bench import train

    assert train.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 13 and "FAIL" not in out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"peft", "peft+fuse", "lora_kernels", "peft_dora", "lora_kernels_dora",
                                             "peft_qlora", "lora_kernels_qlora", "peft_qdora", "lora_kernels_qdora"}
    assert {r["metric"] for r in rows} == {"time", "tokens_per_s", "peak_memory"}
    assert (tmp_path / "train.md").read_text().startswith("# One training step")


def test_experts_bench_contenders_agree_and_write_files(tmp_path):
    """bench.experts on CPU (tiny configs): PEFT's target_parameters, the ATen composition and the package agree on
    the block's output and every LoRA grad; the CSV and the table are written."""
    pytest.importorskip("peft")
    from bench import experts

    assert experts.main(["--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "experts.csv")))
    assert {r["model"] for r in rows} == {"qwen3-30b-a3b", "gpt-oss-20b"}
    for r in rows:
        for c in ("aten", "lora_kernels"):
            assert float(r[f"{c}_rel_err_y"]) < 1e-5 and float(r[f"{c}_rel_err_grads"]) < 1e-5, r
    assert "| qwen3-30b-a3b | 48 |" in (tmp_path / "experts.md").read_text()


def test_train_bench_moe_model_trains_alike(tmp_path, capsys):
    """bench.train --model qwen3-30b-a3b on CPU (tiny config): LoRA on attention and on the experts through PEFT's
    target_parameters, PEFT + fuse and inject (LoRAExperts); the losses meet the parity rule against fp64 PEFT."""
    pytest.importorskip("peft")
    from bench import train

    assert train.main(["--quick", "--model", "qwen3-30b-a3b", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out
    with open(tmp_path / "results.csv") as f:
        assert {r["provider"] for r in csv.DictReader(f)} == {"peft", "peft+fuse", "lora_kernels"}
