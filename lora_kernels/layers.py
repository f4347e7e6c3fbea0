"""FusedLoRALinear: a drop-in nn.Linear with a LoRA update, computed by the fused ops (no kernel code here)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from . import backends, plan
from .ops import autocast_inputs, check_args, lora_linear, mixed_call
from .stacking import AdapterStack, checked_ids

__all__ = ["FusedLoRALinear", "adapter_ids"]

DEFAULT = "default"
# The ids of the enclosing `with adapter_ids(...)` block. A plain module global rather than a ContextVar:
# torch.compile reads (and guards on) globals, it cannot trace ContextVar.get.
_ADAPTER_IDS: Tensor | None = None


@contextlib.contextmanager
def adapter_ids(ids: Tensor):
    """Within the block, every FusedLoRALinear that is called without ``adapter_ids=`` serves a mixed batch:
    ``ids`` gives each row's adapter (an index into the layer's ``adapter_names``, -1 for the base layer alone),
    per token (shape = the input's leading dims) or per sequence (a prefix of them, broadcast over the rest).
    This is how a whole model from ``inject`` serves requests for different adapters in one forward."""
    global _ADAPTER_IDS
    outer, _ADAPTER_IDS = _ADAPTER_IDS, ids
    try:
        yield
    finally:
        _ADAPTER_IDS = outer


def _expand_ids(ids: Tensor, lead: torch.Size) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"adapter_ids: expected an integer tensor, got {type(ids).__name__}")
    if ids.dim() > len(lead) or tuple(ids.shape) != tuple(lead[: ids.dim()]):
        raise ValueError(f"adapter_ids: expected shape {list(lead)} (one id per row) or a prefix of it (one per "
                         f"sequence), got {list(ids.shape)}")
    return ids.reshape(tuple(ids.shape) + (1,) * (len(lead) - ids.dim())).expand(lead)  # (0-d for a 1-D x)


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


def _hparams(r, lora_alpha, lora_dropout, use_rslora, in_features, out_features) -> dict:
    """An adapter's checked hyper-parameters, with its scaling alpha / r (rsLoRA: alpha / sqrt(r))."""
    _check_hparams(r, lora_alpha, lora_dropout, in_features, out_features)
    return dict(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), use_rslora=use_rslora,
                scaling=lora_alpha / (math.sqrt(r) if use_rslora else r))


@torch.no_grad()
def _init_lora(A: Tensor, B: Tensor, r: int, init_lora_weights) -> None:
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


def _lora_dtype(lora_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The adapters' parameter dtype: `lora_dtype`, or by default fp32 next to a 16-bit W0 (as PEFT keeps them:
    a 16-bit parameter loses optimizer updates below its rounding step, and GradScaler refuses fp16 grads),
    W0's dtype otherwise. The forward computes in W0's dtype either way."""
    if lora_dtype is None:
        return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
    if lora_dtype not in backends.ALL_DTYPES:
        raise TypeError(f"lora_dtype: expected None (fp32 for a 16-bit base weight, else its dtype) or one of "
                        f"float16, bfloat16, float32, float64; got {lora_dtype!r}")
    return lora_dtype


class FusedLoRALinear(nn.Module):
    """y = x W0^T + bias + scaling * (dropout(x) A^T) B^T with W0 and bias frozen.

    Same attributes as nn.Linear (``in_features, out_features, weight, bias``) plus ``lora_A`` [r, in],
    ``lora_B`` [out, r], ``r``, ``lora_alpha``, ``scaling`` (alpha / r, or alpha / sqrt(r) with
    ``use_rslora``) and ``merged``. State dict keys: ``weight, bias, lora_A, lora_B`` (loralib's).

    ``merge_on_eval=True`` folds the update into W0 on ``eval()`` and takes it out again on ``train()``
    (loralib's ``merge_weights``). ``backend`` is passed to the ops: "auto", "torch", "triton" or "cuda".
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
                 _weight: Tensor | None = None, _bias: Tensor | None = None):
        super().__init__()
        self._stack = AdapterStack()  # mixed batches: the adapters stacked (and cast), kept in inference
        _check_hparams(r, lora_alpha, lora_dropout, in_features, out_features)
        plan.check_name(backend)
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
        w, lora_dtype = self.weight, _lora_dtype(lora_dtype, self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=w.device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=w.device, dtype=lora_dtype))
        self.reset_lora_parameters(init_lora_weights)
        # Further named adapters (add_adapter): their A / B here, their hyper-parameters in _extra_hparams.
        self.extra_lora_A = nn.ParameterDict()
        self.extra_lora_B = nn.ParameterDict()
        self._extra_hparams: dict[str, dict] = {}
        self.active_adapter = DEFAULT

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

    def set_lora_hparams(self, lora_alpha: float, use_rslora: bool = False, lora_dropout: float | None = None,
                         adapter_name: str = DEFAULT) -> None:
        """Set alpha (and with it the scaling), rsLoRA and dropout of an adapter; its rank is fixed by its A / B."""
        if getattr(self, "merged", False):
            raise RuntimeError("set_lora_hparams: unmerge() first (the merged weight holds the old scaling)")
        if adapter_name != DEFAULT:
            hp = self._adapter(adapter_name)[2]
            lora_dropout = hp["lora_dropout"] if lora_dropout is None else lora_dropout
            hp.update(_hparams(hp["r"], lora_alpha, lora_dropout, use_rslora, self.in_features, self.out_features))
            return
        lora_dropout = getattr(self, "lora_dropout", 0.0) if lora_dropout is None else lora_dropout
        hp = _hparams(self.r, lora_alpha, lora_dropout, use_rslora, self.in_features, self.out_features)
        self.lora_alpha, self.use_rslora, self.lora_dropout, self.scaling = (
            hp["lora_alpha"], hp["use_rslora"], hp["lora_dropout"], hp["scaling"])

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = "kaiming") -> None:
        """A: kaiming-uniform(a=sqrt(5)) as loralib/PEFT, or gaussian std 1/r; B: zeros (so the layer starts
        equal to the base). ``False`` leaves B random too (tests, or a non-identity start)."""
        _init_lora(self.lora_A, self.lora_B, self.r, init_lora_weights)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        """adapter_ids (or an enclosing ``with adapter_ids(ids):``): a mixed batch, each row through its own
        adapter (index into ``adapter_names``; -1 = base layer only), in one launch. Otherwise the active
        adapter (``set_adapter``)."""
        ids = adapter_ids if adapter_ids is not None else _ADAPTER_IDS
        if ids is not None:
            return self._mixed_forward(x, ids)
        if self.merged:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        A, B, hp = self._adapter(self.active_adapter)
        p = hp["lora_dropout"] if self.training else 0.0
        # fp32 adapters next to a 16-bit W0 go to the ops as they are (the kernels round them as they load them and
        # return fp32 grads: no cast ops per step, no cast copies kept)
        return lora_linear(x, self.base_weight(), self.bias, A, B, hp["scaling"], p, backend=self.backend)

    def _mixed_forward(self, x: Tensor, ids: Tensor) -> Tensor:
        if self.merged:
            raise RuntimeError("mixed-batch forward: unmerge() first (the merged weight holds the active adapter, "
                               "which would then apply to every row)")
        # adapter_names order: "default", then the added adapters (in insertion order, as _extra_hparams; read
        # from the ParameterDicts' own registries: their item access costs a microsecond each)
        As = [self.lora_A, *self.extra_lora_A._parameters.values()]
        Bs = [self.lora_B, *self.extra_lora_B._parameters.values()]
        hps = self._extra_hparams.values()
        scalings = [self.scaling, *(hp["scaling"] for hp in hps)]
        ps = [self.lora_dropout, *(hp["lora_dropout"] for hp in hps)] if self.training else [0.0] * len(As)
        x, weight, bias = autocast_inputs(x, self.base_weight(), self.bias)  # as lora_linear does
        # stacked in W0's dtype; inference reuses a stacked copy; with grads autograd splits the stacked grads
        # back to each adapter (in its own dtype)
        lora_A, lora_B, owner = self._stack.get(As, Bs, weight.dtype)
        # x against W0 and the first adapter (as stacked, if cast); the adapters were checked against W0 when
        # added, and their hyper-parameters when set
        r0 = As[0].shape[0]
        first = (As[0], Bs[0]) if As[0].dtype == weight.dtype else (lora_A[:r0], lora_B[:, :r0])
        check_args(x, weight, bias, *first, 1.0, 0.0)
        flat = checked_ids(ids, _expand_ids(ids, x.shape[:-1]), len(As), x.device)
        return mixed_call(x, weight, bias, lora_A, lora_B, owner, flat, scalings, ps, self.backend, None)

    # ------------------------------------------------------------------ named adapters
    @property
    def adapter_names(self) -> list[str]:
        """"default" (lora_A / lora_B) first, then the added adapters in the order they were added; a mixed
        batch's adapter_ids index this list."""
        return [DEFAULT, *self._extra_hparams]

    def _adapter(self, name: str):
        """(A, B, hparams) of a named adapter."""
        if name == DEFAULT:
            return self.lora_A, self.lora_B, dict(r=self.r, lora_alpha=self.lora_alpha, scaling=self.scaling,
                                                   lora_dropout=self.lora_dropout, use_rslora=self.use_rslora)
        if name not in self._extra_hparams:
            raise KeyError(f"adapter {name!r}: no such adapter; this layer has {self.adapter_names}")
        return self.extra_lora_A[name], self.extra_lora_B[name], self._extra_hparams[name]

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = "kaiming") -> None:
        """A further adapter on the same frozen W0, with its own rank, alpha and dropout (the active adapter
        does not change: ``set_adapter(name)`` switches)."""
        if not isinstance(name, str) or not name.isidentifier() or name == DEFAULT or name in self._extra_hparams:
            raise ValueError(f"name: expected a new identifier other than {DEFAULT!r} and {list(self._extra_hparams)}, "
                             f"got {name!r}")
        hp = _hparams(r, lora_alpha, lora_dropout, use_rslora, self.in_features, self.out_features)
        like = self.lora_A  # the layer's adapter dtype and device
        A = nn.Parameter(torch.empty((r, self.in_features), device=like.device, dtype=like.dtype))
        B = nn.Parameter(torch.empty((self.out_features, r), device=like.device, dtype=like.dtype))
        _init_lora(A, B, r, init_lora_weights)
        self.extra_lora_A[name], self.extra_lora_B[name] = A, B
        self._extra_hparams[name] = hp

    def delete_adapter(self, name: str) -> None:
        if name == DEFAULT:
            raise ValueError("delete_adapter: 'default' holds lora_A / lora_B and cannot be deleted")
        if name == self.active_adapter:
            raise ValueError(f"delete_adapter: {name!r} is active; set_adapter() another one first")
        self._adapter(name)  # raises for an unknown name
        del self.extra_lora_A[name], self.extra_lora_B[name], self._extra_hparams[name]

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter of the plain forward (a task switch; W0 is untouched, or, if merged, the
        old adapter is taken out of it and the new one put in)."""
        self._adapter(name)
        merged = self.merged
        if merged:
            self.unmerge()
        self.active_adapter = name
        if merged:
            self.merge()

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> Tensor:
        """scaling * B A of the active adapter in fp32, laid out like ``weight`` (the update that merge() adds). Sharded
        parameters (FSDP2) are gathered first, so every rank must call it."""
        A, B, hp = self._adapter(getattr(self, "active_adapter", DEFAULT))
        delta = (_full(B.detach()).float() @ _full(A.detach()).float()) * hp["scaling"]
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
        if mode:  # the copies kept for inference: training casts and stacks each step
            self._stack.clear()
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
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (f", lora_dtype={self.lora_A.dtype}" if self.lora_A.dtype != self.weight.dtype else ""))
