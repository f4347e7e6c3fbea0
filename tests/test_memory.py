"""Activation memory: what this package saves for the backward, against PEFT, counted exactly (bench.memory, on the
meta device), and dropout under torch.compile with activation checkpointing."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_kernels import FusedLoRALinear

memory = pytest.importorskip("bench.memory")
pytest.importorskip("peft")


def test_tracker_counts_by_storage_and_sees_frees():
    """Two views of one saved storage count once; a temporary freed inside the forward is in the peak, not saved;
    parameters are not counted."""
    w = nn.Parameter(torch.randn(8, 8, device="meta"))
    tracker = memory.Tracker(exclude=[w])
    x = torch.empty(16, 8, device="meta", requires_grad=True)
    with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        tracker.phase()
        big = torch.empty(1000, device="meta") * 2  # a temporary of 4000 bytes, freed below
        del big
        y = (x * 2).exp()  # saves exp's output (16 x 8 x 4 bytes)
        z = y.view(128).sin()  # saves a view of the same storage: counted once
        peak = tracker.peak
    assert tracker.saved_bytes() == 16 * 8 * 4
    assert peak >= 4000 + 16 * 8 * 4 and tracker.alive() < 4000
    assert z.shape == (128,)


@pytest.mark.parametrize("model", list(memory.MODELS))
def test_lora_kernels_saves_at_most_peft_at_every_dropout(model):
    """Per token, one decoder layer at full width, LoRA on the usual targets: this package saves no more than PEFT,
    and with dropout its saved bytes do not grow (PEFT's do: the mask and the dropped copies)."""
    saved = {}
    for p in (0.0, 0.05):
        for contender in ("peft", "lora_kernels"):
            saved[contender, p] = memory.layer_row(model, contender, 16, p).saved_kib_per_token
    for p in (0.0, 0.05):
        assert saved["lora_kernels", p] <= saved["peft", p], saved
    assert saved["lora_kernels", 0.05] == saved["lora_kernels", 0.0]
    assert saved["peft", 0.05] > saved["peft", 0.0]


@pytest.mark.parametrize("quantized,dense,peft_row", [("lora_kernels_qlora", "lora_kernels", "peft_qlora"),
                                                      ("lora_kernels_qdora", "lora_kernels_dora", None)],
                         ids=["QLoRA", "QDoRA"])
def test_over_4bit_bases_the_adapter_share_is_the_dense_one(quantized, dense, peft_row):
    """QLoRA and QDoRA (the layer's linears in NF4 through bitsandbytes, on the meta device): the adapter share is
    LoRA's / DoRA's over a dense base at every dropout (x, [M, r], DoRA's product, the seed: nothing of the
    dequantized weight), and QLoRA saves no more than PEFT over the same 4-bit layers (PEFT's QDoRA cannot be built on
    the meta device)."""
    pytest.importorskip("bitsandbytes")
    if peft_row:
        pytest.importorskip("peft")
    frozen = memory.layer_row("llama-3-8b", "frozen_qlora", 0, 0.0).saved_kib_per_token
    dense_share = (memory.layer_row("llama-3-8b", dense, 16, 0.0).saved_kib_per_token
                   - memory.layer_row("llama-3-8b", "frozen", 0, 0.0).saved_kib_per_token)
    for p in (0.0, 0.05):
        ours = memory.layer_row("llama-3-8b", quantized, 16, p).saved_kib_per_token
        assert ours - frozen == pytest.approx(dense_share)
        if peft_row:
            assert ours <= memory.layer_row("llama-3-8b", peft_row, 16, p).saved_kib_per_token


def _attributed_saves(model_name, dropout, tokens=64):
    """{module name: [(saved tensor's storage key, numel, dtype), ...]} for each FusedLoRALinear of the layer, and
    each one's input storage key, from a forward on `tokens` tokens."""
    from lora_kernels import lora_layers

    with memory.shapes_only():
        model, _ = memory.make_contender(model_name, "lora_kernels", 16, dropout, 32768)
        params = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
        current, saves, inputs = [], {}, {}
        for name, layer in lora_layers(model).items():
            layer.register_forward_pre_hook(lambda m, a, name=name: (current.append(name),
                                                                     inputs.__setitem__(name, a[0].untyped_storage()._cdata)) and None)
            layer.register_forward_hook(lambda m, a, out: current.pop() and None)

        def pack(t):
            key = t.untyped_storage()._cdata
            if current and key not in params:
                saves.setdefault(current[-1], []).append((key, t.numel(), t.dtype))
            return t

        hidden = memory.hidden_size(*memory.MODELS[model_name][:2])
        x = torch.empty(tokens // memory.SEQ, memory.SEQ, hidden, device="meta", dtype=torch.bfloat16,
                        requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            memory._run_layer(model, x)
    return saves, inputs


@pytest.mark.parametrize("model", list(memory.MODELS))
def test_with_dropout_the_lora_share_is_x_and_rank_sized_products(model):
    """Everything a LoRA layer of this package saves for the backward, with dropout on, is its input x itself (the
    same storage: no mask, no dropped copy, no cast copy), the [M, r] fp32 product and the one-element seed."""
    tokens, r = 64, 16
    saves, inputs = _attributed_saves(model, 0.05, tokens)
    assert saves and set(saves) == set(inputs)
    for name, saved in saves.items():
        kinds = []
        for key, numel, dtype in saved:
            if key == inputs[name]:
                kinds.append("x")
            elif numel == tokens * r and dtype == torch.float32:
                kinds.append("xa")
            elif numel == 1 and dtype == torch.int64:
                kinds.append("seed")
            else:
                pytest.fail(f"{model} {name}: saves a tensor of {numel} {dtype} besides x, xa and the seed")
        assert sorted(kinds) == ["seed", "x", "xa"], (name, kinds)


def test_whole_model_figures_follow_the_layer():
    row = memory.layer_row("gpt2-medium", "lora_kernels", 16, 0.0)
    tokens_gib = memory.BATCH[0] * memory.BATCH[1] * 1024 / 2**30
    n_layers = memory.MODELS["gpt2-medium"][2]
    assert row.model_gib == pytest.approx(tokens_gib * (n_layers * row.saved_kib_per_token
                                                        + row.backward_peak_kib_per_token), abs=0.02)
    assert row.model_ckpt_gib < row.model_gib
    assert "c_attn" in row.plans and "+" in row.plans


def test_moe_experts_keep_nothing_per_layer_and_a_smaller_share_per_token():
    """Qwen3-30B-A3B's experts block at full width: PEFT keeps W0 + s B A of all 128 experts for the backward (the
    per-layer constant, at least the experts' bf16 weights); the fused block keeps nothing of that size, and less
    than PEFT per token."""
    pytest.importorskip("transformers")
    rows = {c: memory.experts_row("qwen3-30b-a3b", c, 16) for c in memory.EXPERTS_CONTENDERS}
    E, H, I = 128, 2048, 768
    weights_mib = E * 3 * I * H * 2 / 2**20
    assert rows["peft"].saved_mib_per_layer >= weights_mib
    assert abs(rows["lora_kernels"].saved_mib_per_layer) < 0.5 and abs(rows["frozen"].saved_mib_per_layer) < 0.5
    share = {c: rows[c].saved_kib_per_token - rows["frozen"].saved_kib_per_token for c in ("peft", "lora_kernels")}
    assert 0 < share["lora_kernels"] < share["peft"] / 2
    # x [T, H] and the down projection's input [S, I] (the factors' grads need them), xa in fp32: nothing more
    assert share["lora_kernels"] <= (H * 2 + 8 * I * 2 + 2 * 8 * 16 * 4 + 64) / 1024


def test_quick_run_writes_csv_markdown_and_plot(tmp_path):
    assert memory.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "memory.md").read_text()
    assert "| llama-3-8b | 16 | 0.05 | lora_kernels |" in text and "x smaller" in text
    assert "| qwen3-30b-a3b | peft |" in text and "LoRA's share per token" in text
    assert (tmp_path / "memory.csv").read_text().startswith("model,contender,r,dropout,saved_kib_per_token")
    assert (tmp_path / "memory.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------
# torch.compile + activation checkpointing + dropout (PEFT's issue #3020)
# ----------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = FusedLoRALinear(24, 40, r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False)
        self.down = FusedLoRALinear(40, 24, r=3, lora_alpha=6, lora_dropout=0.25, init_lora_weights=False)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x))) + x


class _Model(nn.Module):
    def __init__(self, ckpt: bool):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.ckpt = ckpt

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        return x


def _step(model, fn, x0):
    torch.manual_seed(7)  # the same dropout seeds for every run
    for p in model.parameters():
        p.grad = None
    x = x0.clone().requires_grad_()
    y = fn(x)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_checkpointing_with_dropout_recomputes_the_same_mask(backend):
    """A checkpointed block of layers with dropout, compiled: the recomputation in the backward draws the forward's
    dropout masks, so the grads are those of the run without checkpointing, bit for bit (fp32). aot_eager draws the
    seeds as eager does (equal to eager); inductor draws its own random numbers (equal to its own run without
    checkpointing)."""
    torch.manual_seed(0)
    plain, ckpt = _Model(ckpt=False), _Model(ckpt=True)
    ckpt.load_state_dict(plain.state_dict())
    x0 = torch.randn(3, 5, 24)
    if backend == "aot_eager":
        expected = _step(plain, plain, x0)
        assert all(torch.equal(a, b) for a, b in zip(expected, _step(ckpt, ckpt, x0)))  # eager checkpointing too
    else:
        expected = _step(plain, torch.compile(plain, backend=backend, fullgraph=True), x0)
    got = _step(ckpt, torch.compile(ckpt, backend=backend, fullgraph=True), x0)
    assert len(got) == 10
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    without_dropout = _Model(ckpt=False)
    without_dropout.load_state_dict(plain.state_dict())
    for layer in without_dropout.modules():
        if isinstance(layer, FusedLoRALinear):
            layer.lora_dropout = 0.0
    assert not torch.equal(_step(without_dropout, without_dropout, x0)[0], expected[0])  # dropout is on
