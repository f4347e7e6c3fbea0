"""Workers for tests/test_distributed.py: a few training steps of a small model with fused LoRA layers under
DDP or FSDP2 (NCCL when 2 GPUs are present, else gloo on CPU), and the single-process run they must reproduce."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import lora_kernels

WORLD = 2
STEPS = 3
BATCH = 4  # rows per rank
D_IN, D_HID = 24, 40


def build_model(p: float, backend: str, dtype=torch.float32, device="cpu", bf16_base: bool = False):
    """bf16_base: the base layers in bf16 and the adapters in fp32 (the layers' default next to a 16-bit W0); dtype
    then matters only as float64 (the reference run, on the same values)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.GELU(), nn.Linear(D_HID, D_HID), nn.GELU(), nn.Linear(D_HID, D_IN))
    if bf16_base:
        model.to(torch.bfloat16)
    lora_kernels.inject(model, ["0", "2", "4"], r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False,
                        backend=backend)
    lora_kernels.mark_only_lora_as_trainable(model)
    if bf16_base and dtype != torch.float64:
        return model.to(device=device)
    return model.to(device=device, dtype=dtype)


def data(dtype=torch.float32, device="cpu", bf16_base: bool = False):
    """(inputs, targets); with a bf16 base (not the float64 reference) the inputs are bf16, the targets fp32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * BATCH, D_IN, generator=g)
    t = torch.randn(WORLD * BATCH, D_IN, generator=g)
    x_dtype = torch.bfloat16 if bf16_base and dtype != torch.float64 else dtype
    return x.to(device=device, dtype=x_dtype), t.to(device=device, dtype=dtype)


def dropout_seed(step: int, rank: int) -> int:
    return 1000 + step * WORLD + rank


def single_process(p: float, backend: str, dtype=torch.float64, device="cpu", bf16_base: bool = False):
    """The same steps in one process: each rank's micro-batch with that rank's RNG seed, grads averaged."""
    model = build_model(p, backend, dtype, device, bf16_base)
    return model, train_whole_batch(model, *data(dtype, device, bf16_base), model)


def train_whole_batch(model, x, t, forward) -> list:
    """STEPS SGD steps in one process, each rank's micro-batch with that rank's RNG seed, grads averaged (what WORLD
    processes compute together); the losses."""
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.5)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for rank in range(WORLD):
            torch.manual_seed(dropout_seed(step, rank))
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            loss = nn.functional.mse_loss(forward(x[rows]).to(t.dtype), t[rows])
            (loss / WORLD).backward()
            total += loss.item() / WORLD
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def step_all_ranks(opt, loss) -> float:
    """The optimizer step after a backward, and the loss averaged over the ranks."""
    opt.step()
    opt.zero_grad()
    reported = loss.detach().clone()
    dist.all_reduce(reported)
    return reported.item() / WORLD


def lora_params(model) -> dict:
    out = {}
    for name, q in model.named_parameters():
        if "lora_" in name:
            q = q.detach()
            out[name.removeprefix("module.")] = (q.full_tensor() if hasattr(q, "full_tensor") else q).cpu()
    return out


def use_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= WORLD


def worker(rank: int, port: int, engine: str, p: float, backend: str, out_dir: str, precision: str):
    """precision: "fp32"; "bf16_params" (FSDP2's MixedPrecisionPolicy: bf16 compute, fp32 reduction); "bf16_base"
    (bf16 base layers, fp32 adapters, no policy)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device("cuda", rank) if use_gpus() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a bounded timeout: a lost peer makes the collectives raise here instead of waiting 30 minutes
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    try:
        model = build_model(p, backend, device=device, bf16_base=precision == "bf16_base")
        x, t = data(device=device, bf16_base=precision == "bf16_base")
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        if engine == "ddp":
            frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
            model = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
            # only LoRA parameters take part in the gradient reduction
            reduced = {n.removeprefix("module.") for n, q in model.named_parameters() if q.requires_grad}
            assert reduced.isdisjoint(frozen) and all("lora_" in n for n in reduced), reduced
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # an explicit mesh: left to itself, fully_shard puts the shards on CUDA whenever CUDA exists,
            # also when these workers run on CPU (one GPU for two processes)
            mesh = init_device_mesh(device.type, (WORLD,))

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if precision == "bf16_params" else MixedPrecisionPolicy()
            for layer in lora_kernels.lora_layers(model).values():
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            assert all(hasattr(q, "placements") for q in model.parameters())  # DTensors
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.5)
        losses = []
        for step in range(STEPS):
            torch.manual_seed(dropout_seed(step, rank))
            loss = nn.functional.mse_loss(model(x[rows]).float(), t[rows])
            loss.backward()
            if engine == "fsdp2":
                grads = [q.grad for q in model.parameters() if q.requires_grad]
                assert all(g is not None and g.dtype == torch.float32 for g in grads)
            losses.append(step_all_ranks(opt, loss))
        params = lora_params(model)
        inner = model.module if engine == "ddp" else model
        lora_kernels.save_adapter(inner, os.path.join(out_dir, "adapter"))
        merged_layer = lora_kernels.lora_layers(inner)["0"].to_linear()  # gathers sharded parameters
        if rank == 0:
            torch.save({"losses": losses, "params": params, "merged_weight": merged_layer.weight.detach().cpu()},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()
    # Done, files written and closed: leave without the interpreter's shutdown. Gloo's threads can still hold work
    # objects whose tensors are released during interpreter finalization, which aborts the process (SIGABRT)
    # after its work is complete; a loaded CI machine made this more likely.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------------------
# FSDP2 over quantized base layers (QLoRA), natively (inject) and through PEFT (fuse)
# ------------------------------------------------------------------------------------------------------------
Q_IN, Q_HID = 64, 128  # multiples of 64: bitsandbytes' CPU kernels serve them exactly
QUANT_CONFIGS = ("nf4_dq", "nf4", "fp4_dq", "fp4", "int8", "nf4_dq+dora")  # "+dora": QDoRA


def build_quantized(config: str, path: str, p: float, backend: str, device="cpu"):
    """Three linear layers quantized as `config` ("nf4_dq", "fp4", "int8", ...; "+dora": DoRA over them), LoRA on each
    (r = 4, B non-zero): `path` "inject" (QuantizedLoRALinear) or "peft" (PEFT's bitsandbytes LoRA layers, fused); the
    bases made shardable. The same weights and adapters for the same arguments."""
    import bitsandbytes as bnb
    from lora_kernels.quantized import quantize_linear, shardable

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(Q_IN, Q_HID), nn.GELU(), nn.Linear(Q_HID, Q_HID), nn.GELU(), nn.Linear(Q_HID, Q_IN))
    config, _, variant = config.partition("+")
    dora = variant == "dora"
    fmt, _, dq = config.partition("_")
    for i in (0, 2, 4):
        lin = dense[i]
        if fmt == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
            q.load_state_dict(lin.state_dict())
            dense[i] = q.to(device)
        else:
            dense[i] = quantize_linear(lin.to(device), fmt, bool(dq))
    if path == "inject":
        model = lora_kernels.inject(dense, ["0", "2", "4"], r=4, lora_alpha=8, lora_dropout=p,
                                    init_lora_weights=False, backend=backend, use_dora=dora)
        lora_kernels.mark_only_lora_as_trainable(model)
    else:
        from peft import LoraConfig, get_peft_model
        from lora_kernels.peft import fuse

        model = fuse(get_peft_model(dense, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0", "2", "4"],
                                                      init_lora_weights=False, use_dora=dora)), backend=backend)
    return shardable(model).to(device)


def quantized_lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, (lora_kernels.FusedLoRALinear, LoraLayer))]


def quantized_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * BATCH, Q_IN, generator=g), torch.randn(WORLD * BATCH, Q_IN, generator=g)


def quantized_single(config: str, path: str, p: float, backend: str, checkpointed: bool = False):
    """One process: each rank's micro-batch with its RNG seed, grads averaged; (losses, LoRA params)."""
    model = build_quantized(config, path, p, backend)
    losses = train_whole_batch(model, *quantized_data(), lambda x: _forward(model, x, checkpointed))
    return losses, lora_params(model), model


def _forward(model, x, checkpointed: bool):
    if not checkpointed:
        return model(x)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(model, x, use_reentrant=False)


def quantized_worker(rank: int, port: int, path: str, p: float, backend: str, out_dir: str, precision: str):
    """Every config of QUANT_CONFIGS (precision "fp32"), or nf4_dq under MixedPrecisionPolicy(bf16 compute) with
    activation checkpointing (precision "bf16_params"): FSDP2 over the shardable quantized bases."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=90))
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        mixed = precision == "bf16_params"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed \
            else MixedPrecisionPolicy()
        results = {}
        for config in (("nf4_dq",) if mixed else QUANT_CONFIGS):
            model = build_quantized(config, path, p, backend)
            codes = [m.weight for m in model.modules() if lora_kernels.quantized.is_shardable(m)]
            total = sum(c.numel() * c.element_size() for c in codes)
            for layer in quantized_lora_layers(model):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            codes = [m.weight for m in model.modules() if lora_kernels.quantized.is_shardable(m)]
            local = sum(c.to_local().numel() * c.element_size() for c in codes)
            x, t = quantized_data()
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.5)
            losses = []
            for step in range(STEPS):
                torch.manual_seed(dropout_seed(step, rank))
                loss = nn.functional.mse_loss(_forward(model, x[rows], mixed).float(), t[rows])
                loss.backward()
                losses.append(step_all_ranks(opt, loss))
            params = lora_params(model)
            adapter_dir = os.path.join(out_dir, f"adapter-{config}")
            if path == "inject":
                lora_kernels.save_adapter(model, adapter_dir)
            else:  # PEFT: the full state dict gathered on every rank, written by rank 0 (PEFT's own save)
                full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:
                    model.save_pretrained(adapter_dir, state_dict=full)
                dist.barrier()
            results[config] = {"losses": losses, "params": params, "local_code_bytes": local,
                               "code_bytes": total}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
