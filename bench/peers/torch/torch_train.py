#!/usr/bin/env python3
"""PyTorch peer of ftn's CPU LoRA training benchmark (bench/peers, docs/PERFORMANCE.md).

A plain Llama (RMSNorm, rotate-half RoPE, GQA causal attention, SwiGLU, tied LM head) with random frozen
weights; LoRA r=16 alpha=32 (no dropout) on q,k,v,o,gate,up,down; AdamW on the adapters only; global-norm
clipping at 1.0 (as ftn's Trainer). Prints one JSON line: tokens/s over the timed steps and peak RSS.

Run it with Debian's OpenMP OpenBLAS first in the library path (the harness does):
  LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp python3 torch_train.py --shape smollm2-135m --dtype fp32
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    # dim, layers, heads, kv heads, ffn, vocab, rope theta, batch, seq
    "stories15m": dict(dim=288, layers=6, heads=6, kv=6, ffn=768, vocab=32000, theta=10000.0, batch=4, seq=256),
    "smollm2-135m": dict(dim=576, layers=30, heads=9, kv=3, ffn=1536, vocab=49152, theta=100000.0, batch=2, seq=256),
}


class LoraLinear(nn.Module):
    """y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, W frozen; PEFT's init (A kaiming-uniform(a=sqrt 5), B = 0)."""

    def __init__(self, fin, fout, r, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / math.sqrt(fin), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(r, fin))
        self.lora_B = nn.Parameter(torch.zeros(fout, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x, cos, sin):  # x (B, H, T, HS), rotate-half layout
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, c, r, alpha):
        super().__init__()
        d, hs = c["dim"], c["dim"] // c["heads"]
        self.h, self.kv, self.hs = c["heads"], c["kv"], hs
        self.attn_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
        self.q = LoraLinear(d, self.h * hs, r, alpha)
        self.k = LoraLinear(d, self.kv * hs, r, alpha)
        self.v = LoraLinear(d, self.kv * hs, r, alpha)
        self.o = LoraLinear(self.h * hs, d, r, alpha)
        self.gate = LoraLinear(d, c["ffn"], r, alpha)
        self.up = LoraLinear(d, c["ffn"], r, alpha)
        self.down = LoraLinear(c["ffn"], d, r, alpha)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        xn = self.attn_norm(x)
        q = self.q(xn).view(b, t, self.h, self.hs).transpose(1, 2)
        k = self.k(xn).view(b, t, self.kv, self.hs).transpose(1, 2)
        v = self.v(xn).view(b, t, self.kv, self.hs).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.h // self.kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hs))
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.h * self.hs)
        x = x + self.o(y)
        xn = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(xn)) * self.up(xn))


class Llama(nn.Module):
    def __init__(self, c, r, alpha):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(c["vocab"], c["dim"]) * 0.02, requires_grad=False)  # tied LM head
        self.blocks = nn.ModuleList(Block(c, r, alpha) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["dim"])
        hs = c["dim"] // c["heads"]
        inv = 1.0 / (c["theta"] ** (torch.arange(0, hs, 2).float() / hs))
        ang = torch.outer(torch.arange(c["seq"]).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.register_buffer("mask", torch.triu(torch.ones(c["seq"], c["seq"], dtype=torch.bool), 1), persistent=False)

    def forward(self, tokens, targets):
        x = F.embedding(tokens, self.embed)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin, self.mask)
        logits = F.linear(self.norm(x), self.embed)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    c = SHAPES[a.shape]
    model = Llama(c, r=16, alpha=32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, c["vocab"], (c["batch"], c["seq"] + 1), generator=g)
    inp, tgt = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(inp, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        loss = step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    ntok = c["batch"] * c["seq"] * a.steps
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(dict(peer="torch " + torch.__version__, shape=a.shape, mode=a.dtype, threads=torch.get_num_threads(),
                          batch=c["batch"], seq=c["seq"], steps=a.steps, tokens_per_s=ntok / dt, tokens_per_cpu_s=ntok / cpu, peak_rss_mb=rss_mb,
                          loss=loss, lora_params=sum(p.numel() for p in params))))


if __name__ == "__main__":
    main()
