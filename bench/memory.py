"""Activation memory of LoRA training, per token, exact on any machine: ``python -m bench.memory``.

One decoder layer of a real model, built at full width from its transformers config (no weights downloaded) on the
meta device, so nothing is computed and every byte is counted exactly: what autograd saves for the backward (the
storages handed to ``torch.autograd.graph.saved_tensors_hooks``, each counted once, parameters excluded) and the peak
of the storages alive during the forward and during the backward (a dispatch mode that sees every tensor allocated,
with weak references to the storages to see them freed). Everything is per token: the slope between two token counts
(2 and 8 sequences of 32 tokens), so per-step constants (cast copies of fp32 adapters) cancel.

Contenders per layer: ``frozen`` (no adapter: the floor), ``peft`` (PEFT's LoRA with its defaults: fp32 adapters,
nn.Dropout), ``lora_kernels`` (``lora_kernels.inject`` on the same targets, each layer with the plan ``auto`` runs on
a GPU by default at the stated batch; Triton launches stubbed: their outputs are allocated as on a GPU), and the same
two with DoRA (``peft_dora``, ``lora_kernels_dora``), with QLoRA (``peft_qlora``, ``lora_kernels_qlora``: the
layer's linear layers as bitsandbytes NF4 Linear4bit with double quantization, built on the meta device too; needs
bitsandbytes). The LoRA share is a contender's bytes minus the frozen layer's (QLoRA's: minus the frozen 4-bit
layer's, ``frozen_qlora``). The whole model is extrapolated from one layer: without
activation checkpointing every layer keeps its saved bytes; with it (per decoder layer) every layer keeps its input
and one layer at a time is recomputed (its saved bytes and backward peak on top).

MoE experts blocks (``--experts``, first in the output): every expert of one MoE layer of Qwen3-30B-A3B, Mixtral-8x7B
and gpt-oss-20b at their published widths, ``frozen`` / ``peft`` (PEFT's ``target_parameters`` on gate_up_proj and
down_proj, transformers' grouped_mm experts) / ``lora_kernels`` (``inject(target_parameters=...)``, the Triton
grouped plan, launches stubbed): bytes saved per token (the slope) and per layer (the constant: PEFT keeps W0 + s B A
of every expert for the backward).

    python -m bench.memory [--quick] [--models llama-3-8b,...] [--r 16,64] [--dropout 0,0.05,0.1] [--experts ...]
                           [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the launchers' CPU path

from torch import nn  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import backends, plan  # noqa: E402

from .host import triton_launches_stubbed  # noqa: E402

KIB = 1024
SEQ = 32  # tokens per sequence; the token counts vary the number of sequences (attention stays linear in tokens)
TOKENS = (2 * SEQ, 8 * SEQ)

# Decoder layers at full width (the published configs' sizes; one layer is built), and PEFT's usual targets.
MODELS = {
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                 num_key_value_heads=8, rope_theta=500000.0, vocab_size=128256), 32),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32768), 32),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064), 28),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257), 24),
}
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# QDoRA (DoRA over the 4-bit layers) is this package's alone here: PEFT's DoRA over bitsandbytes layers dequantizes the
# weight when the adapter is created, which the meta device cannot (its row: bench.train on a GPU).
CONTENDERS = ("frozen", "peft", "lora_kernels", "peft_dora", "lora_kernels_dora", "peft_qlora", "lora_kernels_qlora",
              "lora_kernels_qdora")
QUANTIZED = ("_qlora", "_qdora")  # the contenders over 4-bit base layers (QDoRA: DoRA over them)
BATCH = (8, 4096)  # the whole-model figures: 8 sequences of 4096 tokens


def hidden_size(model_type: str, kwargs: dict) -> int:
    return kwargs["n_embd"] if model_type == "gpt2" else kwargs["hidden_size"]


def build_layer(name: str, dtype=torch.bfloat16):
    """A one-layer model of `name` on the meta device (attention through SDPA) and a function running its decoder
    layer on hidden states [B, S, H]."""
    import transformers

    model_type, kwargs, _ = MODELS[name]
    layers_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs, **{layers_key: 1})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.requires_grad_(False)
    return model


def _run_layer(model, x):
    """The decoder layer of a one-layer model (PEFT-wrapped or not) on x [B, S, H]."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "transformer"):  # GPT-2
        out = inner.transformer.h[0](x)
    else:
        body = inner.model
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        out = body.layers[0](x, position_embeddings=body.rotary_emb(x, pos), attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def shapes_only():
    """Run this package's GPU plans on meta tensors: Triton launches stubbed (their outputs allocated as on a GPU),
    the Triton family accepted for meta tensors."""
    real = backends.TritonBackend.unavailable_reason

    def reason(device, dtype):
        return None if device.type == "meta" and dtype in backends.KERNEL_DTYPES else real(device, dtype)

    backends.TritonBackend.unavailable_reason = staticmethod(reason)
    try:
        with triton_launches_stubbed():
            yield
    finally:
        backends.TritonBackend.unavailable_reason = staticmethod(real)


def make_contender(name: str, contender: str, r: int, dropout: float, batch_tokens: int):
    """The one-layer model with `contender`'s LoRA on the usual targets (None for the frozen layer), and the plans
    of this package's layers ({module name: plan spec})."""
    model_type, _, _ = MODELS[name]
    targets = TARGETS.get(model_type, DEFAULT_TARGETS)
    model = build_layer(name)
    plans = {}
    dora = contender.endswith(("_dora", "_qdora"))
    if contender.endswith(QUANTIZED):
        quantized_decoder(model, meta_linear4bit)
        contender = contender.rsplit("_", 1)[0]
    if contender in ("peft", "peft_dora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets,
                                                 use_dora=dora))
    elif contender in ("lora_kernels", "lora_kernels_dora"):
        lora_kernels.inject(model, targets, r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=dora)
        lora_kernels.mark_only_lora_as_trainable(model)
        for module_name, layer in lora_kernels.lora_layers(model).items():
            quant = layer.quantized_weight().quant if isinstance(layer, lora_kernels.QuantizedLoRALinear) else ""
            call = plan.Call(torch.device("cuda"), torch.bfloat16, batch_tokens, layer.in_features,
                             layer.out_features, r, dropout > 0, 2, False, 0, quant, dora)
            layer.backend = plans[module_name] = plan.static_plan(call).spec
    elif contender != "frozen":
        raise ValueError(f"contender: expected one of {CONTENDERS} or frozen_qlora, got {contender!r}")
    return model.train(), plans


def quantized_decoder(model, quantize):
    """The decoder layers' nn.Linear modules replaced by `quantize(linear)` (a bitsandbytes layer), the embeddings and
    the LM head left dense (as QLoRA leaves them); returns the model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module_name, linear in list(decoder.named_modules()):
        if type(linear) is nn.Linear:
            parent, _, child = module_name.rpartition(".")
            setattr(decoder.get_submodule(parent), child, quantize(linear))
    return model


def meta_linear4bit(linear: nn.Linear, dtype=torch.bfloat16):
    """A bitsandbytes Linear4bit (NF4, double quantization, blocks of 64 and 256, compute dtype `dtype`) for `linear`
    on the meta device: quantization state of the right shapes, nothing computed; the bias shared."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    N, K = linear.out_features, linear.in_features
    blocks = -(-N * K // 64)
    meta = dict(device="meta")
    nested = QuantState(absmax=torch.empty(-(-blocks // 256), **meta), code=torch.empty(256, **meta),
                        blocksize=256, dtype=torch.float32)
    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, **meta), shape=torch.Size([N, K]),
                       code=torch.empty(16, **meta), blocksize=64, quant_type="nf4", dtype=dtype,
                       offset=torch.zeros((), **meta), state2=nested)
    layer = bnb.nn.Linear4bit(K, N, bias=linear.bias is not None, compute_dtype=dtype, quant_type="nf4", **meta)
    layer.weight = bnb.nn.Params4bit(torch.empty((N * K + 1) // 2, 1, dtype=torch.uint8, **meta),
                                     requires_grad=False, quant_state=state, bnb_quantized=True, quant_type="nf4",
                                     blocksize=64)
    layer.bias = linear.bias
    return layer


class Tracker(TorchDispatchMode):
    """Counts bytes by storage: what autograd saves for the backward (``saved``), and the peak of the storages
    allocated since the phase began that are alive after each op (``peak``). Parameters are not counted."""

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = {s.untyped_storage()._cdata for s in exclude}
        self.live: dict = {}  # storage key -> (weak ref, bytes)
        self.saved: dict = {}
        self.peak = self.base = 0

    def _key(self, t):
        return t.untyped_storage()._cdata

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or self._key(t) in self.exclude:
                continue
            kept = self.live.get(self._key(t))
            if kept is None or kept[0].expired():  # new, or a freed storage's address reused
                self.live[self._key(t)] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.alive() - self.base)
        return out

    def alive(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values())

    def phase(self):
        """Start measuring a peak from here."""
        self.base, self.peak = self.alive(), 0

    def pack(self, t):
        key = self._key(t)
        if key not in self.exclude:
            self.saved[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        return t

    def saved_bytes(self) -> int:
        """Bytes of the saved storages still alive (a graph branch dropped in the forward frees what it saved, and
        its storage's address may be reused)."""
        return sum(n for ref, n in self.saved.values() if not ref.expired())


def measure(model, tokens: int, hidden: int, dtype=torch.bfloat16) -> dict:
    """Bytes saved for the backward, forward peak and backward peak of one step of the layer on `tokens` tokens."""
    params = [p for p in model.parameters()] + [b for b in model.buffers()]
    tracker = Tracker(exclude=params)
    x = torch.empty(tokens // SEQ, SEQ, hidden, device="meta", dtype=dtype, requires_grad=True)
    with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        tracker.phase()
        y = _run_layer(model, x)
        forward_peak = tracker.peak
        saved = tracker.saved_bytes()
        grad = torch.empty_like(y)
        tracker.phase()
        y.backward(grad)
        backward_peak = tracker.peak
    return {"saved": saved, "forward_peak": forward_peak, "backward_peak": backward_peak}


def module_saved_per_token(make_module, K: int, dtype=torch.bfloat16, tokens=TOKENS) -> float:
    """Bytes one module saves for its backward per token of a [tokens, K] input that needs a grad (parameters
    excluded, by storage, slope over two token counts), on the meta device: `make_module(device)` builds it there.
    The package's layers run their GPU plans with the launches stubbed (``shapes_only``)."""
    from lora_kernels import FusedLoRALinear

    saved = []
    with shapes_only():
        module = make_module(torch.device("meta"))
        for layer in [m for m in module.modules() if isinstance(m, FusedLoRALinear)]:
            call = plan.Call(torch.device("cuda"), layer.weight.dtype, max(tokens), layer.in_features,
                             layer.out_features, layer.r, layer.lora_dropout > 0, 2, False)
            layer.backend = plan.static_plan(call).spec
        module.train()
        for t in tokens:
            tracker = Tracker(exclude=list(module.parameters()) + list(module.buffers()))
            x = torch.empty(t, K, device="meta", dtype=dtype, requires_grad=True)
            with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
                y = module(x)
            saved.append(tracker.saved_bytes())
            del y
    return (saved[1] - saved[0]) / (tokens[1] - tokens[0])


@dataclasses.dataclass
class Row:
    model: str
    contender: str
    r: int
    dropout: float
    saved_kib_per_token: float
    forward_peak_kib_per_token: float
    backward_peak_kib_per_token: float
    lora_share_kib_per_token: float = float("nan")
    model_gib: float = float("nan")  # activations of the whole model at BATCH, no checkpointing
    model_ckpt_gib: float = float("nan")  # with activation checkpointing per decoder layer
    plans: str = ""


def layer_row(name: str, contender: str, r: int, dropout: float) -> Row:
    model_type, kwargs, n_layers = MODELS[name]
    hidden = hidden_size(model_type, kwargs)
    batch_tokens = BATCH[0] * BATCH[1]
    with shapes_only():
        model, plans = make_contender(name, contender, r, dropout, batch_tokens)
        small, large = (measure(model, t, hidden) for t in TOKENS)
    per_token = {k: (large[k] - small[k]) / (TOKENS[1] - TOKENS[0]) / KIB for k in small}
    row = Row(name, contender, r, dropout, *(round(per_token[k], 2) for k in ("saved", "forward_peak",
                                                                                "backward_peak")))
    # whole model: L layers' saved bytes (+ the last one's backward peak); checkpointing: every layer's input in
    # the model's dtype, plus one layer recomputed and its backward peak
    tokens_gib = batch_tokens * KIB / 2**30
    row.model_gib = round(tokens_gib * (n_layers * per_token["saved"] + per_token["backward_peak"]), 2)
    checkpoints = n_layers * hidden * 2 / KIB
    row.model_ckpt_gib = round(tokens_gib * (checkpoints + per_token["saved"] + per_token["backward_peak"]), 2)
    row.plans = ", ".join(f"{name}: {spec}" for name, spec in sorted(set(
        (module.rsplit(".", 1)[-1], spec) for module, spec in plans.items())))
    return row


def rows(models, rs, dropouts, contenders=CONTENDERS, progress=None) -> list[Row]:
    out = []
    for name in models:
        frozen = layer_row(name, "frozen", 0, 0.0) if "frozen" in contenders else None
        if frozen:
            out.append(frozen)
        frozen_4bit = None
        qlora = MODELS[name][0] != "gpt2"  # GPT-2's projections are Conv1D: bitsandbytes has no 4-bit Conv1D
        if frozen and qlora and any(c.endswith(QUANTIZED) for c in contenders):
            try:
                frozen_4bit = layer_row(name, "frozen_qlora", 0, 0.0)
                out.append(frozen_4bit)
            except ImportError as e:
                print(f"QLoRA rows: skipped ({e})", file=sys.stderr)
        for r in rs:
            for p in dropouts:
                for contender in contenders:
                    if contender == "frozen":
                        continue
                    if progress:
                        progress(f"{name} {contender} r={r} p={p}")
                    floor = frozen_4bit if contender.endswith(QUANTIZED) else frozen
                    if contender.endswith(QUANTIZED) and (not qlora or (frozen and floor is None)):
                        continue  # GPT-2, or no bitsandbytes
                    try:
                        row = layer_row(name, contender, r, p)
                    except ImportError as e:  # peft not installed: the row is left out, said once
                        print(f"{contender}: skipped ({e})", file=sys.stderr)
                        continue
                    if floor:
                        row.lora_share_kib_per_token = round(row.saved_kib_per_token - floor.saved_kib_per_token, 2)
                    out.append(row)
    return out


def markdown(table: list[Row]) -> str:
    lines = ["| model | r | dropout | contender | saved KiB/token | LoRA share | forward peak | backward peak | "
             f"model, {BATCH[0]} x {BATCH[1]} tokens (GiB) | with checkpointing (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        share = "-" if row.contender.startswith("frozen") else f"{row.lora_share_kib_per_token:.1f}"
        lines.append(f"| {row.model} | {row.r or '-'} | {row.dropout if not row.contender.startswith('frozen') else '-'} | "
                     f"{row.contender} | {row.saved_kib_per_token:.1f} | {share} | "
                     f"{row.forward_peak_kib_per_token:.1f} | {row.backward_peak_kib_per_token:.1f} | "
                     f"{row.model_gib:.1f} | {row.model_ckpt_gib:.1f} |")
    return "\n".join(lines)


def ratios(table: list[Row]) -> list[str]:
    """One line per (model, r, dropout, LoRA or DoRA): PEFT's adapter share over this package's."""
    out = []
    for row in table:
        if not row.contender.startswith("lora_kernels"):
            continue
        theirs = row.contender.replace("lora_kernels", "peft")
        peft = next((p for p in table if (p.model, p.r, p.dropout, p.contender) == (row.model, row.r, row.dropout,
                                                                                     theirs)), None)
        if peft and row.lora_share_kib_per_token > 0:
            kind = {"dora": "DoRA", "qlora": "QLoRA", "qdora": "QDoRA"}.get(theirs.rsplit("_", 1)[-1], "LoRA")
            out.append(f"{row.model} r={row.r} p={row.dropout} {kind}: adapter share "
                       f"{peft.lora_share_kib_per_token:.1f} (PEFT) vs {row.lora_share_kib_per_token:.1f} KiB/token: "
                       f"{peft.lora_share_kib_per_token / row.lora_share_kib_per_token:.1f}x smaller; whole model "
                       f"{peft.model_gib:.1f} vs {row.model_gib:.1f} GiB")
    return out


def plot(table: list[Row], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install 'lora-kernels[bench]' brings it)")
        return None
    keys = [(r.model, r.r, r.dropout) for r in table if r.contender == "lora_kernels"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(keys)), 4.5))
    shown = [c for c in CONTENDERS[1:] if any(r.contender == c for r in table)]
    width = 0.8 / max(len(shown), 1)
    for i, contender in enumerate(shown):
        vals = [next((r.saved_kib_per_token for r in table if (r.model, r.r, r.dropout, r.contender) == k + (contender,)),
                     0.0) for k in keys]
        ax.bar([j + width * i for j in range(len(keys))], vals, width, label=contender)
    frozen = {r.model: r.saved_kib_per_token for r in table if r.contender == "frozen"}
    ax.scatter([j + 0.4 - width / 2 for j in range(len(keys))], [frozen.get(k[0], 0) for k in keys], color="k",
               marker="_", s=300, label="frozen layer", zorder=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{m}\nr={r} p={p}" for m, r, p in keys], fontsize=7)
    ax.set_ylabel("bytes saved for backward (KiB per token)")
    ax.set_title("Activation memory of one decoder layer (bf16, LoRA on attention and MLP)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------
# MoE experts: one experts block (every expert of a layer, its routed slots) at the published widths
# ------------------------------------------------------------------------------------------------------------
# name: (transformers module, config class, experts class, config kwargs, layers)
EXPERTS_MODELS = {
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeExperts",
                      dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8), 48),
    "mixtral-8x7b": ("mixtral", "MixtralConfig", "MixtralExperts",
                     dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2), 32),
    "gpt-oss-20b": ("gpt_oss", "GptOssConfig", "GptOssExperts",
                    dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4), 24),
}
EXPERTS_CONTENDERS = ("frozen", "peft", "lora_kernels")
EXPERTS_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


class ExpertsBlock(nn.Module):
    """An experts module called as its MoE block calls it; the routing (which experts, their weights) is an input of
    the right shape (on the meta device nothing is routed: the bytes do not depend on which experts are picked)."""

    def __init__(self, experts, top_k: int):
        super().__init__()
        self.experts, self.top_k = experts, top_k

    def forward(self, x):
        T = x.shape[0]
        index = torch.empty(T, self.top_k, device=x.device, dtype=torch.int64)
        weights = torch.empty(T, self.top_k, device=x.device, dtype=x.dtype)
        return self.experts(x, index, weights)


def build_experts(name: str, dtype=torch.bfloat16) -> ExpertsBlock:
    import importlib

    module, config_cls, experts_cls, kwargs, _ = EXPERTS_MODELS[name]
    lib = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    config = getattr(importlib.import_module("transformers"), config_cls)(**kwargs)
    config._experts_implementation = "grouped_mm"  # transformers' default: what PEFT's experts LoRA runs through
    with torch.device("meta"):
        experts = getattr(lib, experts_cls)(config).to(dtype)
    for prm in experts.parameters():
        prm.requires_grad_(False)
    return ExpertsBlock(experts, kwargs["num_experts_per_tok"])


def make_experts_contender(name: str, contender: str, r: int) -> nn.Module:
    block = build_experts(name)
    if contender == "peft":
        from peft import LoraConfig, get_peft_model

        block = get_peft_model(block, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                 target_parameters=EXPERTS_TARGETS))
    elif contender == "lora_kernels":
        lora_kernels.inject(block, target_parameters=EXPERTS_TARGETS, r=r, lora_alpha=2 * r)
        for layer in lora_kernels.experts_layers(block).values():
            layer.backend = "triton_grouped+triton_grouped"  # the static plan of a 16-bit experts call on a GPU
    elif contender != "frozen":
        raise ValueError(f"contender: expected one of {EXPERTS_CONTENDERS}, got {contender!r}")
    return block.train()


@dataclasses.dataclass
class ExpertsRow:
    model: str
    contender: str
    r: int
    saved_kib_per_token: float
    saved_mib_per_layer: float  # the constant: bytes saved whatever the batch (PEFT: W0 + s B A of every expert)
    backward_peak_mib_per_layer: float  # the backward's transient constant (PEFT: the grad of W0 + s B A)
    model_saved_gib: float  # every MoE layer's saved bytes at BATCH tokens


@contextlib.contextmanager
def meta_autocast():
    """torch.autocast(device_type="meta") as the CPU's (PEFT's experts proxy disables autocast on its weight's device,
    which torch refuses for "meta")."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return real("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = real


def experts_row(name: str, contender: str, r: int) -> ExpertsRow:
    hidden = EXPERTS_MODELS[name][3]["hidden_size"]
    with shapes_only(), meta_autocast():
        block = make_experts_contender(name, contender, r)
        params = list(block.parameters()) + list(block.buffers())
        out = []
        for tokens in TOKENS:
            tracker = Tracker(exclude=params)
            x = torch.empty(tokens, hidden, device="meta", dtype=torch.bfloat16, requires_grad=True)
            with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
                tracker.phase()
                y = block(x)
                saved = tracker.saved_bytes()
                tracker.phase()
                y.backward(torch.empty_like(y))
                out.append((saved, tracker.peak))
            del y
    (s0, b0), (s1, b1) = out
    slope_s, slope_b = (s1 - s0) / (TOKENS[1] - TOKENS[0]), (b1 - b0) / (TOKENS[1] - TOKENS[0])
    const_s, const_b = s0 - slope_s * TOKENS[0], b0 - slope_b * TOKENS[0]
    layers, batch = EXPERTS_MODELS[name][4], BATCH[0] * BATCH[1]
    return ExpertsRow(name, contender, r, round(slope_s / KIB, 2), round(const_s / 2**20, 1), round(const_b / 2**20, 1),
                      round(layers * (const_s + slope_s * batch) / 2**30, 2))


def experts_table(models, r: int) -> tuple[list, str]:
    table = [experts_row(m, c, r) for m in models for c in EXPERTS_CONTENDERS]
    lines = [f"MoE experts blocks (every expert of one layer, bf16, LoRA r = {r}, alpha = 2r, on gate_up_proj and "
             f"down_proj; PEFT 0.21 target_parameters vs lora_kernels; meta device, by storage, parameters excluded; "
             f"per token: slope over {TOKENS[0]} and {TOKENS[1]} tokens, per layer: the constant; whole model: every "
             f"MoE layer at {BATCH[0]} x {BATCH[1]} tokens)", "",
             "| model | contender | saved KiB/token | saved MiB/layer (constant) | backward peak MiB/layer "
             "(constant) | whole model saved GiB |", "|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row.model} | {row.contender} | {row.saved_kib_per_token:.1f} | {row.saved_mib_per_layer:.1f} "
                     f"| {row.backward_peak_mib_per_layer:.1f} | {row.model_saved_gib:.2f} |")
    frozen = {row.model: row for row in table if row.contender == "frozen"}
    for row in table:
        if row.contender == "lora_kernels":
            peft = next(p for p in table if p.model == row.model and p.contender == "peft")
            base = frozen[row.model].saved_kib_per_token
            lines.append(f"\n{row.model}: LoRA's share per token {row.saved_kib_per_token - base:.1f} KiB "
                         f"(PEFT {peft.saved_kib_per_token - base:.1f}); per layer {row.saved_mib_per_layer:.1f} MiB "
                         f"(PEFT {peft.saved_mib_per_layer:.1f}); whole model {row.model_saved_gib:.1f} GiB "
                         f"(PEFT {peft.model_saved_gib:.1f}, frozen {frozen[row.model].model_saved_gib:.1f})")
    return table, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B and GPT-2 medium, r = 16, dropout 0 and 0.05")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--r", default="16,64")
    ap.add_argument("--dropout", default="0,0.05,0.1")
    ap.add_argument("--out", default=None, help="folder for memory.csv, memory.md and memory.png")
    ap.add_argument("--experts", default=None,
                    help="MoE models whose experts blocks get the MoE table ('' for none; default: all of them, "
                         "Qwen3-30B-A3B alone with --quick)")
    args = ap.parse_args(argv)
    models = ["llama-3-8b", "gpt2-medium"] if args.quick else [m for m in args.models.split(",") if m]
    rs = [16] if args.quick else [int(v) for v in args.r.split(",")]
    dropouts = [0.0, 0.05] if args.quick else [float(v) for v in args.dropout.split(",")]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if args.experts is None:
        args.experts = "qwen3-30b-a3b" if args.quick else ",".join(EXPERTS_MODELS)
    experts_models = [m for m in args.experts.split(",") if m]
    unknown = set(experts_models) - set(EXPERTS_MODELS)
    if unknown:
        ap.error(f"unknown MoE models {sorted(unknown)}; choose from {', '.join(EXPERTS_MODELS)}")
    t0 = time.time()
    experts_rows, experts_text = experts_table(experts_models, rs[0]) if experts_models else ([], "")
    table = rows(models, rs, dropouts, progress=lambda s: print(f"  {s}", file=sys.stderr))
    text = "\n\n".join(t for t in (experts_text, (
        f"Activation memory per token of one decoder layer, bf16, LoRA (alpha = 2r) on "
        f"{', '.join(DEFAULT_TARGETS)} (GPT-2: c_attn, c_proj, c_fc); by storage, parameters excluded, slope over "
        f"{TOKENS[0]} and {TOKENS[1]} tokens; whole model at {BATCH[0]} x {BATCH[1]} tokens, activations only "
        f"(embeddings and logits aside)\n\n" + markdown(table) + "\n\n" + "\n".join(ratios(table))) if table else "")
        if t)
    if any(row.contender.endswith("_qlora") for row in table):
        text += ("\n\nQLoRA rows: the base layers in NF4 (bitsandbytes, double quantization). Their backward peak is set "
                 "by a dequantized W0, a constant of the layer (both PEFT + bitsandbytes and this package dequantize "
                 "for dX), so its per-token slope is near zero or noise.")
    print(text)
    print(f"\n({time.time() - t0:.0f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, kind, found in (("memory.csv", Row, table), ("memory_experts.csv", ExpertsRow, experts_rows)):
            if found:
                with open(os.path.join(args.out, name), "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=[fld.name for fld in dataclasses.fields(kind)])
                    w.writeheader()
                    w.writerows(dataclasses.asdict(row) for row in found)
        with open(os.path.join(args.out, "memory.md"), "w") as f:
            f.write(text + "\n")
        if table:
            plot(table, os.path.join(args.out, "memory.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
