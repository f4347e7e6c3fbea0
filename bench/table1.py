"""The paper's Table 1: inference latency of a GPT-2 medium forward with adapter layers vs without.

GPT-2 medium (24 layers, d_model 1024, 16 heads, vocabulary 50257) is built from a config (no download),
randomly initialised: latency does not depend on the weights. Methods:

- "none": the model alone. This is also LoRA after merging (and full fine-tuning): the paper's first row.
- "adapter_L" (Lin et al., 2020): one adapter per block, after the MLP, behind a LayerNorm.
- "adapter_H" (Houlsby et al., 2019): two adapters per block, after attention and after the MLP.
  An adapter is x + up(gelu(down(x))) with biases; bottleneck sizes give the paper's trainable-parameter
  budgets |Theta| (0.5M for 32 x 512, 11M for 16 x 256 and 1 x 128).
- "lora_fused" / "lora_eager": LoRA left unmerged on the attention projection (c_attn, r = 4), with this
  package's fused layer or written PEFT-style; not in the paper's table, shown for the cost of not merging.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# (batch, sequence length, adapter parameter budget) of the paper's three columns
COLUMNS = [(32, 512, 0.5e6), (16, 256, 11e6), (1, 128, 11e6)]
PAPER_MS = {"none": (1449.4, 338.0, 19.8), "adapter_L": (1482.0, 354.0, 23.9), "adapter_H": (1492.2, 366.3, 25.8)}
METHODS = ("none", "adapter_L", "adapter_H", "lora_fused", "lora_eager")


class Adapter(nn.Module):
    def __init__(self, d: int, bottleneck: int, layer_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)

    def forward(self, h):
        return h + self.up(nn.functional.gelu(self.down(self.norm(h))))


def bottleneck(method: str, budget: float, d: int, n_layer: int) -> int:
    """Bottleneck size that spends `budget` trainable parameters: 2 adapters per block for H, 1 (+ LayerNorm) for L."""
    per_block = 2 if method == "adapter_H" else 1
    return max(1, round(budget / (n_layer * per_block * (2 * d + 1))))


def _add_adapters(model, method: str, b: int):
    """Insert adapters as forward hooks on the blocks' attention and MLP outputs."""
    d = model.config.n_embd
    model.adapters = nn.ModuleList()
    for block in model.transformer.h:
        sites = [block.mlp] if method == "adapter_L" else [block.attn, block.mlp]
        for site in sites:
            adapter = Adapter(d, b, layer_norm=method == "adapter_L")
            model.adapters.append(adapter)

            def hook(module, inputs, output, adapter=adapter):
                if isinstance(output, tuple):  # attention returns (hidden, ...)
                    return (adapter(output[0]),) + tuple(output[1:])
                return adapter(output)

            site.register_forward_hook(hook)
    return model


class _EagerLoRA(nn.Module):
    """A Conv1D with a PEFT-style unmerged LoRA update."""

    def __init__(self, conv, r):
        super().__init__()
        self.conv = conv
        self.lora_A = nn.Linear(conv.weight.shape[0], r, bias=False)
        self.lora_B = nn.Linear(r, conv.weight.shape[1], bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def forward(self, x):
        return self.conv(x) + self.lora_B(self.lora_A(x)) * 2.0


def build(method: str, budget: float, n_layer: int = 24, device="cpu", dtype=torch.float32, base=None):
    """GPT-2 medium (or its first n_layer blocks) with `method` applied, in eval mode."""
    import transformers

    import lora_kernels

    if base is None:
        cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
        base = transformers.GPT2LMHeadModel(cfg)
    model = copy.deepcopy(base)
    if method.startswith("adapter"):
        _add_adapters(model, method, bottleneck(method, budget, 1024, len(model.transformer.h)))
    elif method == "lora_fused":
        lora_kernels.inject(model, ["c_attn"], r=4, lora_alpha=8, init_lora_weights=False)
    elif method == "lora_eager":
        for block in model.transformer.h:
            block.attn.c_attn = _EagerLoRA(block.attn.c_attn, 4)
    return model.to(device=device, dtype=dtype).eval()


def forward_fn(model, batch: int, seq: int, device):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def run():
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    return run
