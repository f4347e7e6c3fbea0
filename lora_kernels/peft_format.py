"""The PEFT adapter file format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

- ``save_adapter(model, path)`` writes the FusedLoRALinear layers of a model with exactly PEFT's names
  (``base_model.model.<module path>.lora_A.weight`` [r, in], ``...lora_B.weight`` [out, r], Conv1D layers
  included), so ``peft.PeftModel.from_pretrained`` loads it. The directory is replaced atomically.
- ``load_adapter(model, path)`` reads such a directory (saved by PEFT or by us; safetensors only, no pickle)
  into a model prepared with ``inject``.

Needs ``safetensors`` (``pip install lora-kernels[peft]``); not peft itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter

import torch
from torch import nn

from .adapters import DEFAULT
from .layers import full_tensor
from .models import experts_layers, pattern_value, lora_layers

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------------
def experts_keys(experts: dict) -> dict:
    """{"<module>.<parameter>": (layer, parameter, PEFT's module path for its factors)} of LoRAExperts layers. PEFT
    nests one ParamWrapper per targeted parameter, the first in the module's parameter order innermost: its factors
    sit under "<module>.base_layer...", the outermost's under "<module>"."""
    out = {}
    for name, layer in experts.items():
        n = len(layer.targets)
        for i, pname in enumerate(layer.targets):
            out[f"{name}.{pname}"] = (layer, pname, name + ".base_layer" * (n - 1 - i))
    return out


def _experts_hparams(keyed: dict) -> dict:
    return {key: {"r": f.r, "lora_alpha": f.lora_alpha, "use_rslora": f.use_rslora, "use_dora": False,
                  "lora_dropout": f.lora_dropout}
            for key, (layer, pname, _) in keyed.items() for f in (layer.adapters[pname],)}


def _adapter_config(layers: dict, keyed: dict, adapter_name: str, base_model_name_or_path: str | None,
                    task_type: str | None) -> dict:
    """`keyed`: ``experts_keys`` of the model's LoRAExperts layers."""
    hps = {name: layer._adapter(adapter_name)[2] for name, layer in layers.items()}
    hps.update(_experts_hparams(keyed))
    ranks = Counter(hp["r"] for hp in hps.values())
    alphas = Counter(hp["lora_alpha"] for hp in hps.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    rslora = {hp["use_rslora"] for hp in hps.values()}
    dora = {hp["use_dora"] for hp in hps.values()}
    dropouts = {hp["lora_dropout"] for hp in hps.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter: layers mix use_rslora True and False; PEFT's format has one flag")
    if len(dora) > 1:
        raise ValueError("save_adapter: layers mix DoRA and plain LoRA; PEFT's format has one use_dora flag")
    if len(dropouts) > 1:
        raise ValueError(f"save_adapter: layers use different lora_dropout values {sorted(dropouts)}; "
                         "PEFT's format has one")
    # Full module names, anchored: PEFT matches pattern keys against the end of module names.
    rank_pattern = {name: hp["r"] for name, hp in hps.items() if hp["r"] != r}
    alpha_pattern = {name: hp["lora_alpha"] for name, hp in hps.items() if hp["lora_alpha"] != alpha}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        "use_dora": dora.pop(),
        "target_modules": sorted(layers),
        **({"target_parameters": sorted(keyed)} if keyed else {}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
    """Write adapter `adapter_name` of the LoRA layers of `model` as a PEFT adapter directory (the names in the
    file carry no adapter name, as in PEFT's files: PeftModel.from_pretrained(base, path, adapter_name=...) or
    load_adapter(..., adapter_name=...) choose it when loading). A crash while saving leaves the previous
    adapter at `path` whole: files are written to a new directory, synced, then swapped in atomically.

    Under torch.distributed, every rank must call it: sharded parameters (FSDP2 DTensors) are gathered, then
    rank 0 alone writes, and all ranks return once the files are in place."""
    layers, experts = lora_layers(model), experts_layers(model)
    if not layers and not experts:
        raise ValueError("save_adapter: the model has no FusedLoRALinear or LoRAExperts layers (use lora_kernels.inject "
                         "first)")
    if experts and adapter_name != DEFAULT:
        raise ValueError(f"adapter_name: LoRAExperts layers hold one adapter ({DEFAULT!r}), got {adapter_name!r}")
    path = os.fspath(path)
    tensors = {}
    keyed = experts_keys(experts)
    for layer, pname, module_path in keyed.values():
        f = layer.adapters[pname]
        tensors[f"{_PREFIX}{module_path}.lora_A.weight"] = full_tensor(f.lora_A.detach()).contiguous().cpu()
        tensors[f"{_PREFIX}{module_path}.lora_B.weight"] = full_tensor(f.lora_B.detach()).contiguous().cpu()
    for name, layer in layers.items():
        adapter = layer._named(adapter_name)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = full_tensor(adapter.lora_A.detach()).contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = full_tensor(adapter.lora_B.detach()).contiguous().cpu()
        if adapter.use_dora:  # PEFT's key for DoRA's magnitude (no .weight)
            magnitude = adapter.lora_magnitude_vector.detach()
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = full_tensor(magnitude).contiguous().cpu()
    config = _adapter_config(layers, keyed, adapter_name, base_model_name_or_path, task_type)
    if experts and config["lora_dropout"]:
        warnings.warn(f"save_adapter: lora_dropout={config['lora_dropout']} with LoRA on experts: PEFT refuses dropout "
                      "with target_parameters when it loads these files (load_adapter reads them; for PEFT inference "
                      "set lora_dropout to 0 in adapter_config.json)", UserWarning, stacklevel=2)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 writes
        return
    try:
        _write_atomically(path, tensors, config)
    finally:
        if distributed:
            torch.distributed.barrier()


def _write_atomically(path: str, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if not os.path.exists(path):
            os.rename(tmp, path)
        elif _exchange_dirs(tmp, path):
            shutil.rmtree(tmp)  # now holds the previous adapter
        else:  # no atomic exchange here: the previous adapter stays whole under a side name until the swap
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------
def _read_adapter(path: str):
    from safetensors.torch import load_file

    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"load_adapter: {weights_path} not found (only safetensors adapters are read)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {config_path} is a {config.get('peft_type')} adapter, not LORA")
    return config, load_file(weights_path)


def _load_experts(keyed: dict, tensors: dict, config: dict, r_default, alpha_default, rslora, dropout) -> None:
    """The experts' factors of a file into LoRAExperts layers (checked first, then copied)."""
    for key, (layer, pname, path) in keyed.items():
        f = layer.adapters[pname]
        a, b = tensors[f"{_PREFIX}{path}.lora_A.weight"], tensors[f"{_PREFIX}{path}.lora_B.weight"]
        r = pattern_value(key, config.get("rank_pattern"), r_default)
        if (tuple(a.shape), tuple(b.shape)) != (tuple(f.lora_A.shape), tuple(f.lora_B.shape)) or r != f.r:
            raise ValueError(f"load_adapter: {key}: the file holds lora_A {list(a.shape)}, lora_B {list(b.shape)} "
                             f"(config rank {r}); the layer has lora_A {list(f.lora_A.shape)}, lora_B "
                             f"{list(f.lora_B.shape)} (rank {f.r})")
    for key, (layer, pname, path) in keyed.items():
        f = layer.adapters[pname]
        f.lora_alpha = pattern_value(key, config.get("alpha_pattern"), alpha_default)
        f.use_rslora, f.lora_dropout = rslora, dropout
        with torch.no_grad():
            f.lora_A.copy_(tensors[f"{_PREFIX}{path}.lora_A.weight"])
            f.lora_B.copy_(tensors[f"{_PREFIX}{path}.lora_B.weight"])


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT LoRA adapter directory into adapter `adapter_name` of the FusedLoRALinear layers of `model`
    (prepared with `inject` on the same targets). A named adapter the layers do not have yet is added with the
    file's ranks; an existing one must match them. Module names must match; alpha, rsLoRA, dropout and the
    rank/alpha patterns of the file set each layer's scaling. (PEFT's save_pretrained writes adapter "x"
    other than "default" into the subdirectory x/.)"""
    path = os.fspath(path)
    config, tensors = _read_adapter(path)
    dora = bool(config.get("use_dora", False))
    layers, experts = lora_layers(model), experts_layers(model)
    keyed = experts_keys(experts)
    if experts and adapter_name != DEFAULT:
        raise ValueError(f"adapter_name: LoRAExperts layers hold one adapter ({DEFAULT!r}), got {adapter_name!r}")
    expected = {f"{_PREFIX}{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
    expected |= {f"{_PREFIX}{path}.lora_{ab}.weight" for _, _, path in keyed.values() for ab in "AB"}
    if dora:
        expected |= {f"{_PREFIX}{name}.lora_magnitude_vector" for name in layers}
    found = set(tensors)
    if any(k.endswith(".lora_B.bias") for k in found):
        raise ValueError(f"load_adapter: {path} was trained with PEFT's lora_bias=True (lora_B has a bias), which the "
                         "layers of inject() do not hold; load it with PEFT (PeftModel.from_pretrained) and "
                         "lora_kernels.peft.fuse() the model, which serves lora_bias")
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"load_adapter: the adapter does not match the model's LoRA layers; "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    new = [layer for layer in layers.values() if adapter_name not in layer.adapter_names]
    if new and len(new) != len(layers):
        raise ValueError(f"load_adapter: adapter {adapter_name!r} exists in some LoRA layers but not in others")
    for name, layer in layers.items():
        a = tensors[f"{_PREFIX}{name}.lora_A.weight"]
        b = tensors[f"{_PREFIX}{name}.lora_B.weight"]
        r = pattern_value(name, config.get("rank_pattern"), r_default)
        expected = ((r, layer.in_features), (layer.out_features, r)) if new else \
            tuple(tuple(t.shape) for t in layer._adapter(adapter_name)[:2])
        if not new and layer._named(adapter_name).use_dora != dora:
            raise ValueError(f"load_adapter: {name}: the file's adapter {'uses' if dora else 'does not use'} DoRA, "
                             f"the layer's {adapter_name!r} {'does not' if dora else 'does'}")
        if (tuple(a.shape), tuple(b.shape)) != expected or a.shape[0] != r:
            raise ValueError(f"load_adapter: {name}: the file holds lora_A {list(a.shape)}, lora_B {list(b.shape)} "
                             f"(config rank {r}); the layer has lora_A {list(expected[0])}, "
                             f"lora_B {list(expected[1])}")
    _load_experts(keyed, tensors, config, r_default, alpha_default, rslora, dropout)
    for name, layer in layers.items():
        alpha = pattern_value(name, config.get("alpha_pattern"), alpha_default)
        if new:
            layer.add_adapter(adapter_name, r=tensors[f"{_PREFIX}{name}.lora_A.weight"].shape[0], lora_alpha=alpha,
                              lora_dropout=dropout, use_rslora=rslora, use_dora=dora)
        else:
            layer.set_lora_hparams(lora_alpha=alpha, use_rslora=rslora, lora_dropout=dropout,
                                   adapter_name=adapter_name)
        adapter = layer._named(adapter_name)
        with torch.no_grad():
            adapter.lora_A.copy_(tensors[f"{_PREFIX}{name}.lora_A.weight"])
            adapter.lora_B.copy_(tensors[f"{_PREFIX}{name}.lora_B.weight"])
            if dora:
                adapter.lora_magnitude_vector.copy_(tensors[f"{_PREFIX}{name}.lora_magnitude_vector"])
    return model
