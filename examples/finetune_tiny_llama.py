"""Fine-tune a small Llama built from a config with fused LoRA layers, save the adapter, load it in PEFT, generate.

    python examples/finetune_tiny_llama.py [--steps 300] [--out runs/tiny-llama-adapter]

Runs on CPU in a minute or two (backend "auto": the fused Triton kernels on a GPU, the reference on CPU).
The text is a few sentences shipped here; tokens are characters, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import lora_kernels

TEXT = (
    "Low-rank adaptation freezes the pretrained weights and trains two small matrices per layer. "
    "The update is the product of the two matrices, scaled by alpha over the rank. "
    "Merging the update into the frozen weight removes any extra latency at inference time. "
    "Swapping the two small matrices switches the model from one task to another. "
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/tiny-llama-adapter")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in TEXT], device=device)
    cfg = transformers.LlamaConfig(vocab_size=len(chars), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg).to(device)

    model = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    lora_kernels.inject(model, targets, r=16, lora_alpha=32, lora_dropout=0.05, backend=args.backend)
    lora_kernels.mark_only_lora_as_trainable(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"{len(lora_kernels.lora_layers(model))} fused LoRA layers, {n_train} trainable of {n_all} parameters")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    seq, batch = 48, 8
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), device=device)
        ids = torch.stack([data[s:s + seq] for s in starts])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.1f}s)")

    lora_kernels.save_adapter(model, args.out)
    print(f"adapter saved to {args.out}")

    import peft

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), args.out).eval()
    model.eval()
    prompt = torch.tensor([[stoi[c] for c in "Merging the"]], device=device)
    gen = dict(max_new_tokens=60, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ours = model.generate(prompt, **gen)[0]
        theirs = peft_model.generate(prompt, **gen)[0]
    decode = lambda t: "".join(chars[i] for i in t.tolist())  # noqa: E731
    print(f"fused layers: {decode(ours)!r}")
    print(f"PEFT (loaded from the saved adapter): {decode(theirs)!r}")
    print("same generation" if torch.equal(ours, theirs) else "generations differ")
    return loss.item(), torch.equal(ours, theirs)


if __name__ == "__main__":
    main()
