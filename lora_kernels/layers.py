"""FusedLoRALinear: a drop-in nn.Linear with a LoRA update, computed by the fused ops (no kernel code here)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import backends
from .ops import lora_linear

__all__ = ["FusedLoRALinear"]


def _check_hparams(r, lora_alpha, lora_dropout, in_features, out_features):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if r > min(in_features, out_features):
        raise ValueError(f"r = {r} must be <= min(in_features, out_features) = {min(in_features, out_features)}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) \
            or lora_alpha <= 0:
        raise ValueError(f"lora_alpha: expected a finite number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")


class FusedLoRALinear(nn.Module):
    """y = x W0^T + bias + scaling * (dropout(x) A^T) B^T with W0 and bias frozen.

    Same attributes as nn.Linear (``in_features, out_features, weight, bias``) plus ``lora_A`` [r, in],
    ``lora_B`` [out, r], ``r``, ``lora_alpha``, ``scaling`` (alpha / r, or alpha / sqrt(r) with
    ``use_rslora``) and ``merged``. State dict keys: ``weight, bias, lora_A, lora_B`` (loralib's).

    ``merge_on_eval=True`` folds the update into W0 on ``eval()`` and takes it out again on ``train()``
    (loralib's ``merge_weights``). ``backend`` is passed to the ops: "auto", "torch", "triton" or "cuda".
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights: bool | str = "kaiming", backend: str = "auto", merge_on_eval: bool = False,
                 device=None, dtype=None, *, _weight: Tensor | None = None, _bias: Tensor | None = None):
        super().__init__()
        _check_hparams(r, lora_alpha, lora_dropout, in_features, out_features)
        if backend not in backends.NAMES:
            raise ValueError(f"backend: unknown name {backend!r}; expected one of {backends.NAMES}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.backend = backend
        self.merge_on_eval = merge_on_eval
        self.merged = False
        if _weight is None:
            linear = nn.Linear(in_features, out_features, bias=bias, **factory)
            _weight, _bias = linear.weight, linear.bias
        self.weight = _weight if isinstance(_weight, nn.Parameter) else nn.Parameter(_weight)
        self.weight.requires_grad_(False)
        if _bias is not None:
            self.bias = _bias if isinstance(_bias, nn.Parameter) else nn.Parameter(_bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=w.device, dtype=w.dtype))
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    **kwargs) -> "FusedLoRALinear":
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   bias=linear.bias is not None, _weight=linear.weight, _bias=linear.bias, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = "kaiming") -> None:
        """A: kaiming-uniform(a=sqrt(5)) as loralib/PEFT, or gaussian std 1/r; B: zeros (so the layer starts
        equal to the base). ``False`` leaves B random too (tests, or a non-identity start)."""
        if init_lora_weights in (True, "kaiming"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            raise ValueError(f"init_lora_weights: expected 'kaiming', 'gaussian', True or False, got {init_lora_weights!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, p, backend=self.backend)

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> Tensor:
        """scaling * B A in fp32 (the update that merge() adds to W0)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += scaling * B A (computed in fp32, rounded once); the forward then is a plain linear."""
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scaling * B A. In 16-bit dtypes W0 comes back within two roundings of its value before merge()."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_on_eval:
            self.unmerge() if mode else self.merge()
        return self

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + scaling * B A (new tensors; this layer is left as it is)."""
        w = self.weight.detach().float()
        if not self.merged:
            w = w + self.delta_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"scaling={self.scaling:g}, backend={self.backend!r}, merged={self.merged}")
