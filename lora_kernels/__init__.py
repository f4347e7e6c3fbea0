"""lora-kernels: fused LoRA layers for PyTorch (Triton kernels behind torch.library ops)."""

from . import ops  # registers the lora_kernels:: ops
from ._report import info
from .backends import BackendUnavailableError
from .experts import experts_linear
from .layers import FusedLoRALinear, LoRAExperts, QuantizedLoRALinear
from .stacking import adapter_ids
from .models import (adapter_ids_for, add_adapter, delete_adapter, experts_layers, inject, lora_layers,
                     lora_state_dict, mark_only_lora_as_trainable, merge, set_adapter, unload, unmerge)
from .ops import lora_linear, lora_linear_mixed, stack_adapters
from .peft_format import load_adapter, save_adapter
from .quantized import qlora_linear, quantized_weight
from .quantized import shardable as shardable_quantized

__version__ = "0.1.0"

__all__ = ["FusedLoRALinear", "QuantizedLoRALinear", "LoRAExperts", "lora_linear", "lora_linear_mixed",
           "stack_adapters", "experts_linear", "experts_layers", "qlora_linear", "quantized_weight",
           "shardable_quantized", "info", "BackendUnavailableError", "inject", "lora_layers",
           "mark_only_lora_as_trainable", "lora_state_dict", "merge", "unmerge", "unload", "save_adapter",
           "load_adapter", "add_adapter", "set_adapter", "delete_adapter", "adapter_ids", "adapter_ids_for",
           "__version__"]
