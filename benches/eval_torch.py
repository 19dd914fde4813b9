#!/usr/bin/env python3
"""transformers reference for flow's eval benchmark (`stages/benches/generate.rs --device`):
the same Llama shape with random weights, greedy `generate` with the KV cache (batch B,
prompt P, exactly N new tokens) and log-likelihood scoring as lm-eval does it with
transformers (one forward pass over B x P tokens, log-softmax of every position). Run on the
GPU machine:

    python3 benches/eval_torch.py --device cuda --shape 4096,32,32,32,11008,32000 \
        --batch 8 --prompt 128 --new 128 [--dtype bfloat16]

Prints one JSON line: generated_tokens_per_s, scored_tokens_per_s, first_token_s and the
peak memory torch allocated.
"""
import argparse
import json
import time

import torch
import transformers

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--shape", default="256,4,8,8,704,4096", help="D,LAYERS,HEADS,KV_HEADS,FF,VOCAB")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--prompt", type=int, default=128)
p.add_argument("--new", type=int, default=128)
p.add_argument("--dtype", default="float32")
a = p.parse_args()
d, layers, heads, kv, ff, vocab = (int(v) for v in a.shape.split(","))
dtype = getattr(torch, a.dtype)
cfg = transformers.LlamaConfig(
    vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
    num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
    attn_implementation="sdpa",
)
torch.manual_seed(1)
model = transformers.LlamaForCausalLM(cfg).to(device=a.device, dtype=dtype).eval()
ids = torch.tensor(
    [[(b * 131 + i * 17) % vocab for i in range(a.prompt)] for b in range(a.batch)],
    device=a.device,
)


def sync():
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()


def gen(n):
    sync()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                   min_new_tokens=n, do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - t


def score():
    sync()
    t = time.perf_counter()
    logits = model(ids).logits.float()
    lp = torch.log_softmax(logits, -1)
    lp.gather(-1, ids[:, 1:, None].roll(1, 1)).sum().item()
    sync()
    return time.perf_counter() - t


with torch.no_grad():
    gen(2)  # warm-up
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first = gen(1)
    total = gen(a.new)
    score()
    scored = a.batch * a.prompt / score()
peak = torch.cuda.max_memory_allocated() / 2**20 if a.device.startswith("cuda") else None
print(json.dumps({
    "impl": "transformers", "device": a.device, "dtype": a.dtype, "d": d, "layers": layers,
    "heads": heads, "kv_heads": kv, "ff": ff, "vocab": vocab, "batch": a.batch,
    "prompt": a.prompt, "new": a.new, "generated_tokens_per_s": a.batch * a.new / total,
    "scored_tokens_per_s": scored, "first_token_s": first, "peak_allocated_mib": peak,
}))
