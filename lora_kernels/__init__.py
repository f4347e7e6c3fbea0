"""lora-kernels: fused LoRA layers for PyTorch (Triton kernels behind torch.library ops)."""

from . import ops  # registers the lora_kernels:: ops
from .backends import BackendUnavailableError
from ._report import info
from .layers import FusedLoRALinear
from .ops import lora_linear

__version__ = "0.1.0"

__all__ = ["FusedLoRALinear", "lora_linear", "info", "BackendUnavailableError", "__version__"]
