"""A one-call swap inside an existing Hugging Face PeftModel: ``fuse(peft_model)``.

The LoRA Linear layers of the model become ``FusedPeftLinear``, a subclass of PEFT's own LoRA Linear whose
forward runs the fused ops (LoRA, and DoRA through ``dora_linear``): same parameters, state dict, ``save_pretrained``
and ``merge_and_unload``. What the fused path does not cover (other LoRA variants, several active adapters at once)
falls back to PEFT's forward with a one-time warning. Mixed-adapter batches (``adapter_names=`` in forward) run the
one-launch mixed kernels. ``register(lora_config)`` puts the fused layer into PEFT's
custom-module hook (``LoraConfig._register_custom_module``) so PEFT builds fused layers itself (plain ``nn.Linear``
and ``Conv1D`` bases). ``fuse`` also takes PEFT's LoRA layers over bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases
(QLoRA): their forward runs ``lora_kernels.quantized.qlora_linear`` on the base layer's quantized weight.

Needs ``peft`` (``pip install lora-kernels[peft]``). The adapter file format is in ``peft_format``.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from . import backends, plan
from .adapters import adapter_forward
from .layers import _expand_ids
from .models import is_plain_linear
from .ops import autocast_dtype, autocast_inputs, check_mixed_args, mixed_call
from .quantized import is_quantized_linear
from .stacking import AdapterStack, checked_ids

__all__ = ["fuse", "register", "FusedPeftLinear"]


# ------------------------------------------------------------------------------------------------------------
# fuse: PEFT's own layers, fused
# ------------------------------------------------------------------------------------------------------------
def _peft_linear_cls():
    from peft.tuners.lora.layer import Linear

    return Linear


class _FusedForward:
    """The forward that FusedPeftLinear puts in front of PEFT's LoRA Linear."""

    fused_backend = "auto"
    _lk_stack = None  # mixed batches: the adapters stacked (and cast), kept in inference
    _lk_norms = None  # DoRA adapters: their DoraNorms by name

    def _fused_unsupported(self, x, args, kwargs) -> str | None:
        """Why this call cannot take the fused path (None if it can). Normal states (merged, adapters disabled)
        return an empty string: they fall back silently."""
        if self.disable_adapters or self.merged:
            return ""
        if args or set(kwargs) - {"adapter_names"}:
            return f"extra forward arguments {sorted(kwargs) or len(args)} (variants)"
        if kwargs.get("adapter_names") is not None:
            if len(kwargs["adapter_names"]) != x.shape[0]:
                return ""  # PEFT raises its own error for this
            # names of adapters this layer does not have mean the base layer here, as in PEFT's own path
            here = sorted(set(kwargs["adapter_names"]) & set(self.lora_A))
            return next((why for a in here if (why := self._adapter_unsupported(a, x, mixed=True))), None)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return f"{len(active)} active adapters at once"
        return self._adapter_unsupported(active[0], x)

    def _adapter_unsupported(self, adapter, x, mixed=False) -> str | None:
        if adapter in self.lora_variant:
            variant = type(self.lora_variant[adapter]).__name__
            if variant != "DoraLinearVariant" or mixed:
                return f"the LoRA variant {variant}" + (" in a mixed batch" if mixed else "")
        base = self.get_base_layer()
        quantized = is_quantized_linear(base)
        if not is_plain_linear(base) and not quantized:
            return f"the base layer type {type(base).__name__}"
        if quantized and (mixed or adapter in self.lora_variant):
            return f"{'a mixed batch' if mixed else 'DoRA'} over a quantized base layer"
        dropout = self.lora_dropout[adapter]
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return f"the dropout module {type(dropout).__name__}"
        if not quantized and x.dtype != base.weight.dtype and autocast_dtype(x) is None:  # (autocast casts both)
            return f"input dtype {x.dtype} differing from the base weight's {base.weight.dtype}"
        return None

    def _dropout_p(self, adapter) -> float:
        dropout = self.lora_dropout[adapter]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def forward(self, x, *args, **kwargs):
        why = self._fused_unsupported(x, args, kwargs)
        if why is not None:
            if why:
                backends.warn_once(f"peft-fallback-{why}", f"lora_kernels.peft: PEFT's own forward serves {why}")
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if is_quantized_linear(base):  # QLoRA: y in x's dtype, as PEFT's bitsandbytes layers return it
            adapter = next(a for a in self.active_adapters if a in self.lora_A)
            return adapter_forward(x, None, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                   self.scaling[adapter], self._dropout_p(adapter), backend=self.fused_backend,
                                   quantized_base=base)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        # torch.autocast: as PEFT's layers (nn.Linear under autocast) compute
        x, weight, bias = autocast_inputs(x, weight, base.bias)
        if kwargs.get("adapter_names") is not None:
            return self._mixed_forward(x, weight, bias, kwargs["adapter_names"])
        adapter = next(a for a in self.active_adapters if a in self.lora_A)
        # PEFT keeps adapters in fp32 next to a 16-bit base (its autocast_adapter_dtype): the ops take them as they are
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        magnitude = norms = None
        if adapter in self.lora_variant:  # DoRA (the only variant that gets here)
            from .dora import DoraNorms

            magnitude = self.lora_magnitude_vector[adapter].weight
            if self._lk_norms is None:
                self._lk_norms = {}
            norms = self._lk_norms.setdefault(adapter, DoraNorms())
        return adapter_forward(x, weight, bias, a, b, self.scaling[adapter], self._dropout_p(adapter),
                               magnitude=magnitude, norms=norms, backend=self.fused_backend)

    def _mixed_forward(self, x, weight, bias, adapter_names):
        """PEFT's mixed batch (one adapter name per sample; "__base__" or an adapter this layer lacks: the base
        layer alone) in one launch."""
        used = list(dict.fromkeys(n for n in adapter_names if n in self.lora_A))
        if not used:
            return nn.functional.linear(x, weight, bias)
        ids = _sample_ids(tuple(adapter_names), tuple(used), x.device)  # the same tensor for every layer
        expanded = _expand_ids(ids, x.shape[:-1])  # one id per sample, broadcast over its tokens
        if self._lk_stack is None:
            self._lk_stack = AdapterStack()  # inference reuses the stacked (and cast) adapters
        a, b, owner = self._lk_stack.get([self.lora_A[n].weight for n in used],
                                         [self.lora_B[n].weight for n in used], dtype=x.dtype)
        scalings = [float(self.scaling[n]) for n in used]
        ps = [float(self._dropout_p(n)) for n in used]
        check_mixed_args(x, weight, bias, a, b, expanded, owner, scalings, ps)
        flat = checked_ids(ids, expanded, len(used), x.device)
        return mixed_call(x, weight, bias, a, b, owner, flat, scalings, ps, self.fused_backend, None)


@functools.lru_cache(maxsize=256)
def _sample_ids(adapter_names: tuple, used: tuple, device) -> torch.Tensor:
    """Each sample's index into `used` (-1: none), cached: one host-to-device copy per distinct batch layout
    rather than one per layer and call (such a copy waits for the stream)."""
    index = {n: i for i, n in enumerate(used)}
    return torch.tensor([index.get(n, -1) for n in adapter_names], device=device)


_FUSED_CLASSES: dict = {}


def _fused_cls(peft_cls=None):
    """The fused subclass of one of PEFT's LoRA layer classes (default: its Linear, giving FusedPeftLinear; its
    bitsandbytes Linear4bit / Linear8bitLt give FusedPeftLinear4bit / FusedPeftLinear8bitLt), built lazily so that
    importing lora_kernels.peft does not import peft."""
    peft_cls = peft_cls or _peft_linear_cls()
    if peft_cls not in _FUSED_CLASSES:
        name = "FusedPeftLinear" + ("" if peft_cls is _peft_linear_cls() else peft_cls.__name__.replace("Linear", ""))
        _FUSED_CLASSES[peft_cls] = type(name, (_FusedForward, peft_cls), {"__module__": __name__})
    return _FUSED_CLASSES[peft_cls]


def _peft_quantized_classes() -> tuple:
    """PEFT's LoRA layer classes over bitsandbytes bases (none when bitsandbytes is not imported)."""
    if "bitsandbytes" not in sys.modules:
        return ()
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return ()
    return tuple(getattr(peft_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(peft_bnb, n))


def __getattr__(name):
    if name == "FusedPeftLinear":
        return _fused_cls()
    raise AttributeError(name)


def _dispatch(target, adapter_name, config, **kwargs):
    """PEFT custom-module hook: only plain nn.Linear / Conv1D bases (never quantized subclasses) get the
    fused layer; anything else returns None so PEFT's own dispatchers take it."""
    from peft.tuners.lora.layer import dispatch_default
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_plain_linear(base) or kwargs.get("parameter_name") is not None:
        return None
    module = dispatch_default(target, adapter_name, config=config, **kwargs)
    if type(module) is _peft_linear_cls():
        module.__class__ = _fused_cls()
    return module


def register(config, backend: str = "auto"):
    """Register the fused layer on a LoraConfig through PEFT's custom-module hook, so that ``get_peft_model`` /
    ``PeftModel.from_pretrained(..., config=config)`` / ``add_adapter`` build fused layers directly (for plain
    nn.Linear and Conv1D bases only). Returns the config."""
    plan.check_name(backend)

    def dispatch(target, adapter_name, config, **kwargs):
        module = _dispatch(target, adapter_name, config, **kwargs)
        if module is not None:
            module.fused_backend = backend
        return module

    config._register_custom_module({nn.Linear: dispatch})
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers, no Conv1D layers to target
        return config
    config._register_custom_module({Conv1D: dispatch})
    return config


def fuse(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every LoRA Linear layer of `peft_model` run the fused kernels, in place (returns the model).

    Existing layers become FusedPeftLinear (a subclass of PEFT's LoRA Linear: same parameters, state dict,
    saving, merge_and_unload). Layers that adapters create later are PEFT's own unless their config went
    through ``register``; calling ``fuse`` again converts them."""
    plan.check_name(backend)
    linear_cls = _peft_linear_cls()
    fused = {linear_cls: _fused_cls()}
    fused.update((cls, _fused_cls(cls)) for cls in _peft_quantized_classes())
    own = {f: f for f in fused.values()}
    count = 0
    for module in peft_model.modules():
        target = fused.get(type(module)) or own.get(type(module))
        base = module.get_base_layer() if target is not None else None
        if target is not None and (is_plain_linear(base) or is_quantized_linear(base)):
            module.__class__ = target
            module.fused_backend = backend
            count += 1
    if count == 0:
        raise ValueError("fuse: the model has no PEFT LoRA Linear layer over a plain nn.Linear, Conv1D or bitsandbytes "
                         "Linear4bit / Linear8bitLt")
    return peft_model
