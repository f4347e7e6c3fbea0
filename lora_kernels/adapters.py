"""The adapters of a layer, in one container, and the one forward path every layer kind runs an adapter through.

``Adapter`` holds one adapter's parameters (``lora_A`` [r, K], ``lora_B`` [N, r] and, for DoRA, the magnitude
``lora_magnitude_vector`` [N]) and its hyper-parameters (rank, alpha, dropout, rsLoRA, DoRA). ``AdapterSet`` is an
ordered ``nn.ModuleDict`` of them; ``FusedLoRALinear`` keeps all its adapters there, the default one included, and a
state-dict hook gives the default adapter loralib's key names (``lora_A``, ``lora_B``, ``lora_magnitude_vector``).

``adapter_forward`` is the forward of one adapter over a base layer, for this package's layers and for PEFT's fused
layers alike: LoRA through ``lora_linear``, DoRA through ``dora_linear`` (its weight norms kept per layer by a
``DoraNorms``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Adapter", "AdapterSet", "adapter_forward", "check_hparams", "lora_scaling", "DEFAULT"]

DEFAULT = "default"


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's scaling: alpha / r (rsLoRA: alpha / sqrt(r))."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def check_hparams(r, lora_alpha, lora_dropout):
    """Raise a ValueError naming the hyper-parameter and the expected value. Any rank >= 1 is valid, as in PEFT (a
    rank above min(in_features, out_features) is not low-rank, but PEFT accepts it: heads with one or two outputs,
    the summed ranks of add_weighted_adapter's "cat"); the planner runs such ranks on the variants that serve them."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) \
            or lora_alpha <= 0:
        raise ValueError(f"lora_alpha: expected a finite number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")


@torch.no_grad()
def init_lora(A: Tensor, B: Tensor, r: int, init_lora_weights) -> None:
    if init_lora_weights in (True, "kaiming"):
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
    elif init_lora_weights == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
        nn.init.zeros_(B)
    elif init_lora_weights is False:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        raise ValueError(f"init_lora_weights: expected 'kaiming', 'gaussian', True or False, got {init_lora_weights!r}")


class Adapter(nn.Module):
    """One adapter: ``lora_A`` [r, in], ``lora_B`` [out, r], with ``use_dora`` the magnitude
    ``lora_magnitude_vector`` [out] (PEFT's name); hyper-parameters r, lora_alpha, lora_dropout, use_rslora, use_dora
    and the scaling alpha / r (rsLoRA: alpha / sqrt(r))."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, device=None, dtype=None):
        super().__init__()
        check_hparams(r, lora_alpha, lora_dropout)
        self.r, self.use_dora = r, bool(use_dora)
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=device, dtype=dtype))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty((out_features,), device=device, dtype=dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.set_hparams(lora_alpha, use_rslora, lora_dropout)

    def set_hparams(self, lora_alpha: float, use_rslora: bool = False, lora_dropout: float | None = None) -> None:
        lora_dropout = getattr(self, "lora_dropout", 0.0) if lora_dropout is None else lora_dropout
        check_hparams(self.r, lora_alpha, lora_dropout)
        self.lora_alpha, self.use_rslora, self.lora_dropout = lora_alpha, bool(use_rslora), float(lora_dropout)
        self.scaling = lora_scaling(lora_alpha, self.r, use_rslora)

    def hparams(self) -> dict:
        return dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, use_rslora=self.use_rslora,
                    use_dora=self.use_dora, scaling=self.scaling)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, scaling={self.scaling:g}"
                + (", use_rslora=True" if self.use_rslora else "") + (", use_dora=True" if self.use_dora else ""))


class AdapterSet(nn.ModuleDict):
    """A layer's adapters by name, in the order they were added (a mixed batch's adapter ids index this order)."""


def adapter_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scaling: float, dropout_p: float, *, magnitude: Tensor | None = None, norms=None,
                    backend: str = "auto", quantized_base=None, lora_bias: Tensor | None = None) -> Tensor:
    """One adapter over a base layer (W0 [N, K] and bias): LoRA, or DoRA when `magnitude` is given (`norms`: the
    layer's DoraNorms, which keeps ||W0||^2 per row and, in inference, the whole norm). `quantized_base`: a
    bitsandbytes layer whose quantized weight is W0 (QLoRA, and QDoRA with `magnitude`; `weight` is then unused),
    computed in its compute dtype.
    `lora_bias`: a bias of lora_B [N] (PEFT's ``lora_bias=True``): y gains scaling * lora_bias, which the kernels add
    with the base bias (its grad is scaling times the bias's)."""
    if lora_bias is not None:
        if magnitude is not None:
            raise ValueError("lora_bias: DoRA takes no bias on lora_B (PEFT refuses the combination too)")
        term = lora_bias * scaling
        bias = term if bias is None else bias + term
        if weight is not None:  # the ops take the bias in the product's dtype (autocast casts it with the rest)
            bias = bias.to(weight.dtype)
    if quantized_base is not None:
        from .quantized import compute_dtype, qlora_linear, quantized_weight

        qw, dtype = quantized_weight(quantized_base), compute_dtype(quantized_base, x)
        if magnitude is not None:  # QDoRA
            from .dora import qdora_linear

            return qdora_linear(x, qw, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend=backend,
                                norms=norms, compute_dtype=dtype)
        return qlora_linear(x, qw, bias, lora_A, lora_B, scaling, dropout_p, backend=backend, compute_dtype=dtype)
    if magnitude is None:
        from .ops import lora_linear

        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend=backend)
    from .dora import dora_linear

    return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend=backend, norms=norms)
