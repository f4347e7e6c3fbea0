"""FusedLoRALinear under torch.distributed (2 processes: NCCL on 2 GPUs, else gloo on CPU) and activation
checkpointing.

DDP and FSDP2 runs of a few steps must give the losses and LoRA parameters of one process doing the same
micro-batches with the same dropout seeds, within the parity rule against an fp64 run.
"""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import dist_worker
from conftest import DEVICE, assert_parity
import lora_kernels  # noqa: E402
from lora_kernels import inject, lora_layers, mark_only_lora_as_trainable, peft_format

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
# The workers run on CPU unless 2 GPUs exist: there the kernels run in the interpreter (no GPU at all) or,
# on a 1-GPU machine, the torch backend serves (the kernels are covered on that GPU by the other files).
BACKEND = "triton" if dist_worker.use_gpus() or not torch.cuda.is_available() else "torch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(engine, p, tmp_path, precision="fp32", limit_s=240.0, fn=None):
    """Run the 2 workers. Rendezvous on a free local port is racy (the port can be taken between picking and
    binding it; once in a dozen CI runs a worker hung or aborted there), so a run that fails or has not
    finished within limit_s is stopped and started once more on a new port; a second failure is the test's."""
    errors = []
    for attempt in range(2):
        ctx = mp.start_processes(fn or dist_worker.worker, nprocs=dist_worker.WORLD, join=False, start_method="spawn",
                                 args=(_free_port(), engine, p, BACKEND, str(tmp_path), precision))
        deadline = time.monotonic() + limit_s
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the workers did not finish within {limit_s:.0f} s")
            return torch.load(tmp_path / "result.pt")
        except Exception as e:  # noqa: BLE001 - reported below with the second attempt's error
            errors.append(f"attempt {attempt + 1}: {type(e).__name__}: {e}")
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
    raise RuntimeError("distributed run failed twice:\n" + "\n".join(errors))


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_match_one(engine, p, tmp_path):
    result = _spawn(engine, p, tmp_path)
    # the reference runs where the workers ran: the same device draws the same dropout seeds
    device = "cuda" if dist_worker.use_gpus() else "cpu"
    model32, losses32 = dist_worker.single_process(p, BACKEND, torch.float32, device)
    model64, losses64 = dist_worker.single_process(p, "torch", torch.float64, device)
    assert_parity("losses", torch.tensor(result["losses"]), torch.tensor(losses32), torch.tensor(losses64, dtype=torch.float64))
    ref32, ref64 = dist_worker.lora_params(model32), dist_worker.lora_params(model64)
    assert sorted(result["params"]) == sorted(ref32)
    for name in ref32:
        assert_parity(name, result["params"][name], ref32[name], ref64[name])
    # the adapter written by rank 0 holds the same parameters as the single-process model
    single = tmp_path / "single"
    peft_format.save_adapter(model32, single)
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "adapter" / peft_format.WEIGHTS_NAME)
    mine = load_file(single / peft_format.WEIGHTS_NAME)
    assert sorted(theirs) == sorted(mine)
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["merged_weight"], lora_layers(model32)["0"].to_linear().weight.cpu(),
                               rtol=1e-5, atol=1e-6)


def test_fsdp2_mixed_precision_trains(tmp_path):
    """bf16 parameters in forward/backward, fp32 gradient reduction: runs, learns, stays near the fp32 run."""
    result = _spawn("fsdp2", 0.0, tmp_path, precision="bf16_params")
    _, losses32 = dist_worker.single_process(0.0, BACKEND, torch.float32, "cuda" if dist_worker.use_gpus() else "cpu")
    assert result["losses"][-1] < result["losses"][0]
    # bf16 keeps 8 bits of mantissa: the losses agree with the fp32 run to bf16 precision, no better
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses32), rtol=3e-2, atol=0)


def test_fsdp2_bf16_base_with_fp32_adapters(tmp_path):
    """A bf16 model with the layers' default fp32 adapters under FSDP2 without a precision policy (trainable
    parameters share one dtype, W0 is frozen): the losses and the fp32 adapters of one process running the same
    bf16 model, by the parity rule against the fp64 run on the same values."""
    result = _spawn("fsdp2", 0.2, tmp_path, precision="bf16_base")
    device = "cuda" if dist_worker.use_gpus() else "cpu"
    model16, losses16 = dist_worker.single_process(0.2, BACKEND, torch.float32, device, bf16_base=True)
    model64, losses64 = dist_worker.single_process(0.2, "torch", torch.float64, device, bf16_base=True)
    assert_parity("losses", torch.tensor(result["losses"]), torch.tensor(losses16),
                  torch.tensor(losses64, dtype=torch.float64))
    ref16, ref64 = dist_worker.lora_params(model16), dist_worker.lora_params(model64)
    assert sorted(result["params"]) == sorted(ref16) and ref16
    for name in ref16:
        assert result["params"][name].dtype == ref16[name].dtype == torch.float32, name
        assert_parity(name, result["params"][name], ref16[name], ref64[name])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 24)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_activation_checkpointing_replays_dropout(p):
    """Non-reentrant checkpointing recomputes the forward in backward: the dropout seed is restored with the
    RNG state, so the recomputed masks are the same and the gradients equal the plain run bit for bit
    (deterministic mode: float atomics on a GPU would differ in the last bits from run to run anyway)."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _checkpointed_and_plain_grads_equal(p)
    finally:
        torch.use_deterministic_algorithms(prev)


def _checkpointed_and_plain_grads_equal(p):
    torch.manual_seed(0)
    blocks = nn.ModuleList([_Block() for _ in range(2)])
    inject(blocks, ["fc1", "fc2"], r=4, lora_dropout=p, init_lora_weights=False, backend="triton")
    mark_only_lora_as_trainable(blocks)
    blocks.to(DEVICE)
    x = torch.randn(6, 24, device=DEVICE)
    grads = []
    for use_checkpoint in (False, True):
        blocks.zero_grad()
        torch.manual_seed(42)
        h = x.clone().requires_grad_(True)
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
        h.square().mean().backward()
        grads.append({n: q.grad.clone() for n, q in blocks.named_parameters() if q.requires_grad})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# ------------------------------------------------------------------------------------------------------------
# FSDP2 over 4-bit and 8-bit bases (QLoRA)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["inject", "peft"])
def test_fsdp2_over_quantized_bases_matches_one_process(path, tmp_path):
    """FSDP2 (fully_shard per LoRA layer and the root) over bases made shardable: NF4 and FP4 with and without double
    quantization, and int8; dropout on. The adapters after the steps and the losses equal one process running the same
    micro-batches; each rank holds about half of the codes; rank 0's adapter files equal one process's. QDoRA (DoRA over
    NF4) too."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    if dist_worker.use_gpus():
        pytest.skip("the quantized workers run on CPU (gloo)")
    results = _spawn(path, 0.2, tmp_path, fn=dist_worker.quantized_worker, limit_s=400.0)
    assert sorted(results) == sorted(dist_worker.QUANT_CONFIGS)
    for config, result in results.items():
        losses, params, model = dist_worker.quantized_single(config, path, 0.2, BACKEND)
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-7,
                                   msg=config)
        assert sorted(result["params"]) == sorted(params) and params
        for name in params:
            torch.testing.assert_close(result["params"][name], params[name], rtol=1e-5, atol=1e-6, msg=name)
        # the codes sharded: each rank holds half of them (up to dim-0 padding)
        assert result["local_code_bytes"] <= result["code_bytes"] / 2 + 64, (config, result["local_code_bytes"])
        single = tmp_path / f"single-{config}"
        if path == "inject":
            lora_kernels.save_adapter(model, single)
        else:
            model.save_pretrained(single)
        theirs, mine = (load_file(d / peft_format.WEIGHTS_NAME) for d in (tmp_path / f"adapter-{config}", single))
        assert sorted(theirs) == sorted(mine)
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp2_quantized_mixed_precision_checkpointed_trains(tmp_path):
    """NF4 bases under MixedPrecisionPolicy(bf16 compute, fp32 reduction) with activation checkpointing: runs, learns,
    tracks the fp32 one-process run to bf16 precision."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    if dist_worker.use_gpus():
        pytest.skip("the quantized workers run on CPU (gloo)")
    result = _spawn("inject", 0.0, tmp_path, precision="bf16_params", fn=dist_worker.quantized_worker)["nf4_dq"]
    losses, _, _ = dist_worker.quantized_single("nf4_dq", "inject", 0.0, BACKEND, checkpointed=True)
    assert result["losses"][-1] < result["losses"][0]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=3e-2, atol=0)
