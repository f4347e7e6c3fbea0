"""One whole training step of a real-width model, PEFT against this package: ``python -m bench.train``.

A few decoder layers of a real model at full width (random init, no download), LoRA on attention and MLP, a causal-LM
loss on random tokens, backward and an AdamW step on the adapters. Contenders, with identical weights and adapters:

  peft          PEFT's LoRA (get_peft_model, its defaults: fp32 adapters, nn.Dropout)
  peft+fuse     the same PeftModel after ``lora_kernels.peft.fuse`` (PEFT's API and files, the fused kernels)
  lora_kernels  ``lora_kernels.inject`` on the base model (the adapters copied from PEFT's)
  peft_dora, lora_kernels_dora   the same with DoRA (use_dora=True; the magnitudes copied too)
  peft_qlora, lora_kernels_qlora QLoRA: the decoder's linear layers in NF4 with double quantization (bitsandbytes'
                 Linear4bit, compute dtype the run's), PEFT's LoRA over them against ``inject`` (needs bitsandbytes)
  peft_qdora, lora_kernels_qdora QDoRA: DoRA over the same NF4 bases

``--model qwen3-30b-a3b``: an MoE model (Qwen3-30B-A3B's width: 128 experts, top-8), LoRA on attention and, through
``target_parameters``, on every expert's gate_up_proj and down_proj (PEFT's ParamWrapper; ``inject`` gives
LoRAExperts); the contenders peft, peft+fuse and lora_kernels, dropout 0 (PEFT refuses it on experts).

On a GPU: tokens per second and ``torch.cuda.max_memory_allocated`` per step, p50 / p20 / p80 over the steps after
warm-up (the planner measures new call shapes in the first steps: their time is reported apart). On CPU: a tiny
config that checks every contender runs and that the losses agree by the parity rule (no timing worth reading).

    python -m bench.train [--quick] [--model llama-3-8b] [--layers 2] [--batch 8] [--seq 2048] [--r 16]
                          [--dropout 0.05] [--steps 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import lora_kernels  # noqa: E402

from .memory import DEFAULT_TARGETS, MODELS, TARGETS, quantized_decoder  # noqa: E402

CONTENDERS = ("peft", "peft+fuse", "lora_kernels", "peft_dora", "lora_kernels_dora", "peft_qlora", "lora_kernels_qlora",
              "peft_qdora", "lora_kernels_qdora")
# (widths multiples of 64: bitsandbytes' CPU kernels serve those exactly)
TINY = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
# MoE models (a training step through PEFT's target_parameters and inject's LoRAExperts): (model type, config, layers)
MOE_MODELS = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, vocab_size=151936, decoder_sparse_step=1, mlp_only_layers=[]),
                      48),
}
MOE_TINY = dict(moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2, head_dim=16)
MOE_TARGETS = (["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
SUFFIXES = ("_qdora", "_qlora", "_dora")  # (the first that a name ends with: "_qdora" before "_dora")


def _suffix(contender: str) -> str:
    return next((s for s in SUFFIXES if contender.endswith(s)), "")


def base_model(name: str, layers: int, vocab: int | None, device, dtype, tiny: bool = False):
    """`layers` decoder layers of model `name` at full width (or the tiny config), random init from a fixed seed."""
    import transformers

    model_type, kwargs, _ = MODELS[name] if name in MODELS else MOE_MODELS[name]
    kwargs = dict(kwargs)
    if tiny:
        kwargs = {k: v for k, v in kwargs.items() if k not in TINY and k not in ("n_embd", "n_head")}
        kwargs.update(TINY if model_type != "gpt2" else dict(n_embd=64, n_head=4, vocab_size=128))
        if name in MOE_MODELS:
            kwargs.update(MOE_TINY)
    if vocab and not tiny:
        kwargs["vocab_size" if model_type != "gpt2" else "vocab_size"] = vocab
    layers_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs, **{layers_key: layers})
    cfg._attn_implementation = "sdpa"
    if dtype == torch.float64:
        cfg._experts_implementation = "eager"  # (transformers' grouped_mm experts have no fp64 kernel)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.requires_grad_(False)
    return model


def contenders(name: str, layers: int, vocab, device, dtype, r: int, dropout: float, tiny=False,
               which=CONTENDERS) -> dict:
    """{contender: model}, every one with the same base weights and the same adapters (B random: the adapters count;
    the DoRA ones with their own, shared between the two)."""
    from peft import LoraConfig, get_peft_model

    from lora_kernels.peft import fuse

    if name in MOE_MODELS:
        return moe_contenders(name, layers, vocab, device, dtype, r, tiny, which)
    targets = TARGETS.get(MODELS[name][0], DEFAULT_TARGETS)
    out = {}
    for suffix, dora, quantized in (("", False, False), ("_dora", True, False), ("_qlora", False, True),
                                    ("_qdora", True, True)):
        wanted = [c for c in which if _suffix(c) == suffix]
        if not wanted:
            continue
        if quantized:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                print(f"QLoRA / QDoRA contenders skipped: {e}")
                continue

        def base():
            model = base_model(name, layers, vocab, device, dtype, tiny)
            return quantized_model(model, dtype) if quantized else model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, init_lora_weights=False,
                         use_dora=dora)
        reference = get_peft_model(base(), cfg)
        if dora:  # off the norms (at init they are equal: DoRA would compute LoRA's function)
            with torch.no_grad():
                for param_name, param in reference.named_parameters():
                    if "lora_magnitude_vector" in param_name:
                        param.mul_(1.1)
        if "peft" + suffix in wanted:
            out["peft" + suffix] = reference
        if "peft+fuse" in wanted and not suffix:
            fused = get_peft_model(base(), cfg)
            fused.load_state_dict(reference.state_dict())
            out["peft+fuse"] = fuse(fused)
        if "lora_kernels" + suffix in wanted:
            model = base()
            lora_kernels.inject(model, targets, r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=dora)
            lora_kernels.mark_only_lora_as_trainable(model)
            peft_modules = dict(reference.base_model.model.named_modules())
            with torch.no_grad():  # PEFT's adapters (and magnitudes)
                for module_name, layer in lora_kernels.lora_layers(model).items():
                    src = peft_modules[module_name]
                    layer.lora_A.copy_(src.lora_A["default"].weight)
                    layer.lora_B.copy_(src.lora_B["default"].weight)
                    if dora:
                        layer.lora_magnitude_vector.copy_(src.lora_magnitude_vector["default"].weight)
            out["lora_kernels" + suffix] = model
    return out


def moe_contenders(name: str, layers: int, vocab, device, dtype, r: int, tiny: bool, which) -> dict:
    """{contender: model} for an MoE model: LoRA on attention (target_modules) and on the experts' projections
    (target_parameters), the same adapters in every contender, dropout 0 (PEFT refuses it on experts)."""
    from peft import LoraConfig, get_peft_model

    from lora_kernels.peft import fuse

    modules, parameters = MOE_TARGETS
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, target_parameters=parameters,
                     init_lora_weights=False)
    reference = get_peft_model(base_model(name, layers, vocab, device, dtype, tiny), cfg)
    out = {}
    if "peft" in which:
        out["peft"] = reference
    if "peft+fuse" in which:
        fused = get_peft_model(base_model(name, layers, vocab, device, dtype, tiny), cfg)
        fused.load_state_dict(reference.state_dict())
        out["peft+fuse"] = fuse(fused)
    if "lora_kernels" in which:
        import tempfile

        model = lora_kernels.inject(base_model(name, layers, vocab, device, dtype, tiny), modules, r=r,
                                    lora_alpha=2 * r, target_parameters=parameters)
        lora_kernels.mark_only_lora_as_trainable(model)
        with tempfile.TemporaryDirectory() as d:  # PEFT's adapters, through its files
            reference.save_pretrained(d)
            lora_kernels.load_adapter(model, d)
        out["lora_kernels"] = model
    return out


def quantized_model(model, dtype):
    """The decoder's linear layers as bitsandbytes Linear4bit (NF4, double quantization, compute dtype `dtype`)."""
    from lora_kernels.quantized import quantize_linear

    return quantized_decoder(model, lambda linear: quantize_linear(linear, compute_dtype=dtype))


def batch(model, size: int, seq: int, device, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (size, seq), generator=g).to(device)
    return ids


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def parity(models: dict, ids, dtype) -> dict:
    """Each contender's loss (dropout off) against PEFT's (LoRA's or DoRA's) and an fp64 PEFT reference:
    {name: (loss, ok)}."""
    out = {}
    eps = torch.finfo(dtype).eps
    for suffix in ("",) + SUFFIXES:
        group = {n: m for n, m in models.items() if _suffix(n) == suffix}
        if not group:
            continue
        ref = group.get("peft" + suffix) or next(iter(group.values()))
        with torch.no_grad():
            exact = float(loss_of(_as_fp64(ref).eval(), ids))
            same = float(loss_of(_eval(ref), ids))
            label = {"": "", "_dora": " (DoRA)", "_qlora": " (QLoRA)", "_qdora": " (QDoRA)"}[suffix]
            out["fp64 reference" + label] = (exact, True)
            for name, model in group.items():
                value = float(loss_of(_eval(model), ids))
                out[name] = (value, abs(value - exact) <= 2 * abs(same - exact) + 2 * eps * abs(exact))
    for model in models.values():
        model.train()
    return out


def _eval(model):
    """Dropout off; bitsandbytes' layers stay in training mode (its CPU inference path packs and rounds otherwise)."""
    from lora_kernels.quantized import is_quantized_linear

    model.eval()
    for module in model.modules():
        if is_quantized_linear(module):
            module.train()
    return model


def _as_fp64(model):
    """An fp64 copy; quantized base layers become dense ones holding their dequantized weights."""
    import copy

    from lora_kernels.quantized import dequantize, is_quantized_linear, quantized_weight

    model = copy.deepcopy(model)
    for module_name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=module.weight.device, dtype=torch.float64)
            with torch.no_grad():
                dense.weight.copy_(dequantize(quantized_weight(module), torch.float64))
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            config._experts_implementation = "eager"  # (transformers' grouped_mm experts have no fp64 kernel)
    return model.to(torch.float64)


def run(models: dict, ids, steps: int, device, lr=1e-4) -> list[dict]:
    """Train each contender `steps` steps on the same batch; per step: seconds, peak memory (CUDA)."""
    rows = []
    tokens = ids.numel()
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        times, peaks, losses = [], [], []
        for step in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = loss_of(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            times.append(time.perf_counter() - t0)
            losses.append(loss.detach().item())
        warm = 2 if steps > 4 else 1  # the first steps: compiling, autotuning, the planner's measurements
        steady = times[warm:] or times
        q = statistics.quantiles(steady, n=10, method="inclusive") if len(steady) > 1 else [steady[0]] * 9
        rows.append({"contender": name, "steps": steps, "tokens": tokens, "first_steps_s": round(sum(times[:warm]), 3),
                     "step_ms_p50": round(1e3 * statistics.median(steady), 2), "step_ms_p20": round(1e3 * q[1], 2),
                     "step_ms_p80": round(1e3 * q[7], 2),
                     "tokens_per_s_p50": round(tokens / statistics.median(steady), 1),
                     "peak_gib_p50": round(statistics.median(peaks[warm:] or peaks), 3) if peaks else float("nan"),
                     "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)})
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def csv_rows(rows, args, env) -> list[dict]:
    """The rows in bench's CSV format (op train_step)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = []
    for row in rows:
        common = dict(timestamp=stamp, op=f"train_step_{args.model}_{args.layers}l", provider=row["contender"],
                      mode="fwd+bwd+adamw", M=row["tokens"], K=args.layers, N=args.seq, r=args.r,
                      dropout=args.dropout, dtype=args.dtype, plan="", **env)
        out.append(dict(common, metric="time", unit="ms", p50=row["step_ms_p50"], p20=row["step_ms_p20"],
                        p80=row["step_ms_p80"]))
        out.append(dict(common, metric="tokens_per_s", unit="tok/s", p50=row["tokens_per_s_p50"], p20="", p80=""))
        out.append(dict(common, metric="peak_memory", unit="GiB", p50=row["peak_gib_p50"], p20="", p80=""))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny CPU config: runs and loss parity only")
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS) + sorted(MOE_MODELS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (the real one's logits would dominate)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--out", default=None, help="folder: rows appended to results.csv, train.md written")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if gpu else "cpu")
    tiny = not gpu
    if tiny:
        args.batch, args.seq, args.steps = 2, 16, min(args.steps, 3)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    which = [c for c in args.contenders.split(",") if c]
    if args.model in MOE_MODELS:
        which = [c for c in which if not _suffix(c)]  # LoRA only (PEFT refuses DoRA and dropout on experts)
        args.dropout = 0.0
    models = contenders(args.model, args.layers, args.vocab, device, dtype, args.r, args.dropout, tiny, which)
    ids = batch(next(iter(models.values())), args.batch, args.seq, device)
    what = (f"{args.layers} {args.model} decoder layers {'(tiny config)' if tiny else 'at full width'}, "
            f"{args.batch} x {args.seq} tokens, r={args.r}, dropout={args.dropout}, {args.dtype}, "
            f"{torch.cuda.get_device_name() if gpu else 'CPU'}")
    print(f"one training step: {what}")
    checks = parity(models, ids[:, : min(args.seq, 64)], dtype)
    print("loss with dropout off, parity rule against an fp64 PEFT model:")
    for name, (value, ok) in checks.items():
        print(f"  {name:18s} {value:.6f}  {'PASS' if ok else 'FAIL'}")
    rows = run(models, ids, args.steps, device)
    lines = ["| contender | step ms p50 (p20-p80) | tokens/s | peak GiB | first steps s |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['contender']} | {row['step_ms_p50']} ({row['step_ms_p20']}-{row['step_ms_p80']}) | "
                     f"{row['tokens_per_s_p50']:.0f} | {row['peak_gib_p50']} | {row['first_steps_s']} |")
    table = "\n".join(lines)
    print(table if gpu else table + "\n(CPU: the tiny config checks that every contender trains; not a speed figure)")
    if args.out:
        from .run import _environment, write_csv

        os.makedirs(args.out, exist_ok=True)
        write_csv(csv_rows(rows, args, _environment()), os.path.join(args.out, "results.csv"))
        with open(os.path.join(args.out, "train.md"), "w") as f:
            f.write(f"# One training step: {what}\n\n{table}\n\nLoss parity (dropout off): "
                    + ", ".join(f"{k} {v:.6f} {'PASS' if ok else 'FAIL'}" for k, (v, ok) in checks.items()) + "\n")
    return 0 if all(ok for _, ok in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
