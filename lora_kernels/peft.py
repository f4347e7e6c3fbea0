"""A one-call swap inside an existing Hugging Face PeftModel: ``fuse(peft_model)``.

The LoRA Linear layers of the model become ``FusedPeftLinear``, a subclass of PEFT's own LoRA Linear whose
forward runs the fused ops (LoRA, ``lora_bias``, any rank, and DoRA through ``dora_linear``): same parameters, state
dict, ``save_pretrained``, merging and repr. The rule: every call is served exactly (PEFT's outputs and gradients) or
handed to PEFT's own forward, with one warning per reason (none for PEFT's normal states: merged, adapters disabled, no
active adapter on the layer). Handed back: LoRA variants other than DoRA, several active adapters at once, forward
hooks other than accelerate's device placement / offloading (which the fused path enters itself), and every other LoRA
layer type; ``fuse_report(model)`` lists them. Mixed-adapter batches (``adapter_names=`` in forward) run the
one-launch mixed kernels. ``register(lora_config)`` puts the fused layer into PEFT's
custom-module hook (``LoraConfig._register_custom_module``) so PEFT builds fused layers itself (plain ``nn.Linear``
and ``Conv1D`` bases). ``fuse`` also takes PEFT's LoRA layers over bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases
(QLoRA): their forward runs ``lora_kernels.quantized.qlora_linear`` on the base layer's quantized weight. PEFT's
``ParamWrapper`` (``target_parameters``) on transformers' MoE experts modules becomes a fused ParamWrapper: the
outermost wrapper of each experts module runs the whole experts block on ``lora_kernels.experts`` with every wrapper's
adapter (PEFT's W0 + s B A per expert is never formed).

Needs ``peft`` (``pip install lora-kernels[peft]``). The adapter file format is in ``peft_format``.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import backends, plan
from .adapters import adapter_forward
from .experts import ExpertAdapter, experts_block, is_experts_module, projections, routing_args
from .models import is_plain_linear
from .ops import autocast_dtype, autocast_inputs, check_mixed_args, mixed_call
from .quantized import is_quantized_linear
from .stacking import AdapterStack, checked_ids, expand_ids

__all__ = ["fuse", "fuse_report", "FuseReport", "register", "FusedPeftLinear"]


# ------------------------------------------------------------------------------------------------------------
# fuse: PEFT's own layers, fused
# ------------------------------------------------------------------------------------------------------------
def _peft_linear_cls():
    from peft.tuners.lora.layer import Linear

    return Linear


def _accelerate_hook_fused(module: nn.Module) -> bool | None:
    """How accelerate's hook on `module` (``add_hook_to_module``: device_map dispatch, ``cpu_offload``) stands to the
    fused path: None when there is none; True when it only moves tensors (``AlignDevicesHook``, alone or in a
    ``SequentialHook``: inputs to the execution device, offloaded weights loaded before and released after, the output
    moved back), so the fused path runs inside its pre_forward / post_forward; False for any other hook."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return None if "forward" not in module.__dict__ else False
    hooks = getattr(hook, "hooks", (hook,)) if type(hook).__name__ == "SequentialHook" else (hook,)
    return all(type(h).__name__ == "AlignDevicesHook" and not h.no_grad for h in hooks) and not hook.no_grad


def _has_torch_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> str | None:
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "global module forward hooks (registered with torch.nn.modules.module)"
    return None


def _hooked(module: nn.Module) -> bool:
    """Any forward hook on `module`: torch's, or accelerate's of any kind."""
    return _has_torch_hooks(module) or "_hf_hook" in module.__dict__


def _hooks_unsupported(layer, adapters) -> str | None:
    """Why hooks around a LoRA layer's parts keep it on PEFT's forward (None: the fused path honours them). PEFT calls
    the base layer and the adapters' modules, so their hooks run there; the fused path computes the whole layer at
    once and serves only hooks that move tensors (accelerate's device placement and offloading), entering them
    around the fused computation."""
    why = _global_hooks()
    if why:
        return why
    base = layer.get_base_layer()
    if _has_torch_hooks(base) or _accelerate_hook_fused(base) is False:
        return "forward hooks on the base layer"
    for a in adapters:
        for part in (layer.lora_A[a], layer.lora_B[a], layer.lora_dropout[a]):
            if _has_torch_hooks(part) or _accelerate_hook_fused(part) is False:
                return "forward hooks on the adapters' modules"
    return None


def _hooked_parts(layer, base, adapters) -> list:
    """The parts of a LoRA layer that carry accelerate's device hook (base layer first)."""
    parts = [base] + [m for a in adapters for m in (layer.lora_A[a], layer.lora_B[a])]
    return [m for m in parts if "_hf_hook" in m.__dict__]


class _FusedLayer:
    """What every fused PEFT layer shares: PEFT's class name in reprs, the backend in extra_repr."""

    fused_backend = "auto"

    def _get_name(self):
        # print(model) and PEFT's tooling read the layer as PEFT's own (lora.Linear(...)); the marking is inside
        return next(c for c in type(self).__mro__[1:] if not issubclass(c, _FusedLayer)).__name__

    def extra_repr(self) -> str:
        return f"fused=True, backend={self.fused_backend!r}"


class _FusedForward(_FusedLayer):
    """The forward that FusedPeftLinear puts in front of PEFT's LoRA Linear. It serves exactly what PEFT's forward
    computes, or hands the call to PEFT's forward (one warning per reason; none for PEFT's normal states)."""

    _lk_stack = None  # mixed batches: the adapters stacked (and cast), kept in inference
    _lk_norms = None  # DoRA adapters: their DoraNorms by name

    def _fused_unsupported(self, x, args, kwargs) -> tuple[str | None, list]:
        """(why this call cannot take the fused path, None if it can; the adapters it uses here). Normal states
        (merged, adapters disabled, no active adapter on this layer) give an empty string: they go to PEFT's forward
        silently."""
        if self.disable_adapters or self.merged:
            return "", []
        if args or set(kwargs) - {"adapter_names"}:
            return f"extra forward arguments {sorted(kwargs) or len(args)} (variants)", []
        names = kwargs.get("adapter_names")
        if names is not None:
            if len(names) != x.shape[0]:
                return "", []  # PEFT raises its own error for this
            # names of adapters this layer does not have mean the base layer here, as in PEFT's own path
            used = sorted(set(names) & set(self.lora_A))
            why = next((why for a in used if (why := self._adapter_unsupported(a, x, mixed=True))), None)
        else:
            used = [a for a in self.active_adapters if a in self.lora_A]
            if not used:
                return "", used  # PEFT returns the base layer's output
            if len(used) > 1:
                return f"{len(used)} active adapters at once", used
            why = self._adapter_unsupported(used[0], x)
        return why or _hooks_unsupported(self, used), used

    def _adapter_unsupported(self, adapter, x, mixed=False) -> str | None:
        if adapter in self.lora_variant:
            variant = type(self.lora_variant[adapter]).__name__
            if variant != "DoraLinearVariant" or mixed:
                return f"the LoRA variant {variant}" + (" in a mixed batch" if mixed else "")
        base = self.get_base_layer()
        quantized = is_quantized_linear(base)
        if not is_plain_linear(base) and not quantized:
            return f"the base layer type {type(base).__name__}"
        if quantized and mixed:
            return "a mixed batch over a quantized base layer"
        if mixed and self.lora_bias.get(adapter):
            return "lora_bias in a mixed batch"
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
        why, used = self._fused_unsupported(x, args, kwargs)
        if why is not None:
            if why:
                backends.warn_once(f"peft-fallback-{why}", f"lora_kernels.peft: PEFT's own forward serves {why}")
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        names = kwargs.get("adapter_names")
        hooked = _hooked_parts(self, base, used)
        if not hooked:
            return self._fused_forward(base, x, names, used)
        # accelerate's device hooks, as PEFT's calls of the parts run them: x to the execution device and offloaded
        # weights loaded before; the weights released and the output moved back (the base layer's hook last) after
        moved = [m._hf_hook.pre_forward(m, x)[0][0] for m in hooked]
        y = self._fused_forward(base, moved[0], names, used)
        for m in reversed(hooked):
            y = m._hf_hook.post_forward(m, y)
        return y

    def _fused_forward(self, base, x, adapter_names, used):
        quantized = is_quantized_linear(base)
        if quantized:  # QLoRA / QDoRA: y in x's dtype, as PEFT's bitsandbytes layers return it
            weight, bias = None, base.bias
        else:
            weight = base.weight.t() if self.fan_in_fan_out else base.weight
            # torch.autocast: as PEFT's layers (nn.Linear under autocast) compute
            x, weight, bias = autocast_inputs(x, weight, base.bias)
            if adapter_names is not None:
                return self._mixed_forward(x, weight, bias, adapter_names)
        adapter = used[0]  # the one active adapter (a mixed batch returned above)
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
                               magnitude=magnitude, norms=norms, backend=self.fused_backend,
                               quantized_base=base if quantized else None, lora_bias=self.lora_B[adapter].bias)

    def _mixed_forward(self, x, weight, bias, adapter_names):
        """PEFT's mixed batch (one adapter name per sample; "__base__" or an adapter this layer lacks: the base
        layer alone) in one launch."""
        used = list(dict.fromkeys(n for n in adapter_names if n in self.lora_A))
        if not used:
            return nn.functional.linear(x, weight, bias)
        ids = _sample_ids(tuple(adapter_names), tuple(used), x.device)  # the same tensor for every layer
        expanded = expand_ids(ids, x.shape[:-1])  # one id per sample, broadcast over its tokens
        if self._lk_stack is None:
            self._lk_stack = AdapterStack()  # inference reuses the stacked (and cast) adapters
        a, b, owner = self._lk_stack.get([self.lora_A[n].weight for n in used],
                                         [self.lora_B[n].weight for n in used], dtype=x.dtype)
        scalings = [float(self.scaling[n]) for n in used]
        ps = [float(self._dropout_p(n)) for n in used]
        check_mixed_args(x, weight, bias, a, b, expanded, owner, scalings, ps)
        flat = checked_ids(ids, expanded, len(used), x.device)
        return mixed_call(x, weight, bias, a, b, owner, flat, scalings, ps, self.fused_backend, None)


# ------------------------------------------------------------------------------------------------------------
# LoRA on MoE experts (PEFT's target_parameters: ParamWrapper, nested when several parameters of one module are
# targeted): the outermost wrapper of a transformers experts module runs the whole block on the experts op
# ------------------------------------------------------------------------------------------------------------
def _param_wrapper_cls():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def _wrapper_chain(module) -> tuple[list, nn.Module]:
    """(the ParamWrappers from `module` inwards, the module they wrap)."""
    cls = _param_wrapper_cls()
    chain = []
    while isinstance(module, cls):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _chain_unsupported(chain, base) -> str | None:
    """Why an experts module's wrappers keep PEFT's forward whatever the call (None: the fused block serves them)."""
    why = is_experts_module(base)
    if why:
        return f"LoRA on a parameter of {type(base).__name__} (target_parameters): {why}"
    why = _global_hooks()
    if why:
        return why
    if _hooked(base):
        return "forward hooks on the experts module"
    names = projections(base)
    for w in chain:
        if w.parameter_name not in names:
            return f"LoRA on {type(base).__name__}.{w.parameter_name} (the experts block adapts {' and '.join(names)})"
        if w is not chain[0] and _hooked(w):
            return "forward hooks on a nested ParamWrapper"
        if any(_hooked(m) for a in w.lora_A for m in (w.lora_A[a], w.lora_B[a])):
            return "forward hooks on the adapters' modules"
    if len({w.parameter_name for w in chain}) != len(chain):
        return "one parameter targeted by two ParamWrappers"
    return None


class _FusedExperts(_FusedLayer):
    """The forward put in front of PEFT's ParamWrapper. The outermost wrapper of an experts module computes the whole
    block with every wrapper's active adapter (PEFT forms W0 + s B A per expert and keeps it for the backward; this
    never forms it); inner wrappers are reached only when the outer one hands the call to PEFT's forward, and then
    hand it on too."""

    _lk_outer = False

    def forward(self, x, *args, **kwargs):
        if not self._lk_outer:
            return super().forward(x, *args, **kwargs)
        why, served = self._fused_unsupported(x, args, kwargs)
        if why is not None:
            if why:
                backends.warn_once(f"peft-fallback-{why}", f"lora_kernels.peft: PEFT's own forward serves {why}")
            return super().forward(x, *args, **kwargs)
        base, routed, adapters = served
        return experts_block(base, *routed, adapters, backend=self.fused_backend)

    def _fused_unsupported(self, x, args, kwargs) -> tuple[str | None, tuple]:
        chain, base = _wrapper_chain(self)
        if any(w.disable_adapters or w.merged for w in chain) or kwargs.get("adapter_names") is not None:
            return "", ()  # PEFT's normal states (and its own error for mixed batches)
        why = _chain_unsupported(chain, base)
        if why:
            return why, ()
        if getattr(base, "parametrizations", None):  # a wrapper outside this chain (or another tool) is active
            return "a parametrization on the experts' parameters", ()
        routed = routing_args(base, (x, *args), kwargs)
        if routed is None:
            return f"extra forward arguments {sorted(kwargs) or len(args)} of the experts module", ()
        adapters = {}
        for w in chain:
            used = [a for a in w.active_adapters if a in w.lora_A]
            if len(used) > 1:
                return f"{len(used)} active adapters at once", ()
            if not used:
                continue
            a = used[0]
            param = getattr(base, w.parameter_name)
            if param.requires_grad and torch.is_grad_enabled():
                return f"a trained experts parameter ({w.parameter_name} requires grad)", ()
            if w.lora_B[a].bias is not None or a in w.lora_variant:
                return "lora_bias or a LoRA variant on experts", ()
            E, r, K, N = base.num_experts, w.r[a], w.in_features, w.out_features
            # PEFT's factors: A [E r, K] expert-major, B [N, r E] rank-major (B_e = B.view(N, r, E)[:, :, e])
            adapters[w.parameter_name] = ExpertAdapter(w.lora_A[a].weight.view(E, r, K),
                                                       w.lora_B[a].weight.view(N, r, E).permute(2, 0, 1),
                                                       float(w.scaling[a]), 0.0)
        return None, (base, routed, adapters)


def _fused_wrapper_cls():
    cls = _param_wrapper_cls()
    if cls not in _FUSED_CLASSES:  # PEFT recognises its wrappers by class name (add_adapter nests or extends them)
        _FUSED_CLASSES[cls] = type("ParamWrapper", (_FusedExperts, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def _fuse_wrappers(peft_model: nn.Module, backend: str) -> None:
    """Every ParamWrapper becomes the fused one; the outermost of each chain serves the block."""
    cls = _param_wrapper_cls()
    fused = _fused_wrapper_cls()
    wrappers = [m for m in peft_model.modules() if isinstance(m, cls)]
    inner = {id(m.base_layer) for m in wrappers}
    for m in wrappers:
        m.__class__ = fused
        m.fused_backend = backend
        m._lk_outer = id(m) not in inner


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


class FuseReport(NamedTuple):
    """What ``fuse`` made of a model's LoRA layers (module names): ``fused``, and ``handed_back`` {reason: names} for
    the layers whose forward stays PEFT's. Calls of a fused layer that it cannot serve (a variant, several active
    adapters at once, hooks added later, ...) go to PEFT's forward too, with one warning per reason."""

    fused: list
    handed_back: dict

    def __str__(self) -> str:
        lines = [f"{len(self.fused)} LoRA layers fused"]
        for why, names in self.handed_back.items():
            lines.append(f"{len(names)} stay with PEFT's forward ({why}): {', '.join(names[:4])}"
                         + (" ..." if len(names) > 4 else ""))
        return "; ".join(lines)


def _static_reason(module) -> str | None:
    """Why a fused layer will hand every call back to PEFT, known without a call (None: it serves its calls)."""
    variants = sorted({type(v).__name__ for v in module.lora_variant.values()} - {"DoraLinearVariant"})
    if variants:
        return f"the LoRA variant {', '.join(variants)}"
    return _hooks_unsupported(module, list(module.lora_A))


def fuse_report(peft_model: nn.Module) -> FuseReport:
    """Which LoRA layers of `peft_model` run the fused kernels and which stay with PEFT's forward, and why."""
    from peft.tuners.lora.layer import LoraLayer

    fused, back = [], {}
    chains = {}  # each nested ParamWrapper reported as its chain's outermost one is served
    for module in peft_model.modules():
        if isinstance(module, _FusedExperts) and module._lk_outer:
            chain, base = _wrapper_chain(module)
            why = _chain_unsupported(chain, base)
            chains.update((id(w), why) for w in chain)
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, _FusedExperts):
            why = chains.get(id(module), "a ParamWrapper outside any chain")
            if why is None:
                fused.append(name)
                continue
        elif isinstance(module, _FusedForward):
            why = _static_reason(module)
            if why is None:
                fused.append(name)
                continue
        else:
            base = module.get_base_layer()
            kind = type(module).__name__
            if kind == "ParamWrapper":
                why = "LoRA on a parameter (target_parameters)"
            elif type(module) in _fusable_classes() and not (is_plain_linear(base) or is_quantized_linear(base)):
                why = f"the base layer type {type(base).__name__}"
            else:
                why = f"PEFT's layer type lora.{kind}"
        back.setdefault(why, []).append(name)
    return FuseReport(fused, back)


def _fusable_classes() -> dict:
    """{PEFT's LoRA layer class: its fused subclass} for Linear and, where bitsandbytes is imported, its layers."""
    fused = {_peft_linear_cls(): _fused_cls()}
    fused.update((cls, _fused_cls(cls)) for cls in _peft_quantized_classes())
    return fused


def fuse(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every LoRA Linear layer of `peft_model` run the fused kernels, in place (returns the model).

    Existing layers over an nn.Linear, Conv1D or bitsandbytes Linear4bit / Linear8bitLt base become FusedPeftLinear
    (a subclass of PEFT's LoRA Linear: same parameters, state dict, saving, merging, repr); ParamWrappers on MoE
    experts modules become the fused ParamWrapper. Everything else stays
    PEFT's and computes as before: other LoRA layer types (Embedding, Conv2d, MultiheadAttention, target_parameters
    on other modules),
    other base layers, LoRA variants other than DoRA, layers with forward hooks other than accelerate's device
    placement. One warning says which and why (``fuse_report(model)`` gives the same as data); a model without any
    fusable layer is returned as it is. Layers that adapters create later are PEFT's own unless their config went
    through ``register``; calling ``fuse`` again converts them."""
    plan.check_name(backend)
    fused = _fusable_classes()
    own = {f: f for f in fused.values()}
    for module in peft_model.modules():
        target = fused.get(type(module)) or own.get(type(module))
        base = module.get_base_layer() if target is not None else None
        if target is not None and (is_plain_linear(base) or is_quantized_linear(base)):
            module.__class__ = target
            module.fused_backend = backend
    _fuse_wrappers(peft_model, backend)
    report = fuse_report(peft_model)
    for why, names in report.handed_back.items():  # the same key as a call's hand-back: one warning per reason
        backends.warn_once(f"peft-fallback-{why}", f"lora_kernels.peft: PEFT's own forward serves {why} "
                           f"({len(names)} layers: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
    if not report.fused and not report.handed_back:
        warnings.warn("lora_kernels.peft.fuse: the model has no PEFT LoRA layer; nothing to fuse", UserWarning,
                      stacklevel=2)
    return peft_model
