"""Put FusedLoRALinear layers into any PyTorch / Hugging Face model, and manage them model-wide.

``inject`` replaces matching ``nn.Linear`` and Hugging Face ``Conv1D`` modules in place, sharing (not copying) their
weights; bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules become ``QuantizedLoRALinear`` (QLoRA), their
quantized weights kept as they are. Target names follow PEFT: a list of names matches modules whose name equals a
target or ends with ``"." + target``; a single string is a regular expression matched against the whole module name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .layers import FusedLoRALinear, LoRAExperts
from .quantized import is_quantized_linear

__all__ = ["inject", "lora_layers", "experts_layers", "mark_only_lora_as_trainable", "lora_state_dict", "merge",
           "unmerge", "unload", "add_adapter", "set_adapter", "delete_adapter", "adapter_ids_for", "pattern_value",
           "is_plain_linear"]


_ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")


def _is_lora_key(key: str) -> bool:
    """A LoRA parameter's name or state-dict key: `<module>.lora_A` / `.lora_B` / `.lora_magnitude_vector` (the
    default adapter's state-dict keys, loralib's) or `<module>.adapters.<adapter>.lora_A` ... (parameter names, and
    the other adapters' keys)."""
    return key.rsplit(".", 1)[-1] in _ADAPTER_PARAMS


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_plain_linear(module: nn.Module) -> bool:
    """What the fused layers can wrap: exactly nn.Linear (never a quantized subclass) or a Conv1D."""
    return type(module) is nn.Linear or _is_conv1d(module)


def _check_bias_mode(bias: str) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias: expected 'none', 'all' or 'lora_only', got {bias!r}")


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_value(name: str, pattern: dict | None, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def inject(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8, lora_alpha: float = 8,
           lora_dropout: float = 0.0, *, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
           exclude_modules: str | Iterable[str] | None = None, target_parameters: Iterable[str] | None = None,
           **layer_kwargs) -> nn.Module:
    """Replace the matching nn.Linear / Conv1D modules of `model` by FusedLoRALinear, and bitsandbytes Linear4bit /
    Linear8bitLt modules by QuantizedLoRALinear (in place; returns `model`). `layer_kwargs` go to the layers
    (use_rslora, init_lora_weights, backend, ...).

    `target_parameters` (PEFT's name; "<module>.<parameter>" matched against the end of full parameter names, e.g.
    "mlp.experts.gate_up_proj") puts LoRA on the projections of transformers' MoE experts modules: each such module
    becomes a ``LoRAExperts`` holding an adapter per targeted projection (rank_pattern / alpha_pattern keys are
    full parameter names).

    Raises if a target matches nothing, or matches a module of another type (an embedding or another quantized
    layer kind, for instance, is never replaced by accident)."""
    if target_modules is None:
        targets = []
    elif isinstance(target_modules, str):
        targets = target_modules
    else:
        targets = list(target_modules)
    parameters = list(target_parameters or [])
    if not targets and not parameters:
        raise ValueError("target_modules: expected at least one name or a regular expression (or target_parameters)")
    replaced, wrong_type = [], []
    for name, module in list(model.named_modules()) if targets else []:
        if not name or not _matches(name, targets) or isinstance(module, FusedLoRALinear):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        module_r = pattern_value(name, rank_pattern, r)
        module_alpha = pattern_value(name, alpha_pattern, lora_alpha)
        if type(module) is nn.Linear or is_quantized_linear(module):
            new = FusedLoRALinear.from_linear(module, module_r, module_alpha, lora_dropout, **layer_kwargs)
        elif _is_conv1d(module):
            new = FusedLoRALinear.from_conv1d(module, module_r, module_alpha, lora_dropout, **layer_kwargs)
        else:
            wrong_type.append(f"{name} ({type(module).__name__})")
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced.append(name)
    if wrong_type and isinstance(targets, list):
        raise TypeError(f"target_modules {targets} matched modules that are neither nn.Linear, Conv1D nor a "
                        f"bitsandbytes Linear4bit / Linear8bitLt: "
                        f"{', '.join(wrong_type)}")
    if targets and not replaced:
        linears = [n for n, m in model.named_modules() if is_plain_linear(m) or is_quantized_linear(m)]
        raise ValueError(f"target_modules {targets!r} matched no nn.Linear or Conv1D module of the model; "
                         f"its linear layers are: {', '.join(linears[:20]) or 'none'}"
                         + (" ..." if len(linears) > 20 else ""))
    if parameters:
        _inject_experts(model, parameters, r, lora_alpha, lora_dropout, rank_pattern, alpha_pattern, layer_kwargs)
    return model


def _inject_experts(model, parameters, r, lora_alpha, lora_dropout, rank_pattern, alpha_pattern, layer_kwargs):
    """LoRAExperts in place of each experts module with a targeted projection."""
    found: dict = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRAExperts):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if any(key == t or key.endswith("." + t) for t in parameters):
                found.setdefault(name, (module, []))[1].append(pname)
    if not found:
        raise ValueError(f"target_parameters {parameters} matched no parameter of the model")
    kwargs = {k: v for k, v in layer_kwargs.items() if k in ("use_rslora", "init_lora_weights", "backend",
                                                             "lora_dtype")}
    for name, (module, pnames) in found.items():
        ranks = {p: pattern_value(f"{name}.{p}", rank_pattern, r) for p in pnames}
        alphas = {p: pattern_value(f"{name}.{p}", alpha_pattern, lora_alpha) for p in pnames}
        new = LoRAExperts(module, pnames, ranks, alphas, lora_dropout, **kwargs)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def experts_layers(model: nn.Module) -> dict[str, LoRAExperts]:
    """{module name: layer} of every LoRAExperts in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


def lora_layers(model: nn.Module) -> dict[str, FusedLoRALinear]:
    """{module name: layer} of every FusedLoRALinear in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but the LoRA parameters (every adapter's). bias: "none", "all" (every bias trains), or "lora_only"
    (the biases of the LoRA layers train)."""
    _check_bias_mode(bias)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        p.requires_grad_(_is_lora_key(name) or (bias == "all" and leaf == "bias"))
    if bias == "lora_only":
        for layer in lora_layers(model).values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The LoRA parameters of `model` (loralib's keys: `<module>.lora_A`, `<module>.lora_B`), plus biases as
    in mark_only_lora_as_trainable."""
    _check_bias_mode(bias)
    full = model.state_dict()
    lora_bias = {f"{name}.bias" for name, layer in lora_layers(model).items() if layer.bias is not None}
    keep = {}
    for key, value in full.items():
        leaf = key.rsplit(".", 1)[-1]
        if _is_lora_key(key) or (bias == "all" and leaf == "bias") or \
                (bias == "lora_only" and key in lora_bias):
            keep[key] = value
    return keep


def merge(model: nn.Module) -> nn.Module:
    """Fold every layer's update into its base weight."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every FusedLoRALinear by a plain layer of its original kind (nn.Linear, or Conv1D for
    fan_in_fan_out layers), holding the merged weight if `merge`, else the base weight."""
    for name, layer in {**lora_layers(model), **experts_layers(model)}.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.to_base_layer(merge=merge))
    return model


def add_adapter(model: nn.Module, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                use_rslora: bool = False, init_lora_weights: bool | str = "kaiming", use_dora: bool = False) -> nn.Module:
    """FusedLoRALinear.add_adapter on every LoRA layer of `model` (the same index in every layer's
    adapter_names, so one adapter_ids tensor serves the whole model)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: no FusedLoRALinear layers (call inject first)")
    for layer in layers.values():
        layer.add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Switch every LoRA layer of `model` to adapter `name` (a task switch; W0 untouched unless merged)."""
    for layer in lora_layers(model).values():
        layer.set_adapter(name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.delete_adapter(name)
    return model


def adapter_ids_for(model: nn.Module, names, device=None) -> torch.Tensor:
    """The adapter_ids tensor for a mixed batch through `model`: one entry per name (None: the base model alone),
    the index of that adapter in every LoRA layer's ``adapter_names``, on the layers' device unless given. Raises
    if the layers disagree on an index (adapters added layer by layer in different orders), where one ids tensor
    would send rows to different adapters in different layers, or if a layer lacks the adapter."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: no FusedLoRALinear layers (call inject first)")
    orders = {tuple(layer.adapter_names) for layer in layers.values()}
    index = {}
    for name in dict.fromkeys(n for n in names if n is not None):
        where = {path: layer.adapter_names.index(name) if name in layer.adapter_names else None
                 for path, layer in layers.items()}
        found = set(where.values())
        if None in found:
            missing = sorted(path for path, i in where.items() if i is None)
            raise ValueError(f"names: adapter {name!r} is missing in layers {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}")
        if len(found) > 1:
            raise ValueError(f"names: adapter {name!r} has different indices across layers ({sorted(found)}; layer "
                             f"orders {sorted(orders)[:2]}): add adapters model-wide with lora_kernels.add_adapter")
        index[name] = found.pop()
    if device is None:  # where the model's LoRA layers are (the ids must be on the inputs' device)
        device = next(iter(layers.values())).lora_A.device
    return torch.tensor([-1 if n is None else index[n] for n in names], dtype=torch.int64, device=device)
