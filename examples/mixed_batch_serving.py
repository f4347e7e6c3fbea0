"""Three adapters on one small Llama, trained one task each, then served together in one mixed batch.

    python examples/mixed_batch_serving.py [--steps 100]

Tasks on digit sequences (nothing is downloaded): "default" continues a sequence by +1, "plus2" by +2,
"plus3" by +3 (mod 10). Each adapter is trained with the others frozen (set_adapter); then one forward serves
a batch whose rows ask for different adapters (or the base model, -1), and every row is checked against the
same row served alone by its adapter. Runs on CPU in one to two minutes (the reference backend; the Triton kernels
on a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import lora_kernels

TASKS = {"default": 1, "plus2": 2, "plus3": 3}
SEQ = 12


def batch(step: int, n: int, generator, device):
    start = torch.randint(0, 10, (n, 1), generator=generator)
    return ((start + step * torch.arange(SEQ)) % 10).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_kernels.inject(model, targets, r=8, lora_alpha=16)
    for name in list(TASKS)[1:]:
        lora_kernels.add_adapter(model, name, r=4, lora_alpha=8)
    lora_kernels.mark_only_lora_as_trainable(model)
    g = torch.Generator().manual_seed(0)

    t0 = time.time()
    for name, step in TASKS.items():
        lora_kernels.set_adapter(model, name)  # only this adapter is in the forward, so only it learns
        params = [p for n, p in model.named_parameters() if p.requires_grad and f".adapters.{name}." in n]
        opt = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(args.steps):
            ids = batch(step, 16, g, device)
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"adapter {name!r} (+{step}): loss {loss.item():.3f}")
    print(f"trained in {time.time() - t0:.0f}s")

    # one mixed batch: each row with its own adapter, -1 = the base model alone
    model.eval()
    row_adapters = ["plus3", "default", "plus2", None, "plus2", "default"]
    ids = lora_kernels.adapter_ids_for(model, row_adapters)  # the index of each row's adapter in every layer
    prompts = torch.stack([batch(TASKS.get(a, 1), 1, g, device)[0] for a in row_adapters])
    with torch.no_grad(), lora_kernels.adapter_ids(ids):
        mixed = model(prompts).logits
    agree, correct = True, 0
    for row, adapter in enumerate(row_adapters):
        with torch.no_grad():
            if adapter is None:
                with lora_kernels.adapter_ids(lora_kernels.adapter_ids_for(model, [None])):
                    alone = model(prompts[row:row + 1]).logits
            else:
                lora_kernels.set_adapter(model, adapter)
                alone = model(prompts[row:row + 1]).logits
        agree &= torch.allclose(mixed[row:row + 1], alone, rtol=1e-4, atol=1e-4)
        if adapter is not None:
            step = TASKS[adapter]
            pred = mixed[row, :-1].argmax(-1)
            correct += int((pred == (prompts[row, :-1] + step) % 10).float().mean() > 0.9)
        print(f"row {row}: adapter {adapter or 'base'}: prompt {prompts[row].tolist()[:6]} -> next "
              f"{mixed[row, :-1].argmax(-1).tolist()[:6]}")
    print(f"mixed batch rows equal their adapter alone: {agree}; rows >90% right: {correct} of "
          f"{sum(a is not None for a in row_adapters)}")
    if not agree:
        raise SystemExit("mixed batch differs from the single-adapter forwards")


if __name__ == "__main__":
    main()
