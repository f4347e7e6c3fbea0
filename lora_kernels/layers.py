"""FusedLoRALinear: a drop-in nn.Linear with a LoRA update, computed by the fused ops (no kernel code here)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import backends
from .ops import lora_linear

__all__ = ["FusedLoRALinear"]


def _full(t: Tensor) -> Tensor:
    """The whole tensor behind a parameter: a DTensor (FSDP2 shards, tensor parallel) is gathered (a collective:
    every rank must call); a plain tensor is returned as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(value: Tensor, param: Tensor) -> Tensor:
    """`value` (a whole tensor) laid out like `param`: sharded the same way when `param` is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


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
    ``fan_in_fan_out=True`` stores W0 as [in, out] (Hugging Face's GPT-2 ``Conv1D``); the kernels read it
    through a transposed view, no copy.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights: bool | str = "kaiming", backend: str = "auto", merge_on_eval: bool = False,
                 fan_in_fan_out: bool = False, device=None, dtype=None, *, _weight: Tensor | None = None,
                 _bias: Tensor | None = None):
        super().__init__()
        _check_hparams(r, lora_alpha, lora_dropout, in_features, out_features)
        backends.check_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.set_lora_hparams(lora_alpha, use_rslora, lora_dropout)
        self.backend = backend
        self.merge_on_eval = merge_on_eval
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False
        if _weight is None:
            linear = nn.Linear(in_features, out_features, bias=bias, **factory)
            _weight, _bias = linear.weight, linear.bias
            if fan_in_fan_out:
                _weight = nn.Parameter(_weight.detach().t().contiguous())
        expected = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        if tuple(_weight.shape) != expected:
            raise ValueError(f"weight: expected shape {list(expected)} (fan_in_fan_out={fan_in_fan_out}), "
                             f"got {list(_weight.shape)}")
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

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    **kwargs) -> "FusedLoRALinear":
        """Wrap a Hugging Face ``Conv1D`` (GPT-2 style: weight [in, out], y = x W + b), sharing its weight."""
        weight = getattr(conv1d, "weight", None)
        if weight is None or weight.dim() != 2 or not hasattr(conv1d, "nf"):
            raise TypeError(f"conv1d: expected a transformers Conv1D (weight [in, out], attribute nf), "
                            f"got {type(conv1d).__name__}")
        return cls(weight.shape[0], weight.shape[1], r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   bias=conv1d.bias is not None, fan_in_fan_out=True, _weight=weight, _bias=conv1d.bias, **kwargs)

    def base_weight(self) -> Tensor:
        """W0 as [out_features, in_features] (a transposed view when fan_in_fan_out)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def set_lora_hparams(self, lora_alpha: float, use_rslora: bool = False, lora_dropout: float | None = None) -> None:
        """Set alpha (and with it the scaling), rsLoRA and dropout; the rank is fixed by lora_A / lora_B."""
        lora_dropout = getattr(self, "lora_dropout", 0.0) if lora_dropout is None else lora_dropout
        _check_hparams(self.r, lora_alpha, lora_dropout, self.in_features, self.out_features)
        if getattr(self, "merged", False):
            raise RuntimeError("set_lora_hparams: unmerge() first (the merged weight holds the old scaling)")
        self.lora_alpha, self.use_rslora, self.lora_dropout = lora_alpha, use_rslora, float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)

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
            return nn.functional.linear(x, self.base_weight(), self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.scaling, p,
                           backend=self.backend)

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> Tensor:
        """scaling * B A in fp32, laid out like ``weight`` (the update that merge() adds to it). Sharded
        parameters (FSDP2) are gathered first, so every rank must call it."""
        delta = (_full(self.lora_B.detach()).float() @ _full(self.lora_A.detach()).float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def _add_to_weight(self, sign: float) -> None:
        delta = _like(self.delta_weight(), self.weight)
        self.weight.copy_((self.weight.float() + sign * delta).to(self.weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += scaling * B A (computed in fp32, rounded once); the forward then is a plain linear."""
        if self.merged:
            return
        self._add_to_weight(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scaling * B A. In 16-bit dtypes W0 comes back within two roundings of its value before merge()."""
        if not self.merged:
            return
        self._add_to_weight(-1.0)
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_on_eval:
            self.unmerge() if mode else self.merge()
        return self

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + scaling * B A (new tensors; this layer is left as it is)."""
        w = _full(self.weight.detach()).float()
        if not self.merged:
            w = w + self.delta_weight()
        if self.fan_in_fan_out:
            w = w.t()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(_full(self.bias.detach()))
        return out

    def to_base_layer(self, merge: bool = True) -> nn.Module:
        """A plain layer of the wrapped kind (nn.Linear, or transformers' Conv1D when fan_in_fan_out) holding
        W0 + scaling * B A if `merge`, else W0. The bias, and W0 when no arithmetic is needed, are shared."""
        weight = self.weight
        if merge != self.merged:
            delta = self.delta_weight()
            w = weight.detach().float() + (delta if merge else -delta)
            weight = nn.Parameter(w.to(weight.dtype), requires_grad=False)
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features)
        else:
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = weight
        out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"scaling={self.scaling:g}, backend={self.backend!r}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))
