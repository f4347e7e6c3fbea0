"""Data-parallel LoRA fine-tuning with Hugging Face Accelerate and fused LoRA layers.

    accelerate launch --num_processes 2 examples/accelerate_finetune.py      # or:
    torchrun --nproc_per_node 2 examples/accelerate_finetune.py [--steps 100] [--out runs/accelerate-adapter]

A small Llama built from a config learns a few sentences (characters as tokens; nothing is downloaded). Runs on
CPU (gloo) or GPUs (NCCL). Accelerate wraps the model in DDP; only the LoRA parameters take part in the gradient
reduction. Every rank calls save_adapter; rank 0 writes.
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers
from accelerate import Accelerator

import lora_kernels

TEXT = ("Low-rank adaptation freezes the pretrained weights and trains two small matrices per layer. "
        "Merging the update into the frozen weight removes any extra latency at inference time. ")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/accelerate-adapter")
    args = parser.parse_args(argv)
    # one GPU per process, or all on CPU (gloo) when there are fewer GPUs than processes
    accelerator = Accelerator(cpu=torch.cuda.device_count() < int(os.environ.get("WORLD_SIZE", "1")))
    torch.manual_seed(0)  # the same base model and LoRA init on every rank
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    cfg = transformers.LlamaConfig(vocab_size=len(chars), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    lora_kernels.inject(model, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"], r=16, lora_alpha=32)
    lora_kernels.mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model, opt = accelerator.prepare(model, opt)
    g = torch.Generator().manual_seed(1000 + accelerator.process_index)  # each rank its own micro-batches
    seq, batch = 48, 8
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        ids = torch.stack([data[s:s + seq] for s in starts]).to(accelerator.device)
        loss = model(ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            mean = accelerator.reduce(loss.detach(), reduction="mean")
            accelerator.print(f"step {step:4d}  loss {mean.item():.3f}  ({accelerator.num_processes} processes)")
    lora_kernels.save_adapter(accelerator.unwrap_model(model), args.out)
    accelerator.print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
