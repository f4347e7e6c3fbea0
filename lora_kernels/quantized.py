"""QLoRA: LoRA over a quantized base layer (bitsandbytes' Linear4bit, NF4 or FP4 with or without double quantization,
and Linear8bitLt), with the quantized weight left as it is: shared, frozen, never kept dequantized.

    y = x W0^T + bias + scaling * (dropout(x) A^T) B^T,     W0 = dequantize(the quantized weight)

The forward runs the planner's variant for the call: ``triton_quantized`` reads the quantized weight in the GEMM's K
loop (no dequantized matrix at all; the static choice at decode sizes), any other variant multiplies by a transient
dequantized W0 (one Triton pass; freed when the forward returns). The backward dequantizes W0 again for dX (nothing
of size N x K is kept between forward and backward: the autograd context holds x, [M, r] and the layer's own
quantized tensors); grads of the adapters need no W0.

Numerics follow bitsandbytes' layers: the product runs in the layer's compute dtype (Linear4bit's ``compute_dtype``
when set, else x's; torch.autocast's inside a region) and y comes back in x's dtype. Linear8bitLt's weight is
dequantized (its int8 values times the row scale) and multiplied in x's dtype: LLM.int8's own forward also quantizes
x, which the 16-bit product here does not (it is the more accurate of the two).

bitsandbytes is optional (``pip install lora-kernels[bnb]``): a bitsandbytes layer can only exist once bitsandbytes
is imported, so the layers are recognized without importing it, and nothing here fails without it.

Ops: ``lora_kernels::qlora_linear_fwd(x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, seed, scaling,
dropout_p, save_xa, plan) -> (y, xa)`` and ``lora_kernels::qlora_linear_bwd(grad_y, x, qdata, qstate, fmt, sizes,
offset, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, plan) -> (dx, dA, dB)``, with the
quantized weight as (qdata, qstate = [absmax, code, absmax2, code2], fmt, sizes = [N, K, blocksize, blocksize2],
offset) (``QuantizedWeight``).
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import backends, entry, reference
from . import plan as planner
from .contract import (adapters_for, autocast_dtype, check_args, check_seed, grads_needed, is_plain, resolve_seed)
from .plan import Call

__all__ = ["QuantizedWeight", "FORMATS", "is_quantized_linear", "quantized_weight", "compute_dtype", "dequantize",
           "stand_in_weight", "pack", "unpack", "check_qargs", "compute_inputs",
           "qlora_linear", "qlora_linear_fwd", "qlora_linear_bwd", "bitsandbytes_info", "quantize_linear", "shardable",
           "is_shardable", "base_dtype"]

FORMATS = ("nf4", "fp4", "int8")


class QuantizedWeight(NamedTuple):
    """A quantized W0 [N, K] (the formats: ``reference.dequantize``). Tensors on one device; empty where unused."""

    data: Tensor  # 4-bit: the packed codes, uint8 [ceil(N K / 2)] (any shape: read flat); int8: int8 [N, K]
    absmax: Tensor  # 4-bit: fp32 [blocks], or uint8 [blocks] with double quantization; int8: fp32 row scales [N]
    code: Tensor  # 4-bit: fp32 [16], the values of the 16 codes; int8: empty
    absmax2: Tensor  # double quantization: fp32 [blocks / blocksize2]; else empty
    code2: Tensor  # double quantization: fp32 [256]; else empty
    fmt: str  # "nf4", "fp4" or "int8"
    blocksize: int  # 4-bit: elements per absmax; int8: 0
    blocksize2: int  # double quantization: absmax entries per absmax2; else 0
    offset: float  # double quantization: added to every dequantized absmax; else 0
    shape: tuple  # (N, K)

    @property
    def nested(self) -> bool:
        return self.absmax2.numel() > 0

    @property
    def quant(self) -> str:
        """The format as the planner keys calls: "nf4", "fp4", "int8", with "_dq" for double quantization."""
        return self.fmt + ("_dq" if self.nested else "")

    @property
    def device(self) -> torch.device:
        return self.data.device


def pack(qdata: Tensor, qstate: list, fmt: str, sizes: list, offset: float) -> QuantizedWeight:
    """A QuantizedWeight from an op's arguments."""
    return QuantizedWeight(qdata, *qstate, fmt, sizes[2], sizes[3], offset, (sizes[0], sizes[1]))


def unpack(qw: QuantizedWeight) -> tuple:
    """An op's (qdata, qstate, fmt, sizes, offset) arguments from a QuantizedWeight."""
    return (qw.data, [qw.absmax, qw.code, qw.absmax2, qw.code2], qw.fmt,
            [qw.shape[0], qw.shape[1], qw.blocksize, qw.blocksize2], qw.offset)


# --------------------------------------------------------------------------------------------
# bitsandbytes' layers
# --------------------------------------------------------------------------------------------
def _bnb():
    """bitsandbytes if it is imported (a bitsandbytes layer exists only then), else None."""
    return sys.modules.get("bitsandbytes")


def is_quantized_linear(module) -> bool:
    """Whether `module` is a bitsandbytes Linear4bit or Linear8bitLt (without importing bitsandbytes)."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def bitsandbytes_info() -> str:
    """For ``python -m lora_kernels.info``: bitsandbytes' version and whose kernels serve it here."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or it fails to load here
        return f"not available ({type(e).__name__}: {str(e)[:120]}); quantized base layers are not recognized"
    where = "CUDA" if torch.cuda.is_available() else "CPU"
    return f"{bnb.__version__} ({where} kernels serve its own layers; QLoRA here: lora_kernels' kernels)"


def quantize_linear(linear: torch.nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None):
    """A bitsandbytes Linear4bit (`quant_type` "nf4" / "fp4", double quantization or not) holding `linear`'s weight
    quantized (on its device) and sharing its bias: QLoRA's base layer made from a dense one (needs bitsandbytes)."""
    import bitsandbytes as bnb

    weight = linear.weight
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=double_quant,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    layer.bias = linear.bias
    return layer.to(weight.device)


# Weakly held, by the weight object: a deleted layer's quantized storage is freed with it (the QuantizedWeight holds
# views of that storage, never the weight object itself).
_WEIGHTS = WeakIdKeyDictionary()  # weight -> (fingerprint, QuantizedWeight)


def quantized_weight(layer) -> QuantizedWeight:
    """The quantized W0 of a bitsandbytes layer, read once per weight (kept until the weight's data or state
    changes: no host sync or small op per call). A layer made ``shardable`` is read from its tensors each call (views,
    no copy): under FSDP2 its codes are the all-gathered parameter of this forward."""
    if is_shardable(layer):
        return _read_shardable(layer)
    weight = layer.weight
    state = getattr(weight, "quant_state", None) if hasattr(weight, "quant_state") else getattr(layer, "state", None)
    key = (weight.data_ptr(), weight._version, id(state), getattr(weight, "SCB", None) is not None)
    kept = _WEIGHTS.get(weight)
    if kept is not None and kept[0] == key:
        return kept[1]
    qw = _read_layer(layer)
    _WEIGHTS[weight] = (key, qw)
    return qw


def _read_layer(layer) -> QuantizedWeight:
    bnb = _bnb()
    name = type(layer).__name__
    weight = layer.weight
    empty = weight.new_empty((0,), dtype=torch.float32)
    if isinstance(layer, bnb.nn.Linear4bit):
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError(f"{name}: its weight is not quantized yet (bitsandbytes quantizes it when the layer is "
                             "moved to a device: .to('cuda') or .to('cpu'))")
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout: back to its own
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            state = weight.quant_state
        N, K = (int(s) for s in state.shape)
        if state.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"{name}: quant_type {state.quant_type!r}; expected 'nf4' or 'fp4'")
        nested = state.state2 is not None
        return QuantizedWeight(
            weight.data.view(torch.uint8), state.absmax, state.code.to(weight.device, torch.float32),
            state.state2.absmax.float() if nested else empty, state.state2.code.float() if nested else empty,
            state.quant_type, int(state.blocksize), int(state.state2.blocksize) if nested else 0,
            float(state.offset) if nested and state.offset.device.type != "meta" else 0.0, (N, K))
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(layer.state, "SCB", None)
        if weight.dtype != torch.int8 or scb is None:
            raise ValueError(f"{name}: expected an int8 weight with its row scales (has_fp16_weights=False, moved to a "
                             f"device); got a {weight.dtype} weight")
        return QuantizedWeight(weight.data, scb.float() / 127.0, empty, empty, empty, "int8", 0, 0, 0.0,
                               tuple(weight.shape))
    raise TypeError(f"layer: expected a bitsandbytes Linear4bit or Linear8bitLt, got {name}")


# --------------------------------------------------------------------------------------------
# Quantized base layers in a form FSDP2 shards (and DDP broadcasts): plain tensors, no tensor subclass
# --------------------------------------------------------------------------------------------
_STATE_BUFFERS = ("quant_absmax", "quant_code", "quant_absmax2", "quant_code2")


class ShardableQuantized:
    """Mixed into a bitsandbytes Linear4bit / Linear8bitLt by ``shardable``: ``weight`` is a plain frozen Parameter
    holding the codes (uint8 packed 4-bit, or int8), which FSDP2 flattens, shards along dim 0 and all-gathers like any
    parameter; the quantization state (absmax, the code tables, the double-quantization level, int8's row scales) is
    in buffers, which every rank holds whole (a few percent of the codes' bytes); the static rest (format, block
    sizes, offset, W0's shape and dtype) in ``quant_format``. Its own forward is bitsandbytes' dequantize-then-matmul
    (the same W0 bit for bit, in the compute dtype, y in x's dtype) and the state dict is plain tensors."""

    def forward(self, x: Tensor) -> Tensor:
        qw = quantized_weight(self)
        dtype = compute_dtype(self, x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), dequantize(qw, dtype), bias).to(x.dtype)

    _save_to_state_dict = torch.nn.Module._save_to_state_dict
    _load_from_state_dict = torch.nn.Module._load_from_state_dict


_SHARDABLE_CLASSES: dict = {}


def is_shardable(layer) -> bool:
    return isinstance(layer, ShardableQuantized)


def base_dtype(layer) -> torch.dtype | None:
    """The dtype W0 was quantized from (a Linear4bit's quant_state.dtype), None where the layer does not say."""
    if is_shardable(layer):
        return layer.quant_format["dtype"]
    state = getattr(layer.weight, "quant_state", None)
    return None if state is None else state.dtype


def shardable(model: torch.nn.Module) -> torch.nn.Module:
    """Put every bitsandbytes Linear4bit / Linear8bitLt of `model` (bare, under ``QuantizedLoRALinear`` or PEFT's LoRA
    layers) into the form FSDP2 can shard (``ShardableQuantized``), in place; returns `model`. Call it after the
    model is quantized and on its device, before ``fully_shard``. The codes are shared, not copied; QLoRA's fused
    layers and PEFT's fused layers read them each forward, so a sharded model computes what one process computes."""
    for module in list(model.modules()):
        if not is_quantized_linear(module) or is_shardable(module):
            continue
        qw = quantized_weight(module)
        dtype = base_dtype(module)
        module.weight = torch.nn.Parameter(qw.data, requires_grad=False)
        for name, t in zip(_STATE_BUFFERS, (qw.absmax, qw.code, qw.absmax2, qw.code2)):
            module.register_buffer(name, t if t.numel() else t.new_empty((0,)))  # (one object per unused part)
        module.quant_format = dict(fmt=qw.fmt, blocksize=qw.blocksize, blocksize2=qw.blocksize2, offset=qw.offset,
                                   shape=qw.shape, dtype=dtype)
        cls = type(module)
        if cls not in _SHARDABLE_CLASSES:
            _SHARDABLE_CLASSES[cls] = type(f"Shardable{cls.__name__}", (ShardableQuantized, cls),
                                           {"__module__": __name__})
        module.__class__ = _SHARDABLE_CLASSES[cls]
    return model


def _read_shardable(layer) -> QuantizedWeight:
    f = layer.quant_format
    weight = layer.weight
    if hasattr(weight, "full_tensor"):  # outside FSDP2's forward the codes are a sharded DTensor
        raise RuntimeError(f"{type(layer).__name__}: its codes are sharded (a DTensor) outside the forward of its "
                           "FSDP2 unit; call the model (or .full_tensor() the weight) instead")
    return QuantizedWeight(weight, *(getattr(layer, n) for n in _STATE_BUFFERS), f["fmt"], f["blocksize"],
                           f["blocksize2"], f["offset"], f["shape"])


def compute_dtype(layer, x: Tensor) -> torch.dtype:
    """The dtype the base product of `layer` runs in for input x outside torch.autocast (``qlora_linear`` gives
    autocast's precedence): a Linear4bit's compute_dtype when set, else x's (bitsandbytes' rule)."""
    cd = getattr(layer, "compute_dtype", None)
    if cd is not None and getattr(layer, "compute_type_is_set", False) and x.dtype != torch.float64:
        return cd
    return x.dtype


# --------------------------------------------------------------------------------------------
# Dequantization and the variants
# --------------------------------------------------------------------------------------------
def dequantize(qw: QuantizedWeight, dtype: torch.dtype, kernels: bool = True) -> Tensor:
    """W0 [N, K] in `dtype`: one Triton pass where `kernels` asks for it (``plan.aux_kernels``) and Triton runs,
    else the reference's formula in plain PyTorch."""
    if kernels and backends.triton_serves(qw.device, dtype):
        from .kernels.quantized import dequantize as triton_dequantize

        return triton_dequantize(qw, dtype)
    return reference.dequantize(qw, dtype)


_STAND_INS: dict = {}


def stand_in_weight(qw: QuantizedWeight, x: Tensor) -> Tensor:
    """A stand-in [N, K] of x's dtype and device on one element (stride 0), where W0 is not read: the grads of the
    adapters, the argument checks. Kept per shape, dtype and device (no allocation per call)."""
    if x.device.type == "meta" or not is_plain(x):
        return x.new_zeros(()).expand(*qw.shape)
    key = (qw.shape, x.dtype, x.device)
    stand_in = _STAND_INS.get(key)
    if stand_in is None:
        if len(_STAND_INS) >= 1024:
            _STAND_INS.clear()
        stand_in = _STAND_INS[key] = x.new_zeros(()).expand(*qw.shape)
    return stand_in


def forward(plan, x, qw, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa):
    """The plan's forward over a quantized W0: (y, xa) as ``backends.FORWARD``'s."""
    reads_quantized = backends.QUANTIZED_FORWARD.get(plan.forward)
    if reads_quantized is not None:
        return reads_quantized(x, qw, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, plan.xa_splits,
                               plan.aux)
    weight = dequantize(qw, x.dtype, plan.aux)  # transient: freed when this returns
    return backends.FORWARD[plan.forward](x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa,
                                          plan.xa_splits, plan.aux)


def backward(plan, grad_y, x, qw, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic):
    """The plan's backward over a quantized W0 (dequantized again for dX only): (dx or empty, dA, dB)."""
    weight = dequantize(qw, x.dtype, plan.aux) if need_dx else stand_in_weight(qw, x)
    return backends.BACKWARD[plan.backward](grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx,
                                            deterministic, plan.aux)


# --------------------------------------------------------------------------------------------
# Argument checks and ops
# --------------------------------------------------------------------------------------------
# Weights checked already, weakly held by their codes tensor (the value holds the other parts, never the key).
_CHECKED = WeakIdKeyDictionary()


def _checked_as(qw: QuantizedWeight, device: torch.device) -> tuple:
    return (qw.absmax, qw.code, qw.absmax2, qw.code2, qw.fmt, qw.blocksize, qw.blocksize2, qw.offset, qw.shape, device)


def check_quantized(qw: QuantizedWeight, device: torch.device) -> None:
    """The quantized weight's parts: format, sizes, dtypes, device (x's); once per weight and device."""
    if torch.compiler.is_compiling() or not isinstance(qw.data, Tensor):
        return _check_quantized(qw, device)
    kept = _CHECKED.get(qw.data)
    if kept is not None and all(a is b if isinstance(a, Tensor) else a == b
                                for a, b in zip(kept, _checked_as(qw, device))):
        return
    _check_quantized(qw, device)
    _CHECKED[qw.data] = _checked_as(qw, device)


def _check_quantized(qw: QuantizedWeight, device: torch.device) -> None:
    if qw.fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {qw.fmt!r}")
    N, K = qw.shape
    if N < 1 or K < 1:
        raise ValueError(f"sizes: expected positive out_features and in_features, got {[N, K]}")
    for name, t in (("qdata", qw.data), ("absmax", qw.absmax), ("code", qw.code), ("absmax2", qw.absmax2),
                    ("code2", qw.code2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.numel() and t.device != device:
            raise ValueError(f"{name}: on device {t.device}, expected x's device {device}")
    if qw.fmt == "int8":
        if qw.data.dtype != torch.int8 or tuple(qw.data.shape) != (N, K):
            raise ValueError(f"qdata: expected int8 [{N}, {K}], got {qw.data.dtype} {list(qw.data.shape)}")
        if qw.absmax.dtype != torch.float32 or tuple(qw.absmax.shape) != (N,):
            raise ValueError(f"absmax: expected the rows' fp32 scales [{N}], got {qw.absmax.dtype} "
                             f"{list(qw.absmax.shape)}")
        return
    if qw.blocksize < 1:
        raise ValueError(f"blocksize: expected a positive number of elements per absmax, got {qw.blocksize}")
    if qw.data.element_size() * qw.data.numel() < (N * K + 1) // 2:
        raise ValueError(f"qdata: expected {(N * K + 1) // 2} bytes of packed 4-bit codes for [{N}, {K}], got "
                         f"{qw.data.element_size() * qw.data.numel()}")
    blocks = -(-N * K // qw.blocksize)
    if qw.code.dtype != torch.float32 or qw.code.numel() != 16:
        raise ValueError(f"code: expected the 16 fp32 values of the codes, got {qw.code.dtype} {list(qw.code.shape)}")
    if qw.absmax.numel() != blocks:
        raise ValueError(f"absmax: expected {blocks} entries (one per {qw.blocksize} elements), got "
                         f"{qw.absmax.numel()}")
    if qw.nested:
        if qw.absmax.dtype != torch.uint8 or qw.blocksize2 < 1 or qw.code2.numel() != 256 or \
                qw.absmax2.numel() != -(-blocks // qw.blocksize2):
            raise ValueError("absmax2: double quantization expects uint8 absmax, 256 fp32 code2 values and one fp32 "
                             f"absmax2 per blocksize2 = {qw.blocksize2} absmax entries")
    elif qw.absmax.dtype != torch.float32:
        raise ValueError(f"absmax: expected fp32 (or uint8 with absmax2 for double quantization), got "
                         f"{qw.absmax.dtype}")


def check_qargs(x, qw, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """ops.check_args with W0 given by its quantized form; raised before any kernel."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    check_quantized(qw, x.device)
    check_args(x, stand_in_weight(qw, x), bias, lora_A, lora_B, scaling, dropout_p)


# The QLoRA kind: args = (x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, seed, scaling, dropout_p), the
# quantized weight as the op takes it (``unpack``).
def _call(args, grads) -> Call:
    x, qdata, qstate, fmt, sizes, offset, _, lora_A, _, _, _, dropout_p = args
    return Call(x.device, x.dtype, x.shape[0], sizes[1], sizes[0], lora_A.shape[0], dropout_p > 0.0, grads,
                torch.are_deterministic_algorithms_enabled(), 0, pack(qdata, qstate, fmt, sizes, offset).quant)


def _kind_forward(plan, args, save):
    x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, seed, scaling, dropout_p = args
    return forward(plan, x, pack(qdata, qstate, fmt, sizes, offset), bias, lora_A, lora_B, seed, scaling, dropout_p,
                   save)


def _kind_backward(plan, grad_y, args, saved, need_dx, deterministic):
    x, qdata, qstate, fmt, sizes, offset, _, lora_A, lora_B, seed, scaling, dropout_p = args
    return backward(plan, grad_y, x, pack(qdata, qstate, fmt, sizes, offset), lora_A, lora_B, saved[0], seed,
                    scaling, dropout_p, need_dx, deterministic)


def _kind_backward_op(grad_y, args, saved, need_dx, deterministic, spec):
    x, qdata, qstate, fmt, sizes, offset, _, lora_A, lora_B, seed, scaling, dropout_p = args
    return torch.ops.lora_kernels.qlora_linear_bwd(grad_y, x, qdata, qstate, fmt, sizes, offset, lora_A, lora_B,
                                                   saved[0], seed, scaling, dropout_p, need_dx, deterministic, spec)


QLORA = entry.Kind("qlora", "qlora_linear_fwd", _kind_forward, _kind_backward, _kind_backward_op, _call, n_args=12,
                   tensors=(0, 1, 2, 6, 7, 8, 9), trained=(7, 8), kept=(0, 1, 2, 7, 8, 9), lists=(2,), bias=6)


@torch.library.custom_op("lora_kernels::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd(x: Tensor, qdata: Tensor, qstate: list[Tensor], fmt: str, sizes: list[int], offset: float,
                     bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, seed: Optional[Tensor], scaling: float,
                     dropout_p: float, grads: int, plan: str) -> tuple[Tensor, Tensor]:
    check_qargs(x, pack(qdata, qstate, fmt, sizes, offset), bias, lora_A, lora_B, scaling, dropout_p)
    check_seed(seed, x.device, dropout_p)
    args = (x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, seed, scaling, dropout_p)
    return _kind_forward(planner.resolve_spec(plan, _call(args, grads)), args, grads > 0)


@qlora_linear_fwd.register_fake
def _(x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, seed, scaling, dropout_p, grads, plan):
    check_qargs(x, pack(qdata, qstate, fmt, sizes, offset), bias, lora_A, lora_B, scaling, dropout_p)
    xa_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((x.shape[0], sizes[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]) if grads else (0,), dtype=xa_dtype))


@torch.library.custom_op("lora_kernels::qlora_linear_bwd", mutates_args=())
def qlora_linear_bwd(grad_y: Tensor, x: Tensor, qdata: Tensor, qstate: list[Tensor], fmt: str, sizes: list[int],
                     offset: float, lora_A: Tensor, lora_B: Tensor, xa: Tensor, seed: Optional[Tensor],
                     scaling: float, dropout_p: float, need_dx: bool, deterministic: bool,
                     plan: str) -> tuple[Tensor, Tensor, Tensor]:
    M, N, r = x.shape[0], sizes[0], lora_A.shape[0]
    for name, t, shape in (("grad_y", grad_y, (M, N)), ("xa", xa, (M, r))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    check_seed(seed, x.device, dropout_p)
    args = (x, qdata, qstate, fmt, sizes, offset, None, lora_A, lora_B, seed, scaling, dropout_p)
    chosen = planner.resolve_spec(plan, _call(args, 2 if need_dx else 1))
    return _kind_backward(chosen, grad_y, args, (xa,), need_dx, deterministic)


@qlora_linear_bwd.register_fake
def _(grad_y, x, qdata, qstate, fmt, sizes, offset, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx,
      deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


entry.register_op_autograd(qlora_linear_fwd, QLORA)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def compute_inputs(x, qweight, bias, compute_dtype):
    """(x, bias, x's dtype) as a product over a quantized W0 takes them: in `compute_dtype` (default x's;
    torch.autocast's inside a region), as bitsandbytes' layers compute; y comes back in x's dtype."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight: expected a QuantizedWeight (quantized_weight(layer)), got {type(qweight).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    out_dtype = x.dtype
    dtype = autocast_dtype(x) if x.dtype != torch.float64 else None
    dtype = dtype or compute_dtype or x.dtype
    if x.dtype != dtype:
        x = x.to(dtype)
    if isinstance(bias, Tensor) and bias.is_floating_point() and bias.dtype != dtype:
        bias = bias.to(dtype)
    return x, bias, out_dtype


def qlora_linear(x: Tensor, qweight: QuantizedWeight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float, dropout_p: float = 0.0, *, backend: str = "auto", seed: Optional[Tensor] = None,
                 compute_dtype: torch.dtype | None = None) -> Tensor:
    """y = x W0^T + bias + scaling * (dropout(x) A^T) B^T over a quantized W0 (``quantized_weight(layer)``); x may
    have any leading dims. The product runs in `compute_dtype` (default x's; torch.autocast's inside a region) and y
    comes back in x's dtype; the bias is cast to the compute dtype. Grads reach x, lora_A, lora_B (and a bias that
    requires grad)."""
    x, bias, out_dtype = compute_inputs(x, qweight, bias, compute_dtype)
    lora_A, lora_B = adapters_for(x, lora_A, lora_B)
    check_qargs(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)
    planner.check_name(backend)
    scaling, dropout_p = float(scaling), float(dropout_p)
    seed = resolve_seed(seed, x, dropout_p)
    args = (x.reshape(-1, x.shape[-1]), *unpack(qweight), bias, lora_A, lora_B, seed, scaling, dropout_p)
    y = entry.run(QLORA, args, x.shape[:-1], backend, grads_needed(x, lora_A, lora_B, bias))
    return y if y.dtype == out_dtype else y.to(out_dtype)
