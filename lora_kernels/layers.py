"""FusedLoRALinear: a drop-in nn.Linear with a LoRA update, computed by the fused ops (no kernel code here)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import backends, plan
from .adapters import DEFAULT, Adapter, AdapterSet, adapter_forward, check_hparams, init_lora, lora_scaling
from .experts import ExpertAdapter, expert_features, experts_block, is_experts_module, projections, routing_args
from .ops import autocast_inputs, check_args, mixed_call
from .quantized import base_dtype, dequantize, is_quantized_linear, quantized_weight
from .stacking import AdapterStack, checked_ids, current_adapter_ids, expand_ids

__all__ = ["FusedLoRALinear", "QuantizedLoRALinear", "LoRAExperts", "ExpertFactors"]

def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a parameter: a DTensor (FSDP2 shards, tensor parallel) is gathered (a collective:
    every rank must call); a plain tensor is returned as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(value: Tensor, param: Tensor) -> Tensor:
    """`value` (a whole tensor) laid out like `param`: sharded the same way when `param` is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def _lora_dtype(lora_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The adapters' parameter dtype: `lora_dtype`, or by default fp32 next to a 16-bit W0 (as PEFT keeps them: a
    16-bit parameter loses optimizer updates below its rounding step, and GradScaler refuses fp16 grads), W0's dtype
    otherwise. The forward computes in W0's dtype either way."""
    if lora_dtype is None:
        return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
    if lora_dtype not in backends.ALL_DTYPES:
        raise TypeError(f"lora_dtype: expected None (fp32 for a 16-bit base weight, else its dtype) or one of "
                        f"float16, bfloat16, float32, float64; got {lora_dtype!r}")
    return lora_dtype


# The default adapter's state-dict keys are loralib's (and PEFT's magnitude name); the others live under adapters.<name>.
_DEFAULT_KEYS = {f"adapters.{DEFAULT}.{k}": k for k in ("lora_A", "lora_B", "lora_magnitude_vector")}


def _state_dict_names(module, state_dict, prefix, local_metadata):
    renamed = {prefix + inner: prefix + outer for inner, outer in _DEFAULT_KEYS.items()}
    if any(k in state_dict for k in renamed):  # rebuilt in order: the default adapter's keys stay where they were
        items = list(state_dict.items())
        state_dict.clear()
        state_dict.update((renamed.get(k, k), v) for k, v in items)


def _load_state_dict_names(module, state_dict, prefix, *args):
    for inner, outer in _DEFAULT_KEYS.items():
        if prefix + outer in state_dict:
            state_dict[prefix + inner] = state_dict.pop(prefix + outer)


class FusedLoRALinear(nn.Module):
    """y = x W0^T + bias + scaling * (dropout(x) A^T) B^T with W0 and bias frozen; with ``use_dora=True``, DoRA:
    y = m / ||W0 + scaling B A||_row * (x W0^T + scaling (dropout(x) A^T) B^T) + bias (PEFT's semantics).

    Same attributes as nn.Linear (``in_features, out_features, weight, bias``). Every adapter, the default one
    included, lives in ``adapters`` (an ordered container of ``Adapter``: ``lora_A`` [r, in], ``lora_B`` [out, r],
    with DoRA ``lora_magnitude_vector`` [out], and its hyper-parameters); ``lora_A``, ``lora_B``,
    ``lora_magnitude_vector``, ``r``, ``lora_alpha``, ``lora_dropout``, ``scaling``, ``use_rslora``, ``use_dora``
    are the default adapter's. State dict keys: ``weight, bias, lora_A, lora_B`` (loralib's), ``lora_magnitude_vector``
    (DoRA), and ``adapters.<name>.lora_A`` ... for the others.

    ``merge_on_eval=True`` folds the update into W0 on ``eval()`` and takes it out again on ``train()``
    (loralib's ``merge_weights``). ``backend`` is passed to the ops: "auto", a family or a plan spec.
    ``fan_in_fan_out=True`` stores W0 as [in, out] (Hugging Face's GPT-2 ``Conv1D``); the kernels read it
    through a transposed view, no copy.

    ``lora_dtype``: the adapters' parameter dtype. By default fp32 next to a 16-bit W0 (as PEFT keeps them, for
    stable training: 16-bit parameters lose small optimizer updates) and W0's dtype otherwise. The forward
    computes in W0's dtype (autocast's inside a region): the kernels round fp32 adapters to it as they load them
    and return their grads in fp32; adapters of another dtype are cast, differentiably.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights: bool | str = "kaiming", backend: str = "auto", merge_on_eval: bool = False,
                 fan_in_fan_out: bool = False, device=None, dtype=None, *, lora_dtype: torch.dtype | None = None,
                 use_dora: bool = False, _weight: Tensor | None = None, _bias: Tensor | None = None):
        super().__init__()
        self._stack = AdapterStack()  # mixed batches: the adapters stacked (and cast), kept in inference
        plan.check_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.merge_on_eval = merge_on_eval
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False
        self._init_base(in_features, out_features, bias, factory, _weight, _bias)
        self._lora_dtype = _lora_dtype(lora_dtype, self._base_dtype())
        self.adapters = AdapterSet()
        self._norms: dict = {}  # DoRA adapters: their DoraNorms (kept ||W0||^2, and the norm in inference)
        self._merged_norms: dict = {}  # DoRA: the norm each merged adapter was merged with (unmerge divides by it)
        self.active_adapter = DEFAULT
        self.add_adapter(DEFAULT, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora=use_dora)
        self.register_state_dict_post_hook(_state_dict_names)
        self.register_load_state_dict_pre_hook(_load_state_dict_names)

    def _init_base(self, in_features, out_features, bias, factory, _weight, _bias) -> None:
        """W0 and the bias: the given tensors (shared, frozen), or a fresh nn.Linear's."""
        fan_in_fan_out = self.fan_in_fan_out
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

    def _base_dtype(self) -> torch.dtype:
        """The dtype of W0's values (what the adapters' default dtype follows)."""
        return self.weight.dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    **kwargs) -> "FusedLoRALinear":
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen. A bitsandbytes
        Linear4bit / Linear8bitLt gives a ``QuantizedLoRALinear`` (QLoRA) holding that layer as it is."""
        if is_quantized_linear(linear):
            return QuantizedLoRALinear(linear, r, lora_alpha, lora_dropout, **kwargs)
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

    # ------------------------------------------------------------------ the default adapter's attributes
    @property
    def default(self) -> Adapter:
        return self.adapters[DEFAULT]

    lora_A = property(lambda self: self.default.lora_A)
    lora_B = property(lambda self: self.default.lora_B)
    lora_magnitude_vector = property(lambda self: self.default.lora_magnitude_vector)
    r = property(lambda self: self.default.r)
    lora_alpha = property(lambda self: self.default.lora_alpha)
    scaling = property(lambda self: self.default.scaling)
    use_rslora = property(lambda self: self.default.use_rslora)
    use_dora = property(lambda self: self.default.use_dora)

    @property
    def lora_dropout(self) -> float:
        return self.default.lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, p: float) -> None:
        self.default.set_hparams(self.default.lora_alpha, self.default.use_rslora, p)

    def set_lora_hparams(self, lora_alpha: float, use_rslora: bool = False, lora_dropout: float | None = None,
                         adapter_name: str = DEFAULT) -> None:
        """Set alpha (and with it the scaling), rsLoRA and dropout of an adapter; its rank is fixed by its A / B."""
        if self.merged:
            raise RuntimeError("set_lora_hparams: unmerge() first (the merged weight holds the old scaling)")
        self._named(adapter_name).set_hparams(lora_alpha, use_rslora, lora_dropout)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = "kaiming", adapter_name: str = DEFAULT) -> None:
        """A: kaiming-uniform(a=sqrt(5)) as loralib/PEFT, or gaussian std 1/r; B: zeros (so the layer starts
        equal to the base). ``False`` leaves B random too (tests, or a non-identity start). DoRA's magnitude starts
        at the row norms of W0 + scaling B A, as PEFT's."""
        adapter = self._named(adapter_name)
        init_lora(adapter.lora_A, adapter.lora_B, adapter.r, init_lora_weights)
        if adapter.use_dora:
            norm = self._unmerged_norm(adapter)
            adapter.lora_magnitude_vector.copy_(_like(norm.to(adapter.lora_magnitude_vector.dtype),
                                                      adapter.lora_magnitude_vector))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        """adapter_ids (or an enclosing ``with adapter_ids(ids):``): a mixed batch, each row through its own
        adapter (index into ``adapter_names``; -1 = base layer only), in one launch. Otherwise the active
        adapter (``set_adapter``)."""
        ids = adapter_ids if adapter_ids is not None else current_adapter_ids()
        if ids is not None:
            return self._mixed_forward(x, ids)
        if self.merged:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        name = self.active_adapter
        adapter = self.adapters[name]
        # fp32 adapters next to a 16-bit W0 go to the ops as they are (the kernels round them as they load them and
        # return fp32 grads: no cast ops per step, no cast copies kept)
        return adapter_forward(x, self.base_weight(), self.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
                               adapter.lora_dropout if self.training else 0.0,
                               magnitude=adapter.lora_magnitude_vector, norms=self._norms.get(name),
                               backend=self.backend)

    def _mixed_forward(self, x: Tensor, ids: Tensor) -> Tensor:
        if self.merged:
            raise RuntimeError("mixed-batch forward: unmerge() first (the merged weight holds the active adapter, "
                               "which would then apply to every row)")
        adapters = list(self.adapters.values())  # the order of adapter_names
        dora = [name for name, a in self.adapters.items() if a.use_dora]
        if dora:
            raise ValueError(f"adapter_ids: mixed batches run LoRA adapters only; {dora} use DoRA (run them one at a "
                             "time with set_adapter)")
        As = [a.lora_A for a in adapters]
        Bs = [a.lora_B for a in adapters]
        scalings = [a.scaling for a in adapters]
        ps = [a.lora_dropout for a in adapters] if self.training else [0.0] * len(adapters)
        x, weight, bias = autocast_inputs(x, self.base_weight(), self.bias)  # as lora_linear does
        # stacked in W0's dtype; inference reuses a stacked copy; with grads autograd splits the stacked grads
        # back to each adapter (in its own dtype)
        lora_A, lora_B, owner = self._stack.get(As, Bs, weight.dtype)
        # x against W0 and the first adapter (as stacked, if cast); the adapters were checked against W0 when
        # added, and their hyper-parameters when set
        r0 = As[0].shape[0]
        first = (As[0], Bs[0]) if As[0].dtype == weight.dtype else (lora_A[:r0], lora_B[:, :r0])
        check_args(x, weight, bias, *first, 1.0, 0.0)
        flat = checked_ids(ids, expand_ids(ids, x.shape[:-1]), len(As), x.device)
        return mixed_call(x, weight, bias, lora_A, lora_B, owner, flat, scalings, ps, self.backend, None)

    # ------------------------------------------------------------------ named adapters
    @property
    def adapter_names(self) -> list[str]:
        """"default" first, then the added adapters in the order they were added; a mixed batch's adapter_ids index
        this list."""
        return list(self.adapters)

    def _named(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise KeyError(f"adapter {name!r}: no such adapter; this layer has {self.adapter_names}")
        return self.adapters[name]

    def _adapter(self, name: str):
        """(A, B, hyper-parameters) of a named adapter."""
        adapter = self._named(name)
        return adapter.lora_A, adapter.lora_B, adapter.hparams()

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = "kaiming", use_dora: bool = False) -> None:
        """A further adapter on the same frozen W0, with its own rank, alpha, dropout and DoRA or not (the active
        adapter does not change: ``set_adapter(name)`` switches)."""
        if not isinstance(name, str) or not name.isidentifier() or name in self.adapters:
            raise ValueError(f"name: expected a new identifier other than {self.adapter_names}, got {name!r}")
        like = self.weight
        adapter = Adapter(self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                          device=like.device, dtype=self._lora_dtype)
        self.adapters[name] = adapter
        if use_dora:
            from .dora import DoraNorms

            self._norms[name] = DoraNorms()
        try:
            self.reset_lora_parameters(init_lora_weights, adapter_name=name)
        except ValueError:
            del self.adapters[name]
            self._norms.pop(name, None)
            raise

    def delete_adapter(self, name: str) -> None:
        if name == DEFAULT:
            raise ValueError("delete_adapter: 'default' holds lora_A / lora_B and cannot be deleted")
        if name == self.active_adapter:
            raise ValueError(f"delete_adapter: {name!r} is active; set_adapter() another one first")
        self._named(name)  # raises for an unknown name
        del self.adapters[name]
        self._norms.pop(name, None)

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter of the plain forward (a task switch; W0 is untouched, or, if merged, the
        old adapter is taken out of it and the new one put in)."""
        self._named(name)
        merged = self.merged
        if merged:
            self.unmerge()
        self.active_adapter = name
        if merged:
            self.merge()

    # ------------------------------------------------------------------ merging
    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """scaling * B A of an adapter (the active one by default) in fp32, laid out like ``weight``. Sharded
        parameters (FSDP2) are gathered first, so every rank must call it."""
        adapter = self._named(adapter_name or getattr(self, "active_adapter", DEFAULT))
        b, a = full_tensor(adapter.lora_B.detach()).float(), full_tensor(adapter.lora_A.detach()).float()
        delta = (b @ a) * adapter.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def _dora_factor(self, adapter: Adapter, norm: Tensor) -> Tensor:
        """m / norm as a column (fp32), laid out like ``weight``: rows of W0, columns of a fan_in_fan_out weight."""
        factor = full_tensor(adapter.lora_magnitude_vector.detach()).float() / norm.float()
        return factor[None, :] if self.fan_in_fan_out else factor[:, None]

    def merged_weight(self, adapter_name: str | None = None) -> Tensor:
        """W0 with an adapter folded in (fp32, laid out like ``weight``; the layer is unchanged): W0 + scaling B A, or
        for DoRA m / ||W0 + scaling B A||_row * (W0 + scaling B A), as PEFT merges."""
        if self.merged:
            raise RuntimeError("merged_weight: the layer is merged already (its weight is the merged one)")
        name = adapter_name or self.active_adapter
        adapter = self._named(name)
        w = full_tensor(self.weight.detach()).float() + self.delta_weight(name)
        if adapter.use_dora:
            w = w * self._dora_factor(adapter, self._unmerged_norm(adapter))
        return w

    def _unmerged_norm(self, adapter: Adapter) -> Tensor:
        """||W0 + s B A||_row of an adapter, by the layer's backend family's implementation."""
        from .dora import dora_weight_norm

        weight = full_tensor(self.base_weight().detach())
        return dora_weight_norm(weight, full_tensor(adapter.lora_A.detach()), full_tensor(adapter.lora_B.detach()),
                                adapter.scaling, kernels=plan.aux_kernels_for(self.backend, weight.device))[0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into W0 (computed in fp32, rounded once); the forward then is a plain linear.
        DoRA: W0 <- m / ||W0 + s B A||_row * (W0 + s B A), the norm kept for unmerge()."""
        if self.merged:
            return
        adapter = self.adapters[self.active_adapter]
        if adapter.use_dora:
            norm = self._unmerged_norm(adapter)
            self._merged_norms[self.active_adapter] = norm
            w = (full_tensor(self.weight.detach()).float() + self.delta_weight()) * self._dora_factor(adapter, norm)
        else:
            w = full_tensor(self.weight.detach()).float() + self.delta_weight()
        self.weight.copy_(_like(w.to(self.weight.dtype), self.weight))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the active adapter out of W0 again. In 16-bit dtypes W0 comes back within two roundings of its value
        before merge()."""
        if not self.merged:
            return
        adapter = self.adapters[self.active_adapter]
        w = full_tensor(self.weight.detach()).float()
        if adapter.use_dora:
            w = w / self._dora_factor(adapter, self._merged_norms.pop(self.active_adapter))
        w = w - self.delta_weight()
        self.weight.copy_(_like(w.to(self.weight.dtype), self.weight))
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the copies kept for inference: training stacks each step, and the DoRA norms change each step
            self._stack.clear()
            for norms in self._norms.values():
                norms.clear()
        if self.merge_on_eval:
            self.unmerge() if mode else self.merge()
        return self

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 with the active adapter merged (new tensors; this layer is left as it is)."""
        w = full_tensor(self.weight.detach()).float() if self.merged else self.merged_weight()
        if self.fan_in_fan_out:
            w = w.t()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(full_tensor(self.bias.detach()))
        return out

    def to_base_layer(self, merge: bool = True) -> nn.Module:
        """A plain layer of the wrapped kind (nn.Linear, or transformers' Conv1D when fan_in_fan_out) holding
        W0 with the active adapter merged if `merge`, else W0. The bias, and W0 when no arithmetic is needed, are
        shared."""
        weight = self.weight
        if merge != self.merged:
            if merge:
                w = self.merged_weight()
            else:
                adapter = self.adapters[self.active_adapter]
                w = full_tensor(self.weight.detach()).float()
                if adapter.use_dora:
                    w = w / self._dora_factor(adapter, self._merged_norms[self.active_adapter])
                w = w - self.delta_weight()
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
                + (", use_dora=True" if self.use_dora else "")
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (f", lora_dtype={self.lora_A.dtype}" if self.lora_A.dtype != self.weight.dtype else ""))


class QuantizedLoRALinear(FusedLoRALinear):
    """QLoRA: a FusedLoRALinear over a bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double quantization)
    or ``Linear8bitLt`` layer, held as ``base_layer`` as it is: its quantized weight is shared, frozen and never kept
    dequantized (``lora_kernels.quantized``). ``weight`` and ``bias`` are the base layer's; the state dict holds the base
    layer's own entries under ``base_layer.`` (bitsandbytes' quantization state included) and the adapters as
    FusedLoRALinear's. The product runs in the base layer's compute dtype (Linear4bit's ``compute_dtype`` when set,
    else x's) and y comes back in x's dtype, as bitsandbytes' layers do.

    Merging into the quantized weight would round the adapter's update to the 4-bit grid: ``merge()`` refuses;
    ``to_linear()`` gives a dense layer with the adapter merged, and ``to_base_layer(merge=True)`` dequantizes, merges
    and quantizes again (with a warning, as PEFT's merge does). DoRA over it (QDoRA) runs fused; mixed-adapter
    batches are refused."""

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, **kwargs):
        if not is_quantized_linear(base_layer):
            raise TypeError(f"base_layer: expected a bitsandbytes Linear4bit or Linear8bitLt, got "
                            f"{type(base_layer).__name__}")
        for name, refused in (("merge_on_eval", "merging rounds the adapter into the quantized weight"),
                              ("fan_in_fan_out", "bitsandbytes layers store W0 as [out, in]")):
            if kwargs.get(name):
                raise ValueError(f"{name}=True: {refused}")
        quantized_weight(base_layer)  # raises now for a layer that is not quantized yet
        super().__init__(base_layer.in_features, base_layer.out_features, r, lora_alpha, lora_dropout,
                         bias=base_layer.bias is not None, _weight=base_layer, **kwargs)

    def _init_base(self, in_features, out_features, bias, factory, base_layer, _bias) -> None:
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def _base_dtype(self) -> torch.dtype:
        dtype = base_dtype(self.base_layer)
        if dtype is not None:
            return dtype
        return self.base_layer.bias.dtype if self.base_layer.bias is not None else torch.float16

    def quantized_weight(self):
        """The base layer's quantized W0 (``lora_kernels.quantized.QuantizedWeight``)."""
        return quantized_weight(self.base_layer)

    def base_weight(self) -> Tensor:
        """W0 dequantized, [out_features, in_features] in the base layer's dtype: a new tensor (the layer keeps
        none)."""
        return dequantize(self.quantized_weight(), self._base_dtype())

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        if adapter_ids is not None or current_adapter_ids() is not None:
            raise ValueError("adapter_ids: mixed-adapter batches run over dense base layers; this layer's base is "
                             f"quantized ({type(self.base_layer).__name__}): serve one adapter at a time "
                             "(set_adapter)")
        name = self.active_adapter
        adapter = self.adapters[name]
        return adapter_forward(x, None, self.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
                               adapter.lora_dropout if self.training else 0.0, backend=self.backend,
                               quantized_base=self.base_layer, magnitude=adapter.lora_magnitude_vector,
                               norms=self._norms.get(name))

    def merged_weight(self, adapter_name: str | None = None) -> Tensor:
        """W0 dequantized with an adapter folded in (fp32, [out, in]; the layer is unchanged); DoRA as PEFT merges."""
        adapter = self._named(adapter_name or self.active_adapter)
        w = self.base_weight().float() + self.delta_weight(adapter_name or self.active_adapter)
        return w * self._dora_factor(adapter, self._unmerged_norm(adapter)) if adapter.use_dora else w

    def merge(self) -> None:
        raise RuntimeError("merge: the base weight is quantized; folding the adapter in would round its update to the "
                           "quantization grid. Use to_linear() for a dense layer with the adapter merged, or "
                           "to_base_layer(merge=True) to dequantize, merge and quantize again")

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear (the base layer's dtype) holding dequantized W0 with the active adapter merged."""
        w = self.merged_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=self._base_dtype())
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
        return out

    def to_base_layer(self, merge: bool = True) -> nn.Module:
        """The bitsandbytes layer: as it is if not `merge`; else a new one of the same kind and quantization settings
        holding W0 + scaling B A quantized again (a warning says the merged update is rounded to the grid)."""
        if not merge:
            return self.base_layer
        warnings.warn("lora_kernels: merging into a quantized base layer dequantizes W0, adds the adapter and "
                      "quantizes again; the result differs from the unmerged layer by the quantization's rounding",
                      UserWarning, stacklevel=2)
        return requantized_like(self.base_layer, self.merged_weight())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quantized={self.quantized_weight().quant}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, scaling={self.scaling:g}, backend={self.backend!r}"
                + (f", lora_dtype={self.lora_A.dtype}" if self.lora_A.dtype != self._base_dtype() else ""))


def requantized_like(layer: nn.Module, weight: Tensor) -> nn.Module:
    """A new bitsandbytes layer of `layer`'s kind and settings holding `weight` (dense [out, in]) quantized, on
    `layer`'s device; the bias is shared."""
    import bitsandbytes as bnb

    device = layer.weight.device
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                compute_dtype=layer.compute_dtype, compress_statistics=state.nested,
                                quant_type=state.quant_type, quant_storage=layer.weight.quant_storage, device="meta")
        out.weight = bnb.nn.Params4bit(weight.detach().to("cpu", state.dtype), requires_grad=False,
                                       quant_type=state.quant_type, blocksize=state.blocksize,
                                       compress_statistics=state.nested,
                                       quant_storage=layer.weight.quant_storage).to(device)
    else:
        out = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  has_fp16_weights=False, threshold=layer.state.threshold, device="meta")
        out.weight = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    out.bias = layer.bias
    return out


class ExpertFactors(nn.Module):
    """One projection's adapter over all experts, in PEFT's layout: ``lora_A`` [E r, in] (expert-major) and
    ``lora_B`` [out, r E] (rank-major: B_e = lora_B.view(out, r, E)[:, :, e]), so that files and state dicts are
    PEFT's own and the op reads them as views."""

    def __init__(self, experts: int, in_features: int, out_features: int, r: int, lora_alpha: float,
                 lora_dropout: float, use_rslora: bool, device=None, dtype=None):
        super().__init__()
        check_hparams(r, lora_alpha, lora_dropout)
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.lora_A = nn.Parameter(torch.empty((experts * r, in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r * experts), device=device, dtype=dtype))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def adapter(self, training: bool) -> ExpertAdapter:
        E, r = self.experts, self.r
        return ExpertAdapter(self.lora_A.view(E, r, self.in_features),
                             self.lora_B.view(self.out_features, r, E).permute(2, 0, 1), self.scaling,
                             self.lora_dropout if training else 0.0)

    def delta(self) -> Tensor:
        """s B_e A_e for every expert, [E, out, in] (merging, tests)."""
        a = self.adapter(False)
        return torch.bmm(a.lora_B, a.lora_A) * a.scaling

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}")


class LoRAExperts(nn.Module):
    """LoRA on the projections of a transformers experts module (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss, ...:
    ``gate_up_proj`` or ``up_proj``, and ``down_proj``), computed by the experts op: the block's forward with both
    projections grouped over the slots sorted by expert, W0 + s B A never formed, dropout per slot where asked for
    (beyond PEFT, which refuses it on experts). `base_layer` stays as it is (frozen); `targets` names the projections
    (PEFT's ``target_parameters``); `r` / `lora_alpha` may be {projection: value}."""

    def __init__(self, base_layer: nn.Module, targets, r=8, lora_alpha=8, lora_dropout: float = 0.0, *,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, backend: str = "auto",
                 lora_dtype: torch.dtype | None = None):
        super().__init__()
        why = is_experts_module(base_layer)
        if why:
            raise TypeError(f"base_layer: {why}")
        plan.check_name(backend)
        names = projections(base_layer)
        targets = [targets] if isinstance(targets, str) else list(targets)
        unknown = sorted(set(targets) - set(names))
        if unknown or not targets:
            raise ValueError(f"targets: expected some of {names} (the projections of {type(base_layer).__name__}), "
                             f"got {targets}")
        self.base_layer = base_layer
        self.num_experts = base_layer.num_experts
        self.backend = backend
        # PEFT nests its wrappers in the module's parameter order: the first targeted parameter is the innermost
        self.targets = tuple(n for n, _ in base_layer.named_parameters(recurse=False) if n in targets)
        self.adapters = nn.ModuleDict()
        E, transposed = base_layer.num_experts, bool(base_layer.is_transposed)
        for name in self.targets:
            p = getattr(base_layer, name)
            p.requires_grad_(False)
            K, N = expert_features(p, transposed)
            rank = r[name] if isinstance(r, dict) else r
            alpha = lora_alpha[name] if isinstance(lora_alpha, dict) else lora_alpha
            factors = ExpertFactors(E, K, N, rank, alpha, lora_dropout, use_rslora, device=p.device,
                                    dtype=_lora_dtype(lora_dtype, p.dtype))
            with torch.no_grad():
                init_lora(factors.lora_A, factors.lora_B, rank, init_lora_weights)
            self.adapters[name] = factors
        for name in names:  # the projections' biases (gpt-oss) are frozen with them
            bias = getattr(base_layer, f"{name}_bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(False)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        routed = routing_args(self.base_layer, (hidden_states, *args), kwargs)
        if routed is None:
            raise TypeError(f"LoRAExperts: expected the experts module's arguments (hidden states, expert indices, "
                            f"routing weights), got {len(args) + 1} positional and {sorted(kwargs)}")
        adapters = {name: f.adapter(self.training) for name, f in self.adapters.items()}
        return experts_block(self.base_layer, *routed, adapters, backend=self.backend)

    def to_base_layer(self, merge: bool = True) -> nn.Module:
        """The experts module, with each adapter's s B_e A_e folded into its projection if `merge`."""
        if merge:
            with torch.no_grad():
                for name, f in self.adapters.items():
                    p = getattr(self.base_layer, name)
                    delta = f.delta()
                    p.add_((delta.transpose(1, 2) if self.base_layer.is_transposed else delta).to(p.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"targets={self.targets}, backend={self.backend!r}"
