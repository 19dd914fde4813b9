#!/usr/bin/env python3
"""PyTorch eager (+ PEFT) reference for flow's training benchmark: the same Llama config,
batch, threads and optimizer, tokens/s of full finetuning and LoRA r=16 on all seven
projections. Run by hand where torch, transformers and peft are installed:

    python3 benches/train_torch.py [--threads 2] [--d 256 --layers 4 --heads 8 --seq 256 --batch 8]

Prints one JSON line per mode (tokens_per_s, median step seconds, the first step's seconds,
peak RSS MiB; on CUDA peak GPU memory and the kernels one more step launches, forward and
backward then the optimizer, counted by torch.profiler; `--kernels` adds each kernel's device
time in that step, the longest first, as flow's bench does).
`--attention ROWS,HEADS,T,HEAD_DIM` instead times one layer's causal attention by
`scaled_dot_product_attention` (forward, and forward + backward), the reference for
`cargo bench --bench train -- --attention ...`.
"""
import argparse
import json
import resource
import time

import torch
import transformers
import peft

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--d", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--vocab", type=int, default=8192)
p.add_argument("--ff", type=int, default=704)
p.add_argument("--steps", type=int, default=7)
p.add_argument("--modes", default="full,lora16")
p.add_argument("--attn", default="sdpa")
p.add_argument("--device", default="cpu")
p.add_argument("--precision", default="f32", choices=["f32", "f16", "bf16"],
               help="f32, or autocast to f16 (with GradScaler) or bf16: flow's `precision`")
p.add_argument("--checkpointing", action="store_true",
               help="activation checkpointing per decoder layer (gradient_checkpointing_enable)")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "lion"],
               help="AdamW (torch.optim), or LionW as flow's (the 7B shape's, below)")
p.add_argument("--bf16-state", action="store_true",
               help="LionW's moment stored in bf16, updated in f32 (flow's optimizer_state)")
p.add_argument("--attention", default=None, metavar="ROWS,HEADS,T,HEAD_DIM",
               help="time one layer's causal SDPA in --precision instead of training")
p.add_argument("--kernels", action="store_true",
               help="on CUDA, each kernel's device time in one step, the longest first")
p.add_argument("--config", default=None, help="tiny, small, wide, large or 7b: the configs of stages/benches/train.rs")
a = p.parse_args()
if a.config == "tiny":
    a.d, a.layers, a.heads, a.seq, a.batch, a.vocab, a.ff, a.steps = 64, 2, 4, 64, 2, 512, 176, 4
elif a.config == "small":
    a.d, a.layers, a.heads, a.seq, a.batch, a.vocab, a.ff = 256, 4, 8, 256, 8, 8192, 704
elif a.config == "large":
    a.d, a.layers, a.heads, a.seq, a.batch, a.vocab, a.ff, a.steps = 2048, 8, 16, 1024, 4, 32000, 5632, 6
elif a.config == "7b":
    a.d, a.layers, a.heads, a.seq, a.batch, a.vocab, a.ff, a.steps = 4096, 32, 32, 4096, 1, 32000, 11008, 4
elif a.config == "wide":
    a.d, a.layers, a.heads, a.seq, a.batch, a.vocab, a.ff, a.steps = 1024, 8, 16, 128, 2, 8192, 2816, 4


class LionW(torch.optim.Optimizer):
    """LionW as flow's train/optim.rs: decoupled decay, sign of the beta1 mix as the
    update, the moment then mixed with beta2; kept in `state_dtype`, computed in f32.
    torch.optim has no Lion; this is the reference for flow's 7B runs, which use it."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0, state_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for w in g["params"]:
                if w.grad is None:
                    continue
                st = self.state[w]
                if not st:
                    st["m"] = torch.zeros_like(w, dtype=self.state_dtype)
                m = st["m"].float()
                w.mul_(1 - g["lr"] * g["weight_decay"])
                w.add_(torch.lerp(w.grad, m, b1).sign_(), alpha=-g["lr"])
                st["m"].copy_(m.lerp_(w.grad, 1 - b2))


torch.set_num_threads(a.threads)
dev = torch.device(a.device)
torch.manual_seed(0)


def median_seconds(f):
    """Median of 5 runs after 3 warm-ups, as stages/benches/train.rs's."""
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        f()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if a.attention:
    rows, heads, t, hd = map(int, a.attention.split(","))
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    q, k, v, d_out = (torch.randn(rows, heads, t, hd, device=dev, dtype=dtype) for _ in range(4))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        fwd = median_seconds(lambda: sdpa(q, k, v, is_causal=True))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    both = median_seconds(lambda: torch.autograd.grad(sdpa(*leaves, is_causal=True), leaves, d_out))
    flops = 2.0 * rows * heads * t * t * hd  # causal, FlashAttention's count; backward 2.5x
    print(json.dumps({"impl": "pytorch", "bench": "attention", "device": a.device, "rows": rows,
                      "heads": heads, "t": t, "head_dim": hd, "precision": a.precision,
                      "sdpa_forward_s": round(fwd, 6), "sdpa_forward_backward_s": round(both, 6),
                      "sdpa_forward_tflops": round(flops / fwd / 1e12, 3),
                      "sdpa_forward_backward_tflops": round(3.5 * flops / both / 1e12, 3),
                      "torch": torch.__version__}))
    raise SystemExit


def kernel_table(prof, top):
    """Launches of CUDA kernels in a profile (copies and fills left out, as cubecl's launch
    count has none), and the `top` kernels by summed device time."""
    totals = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name.startswith(("Memcpy", "Memset")):
            continue
        # `Optimizer.step` is a record_function range, which the CUDA activity also reports
        # as a device event spanning the whole update: an annotation, not a kernel.
        if getattr(e, "is_user_annotation", False) or e.name.startswith("Optimizer."):
            continue
        n, us = totals.get(e.name, (0, 0.0))
        totals[e.name] = (n + 1, us + e.time_range.elapsed_us())
    launches = sum(n for n, _ in totals.values())
    longest = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return launches, sum(us for _, us in totals.values()) / 1e6, [
        {"kernel": k[:120], "launches": n, "ms": round(us / 1e3, 3)} for k, (n, us) in longest]


def profile_step(passes, update):
    """One more step under torch.profiler: kernels launched by the forward and backward
    passes, then by the optimizer (flow's bench counts the same two phases)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as p1:
        passes(sync=True)
    with torch.profiler.profile(activities=acts) as p2:
        update()
    (n1, s1, top1), (n2, s2, top2) = kernel_table(p1, 15), kernel_table(p2, 5)
    return {"forward_backward": n1, "optimizer": n2, "timing": ["device", "device"],
            "forward_backward_kernel_s": s1, "optimizer_kernel_s": s2,
            "top_forward_backward": top1 if a.kernels else None,
            "top_optimizer": top2 if a.kernels else None}


cfg = transformers.LlamaConfig(
    vocab_size=a.vocab, hidden_size=a.d, intermediate_size=a.ff, num_hidden_layers=a.layers,
    num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.seq,
    tie_word_embeddings=False, attn_implementation=a.attn,
)
ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
for mode in a.modes.split(","):
    model = transformers.LlamaForCausalLM(cfg).float().train().to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mode.startswith("lora"):
        r = int(mode[4:])
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainable = [q for q in model.parameters() if q.requires_grad]
    if a.optimizer == "lion":
        opt = LionW(trainable, lr=1e-4, state_dtype=torch.bfloat16 if a.bf16_state else torch.float32)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    half = {"f16": torch.float16, "bf16": torch.bfloat16}.get(a.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=a.precision == "f16")

    def passes(sync=False):
        with torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        if sync:  # only where the two phases are profiled apart
            torch.cuda.synchronize()

    def update():
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        passes()
        update()
        times.append(time.perf_counter() - t0)
    first = times[0]
    steady = sorted(times[2:] or times)
    med = steady[len(steady) // 2]
    kernels = profile_step(passes, update) if dev.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    print(json.dumps({"impl": "pytorch", "device": a.device, "config": a.config, "mode": mode,
                      "precision": a.precision, "checkpointing": a.checkpointing, "optimizer": a.optimizer,
                      "bf16_state": a.bf16_state, "threads": a.threads, "step_s": round(med, 4),
                      "tokens_per_s": round(a.batch * a.seq / med), "first_step_s": round(first, 3),
                      "kernels_per_step": kernels, "peak_rss_mib": round(rss),
                      "peak_gpu_mib": gpu and round(gpu), "torch": torch.__version__}))
    del model, opt
