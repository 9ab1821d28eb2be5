#!/usr/bin/python3
"""Independent reference for one LoRA (and full-parameter) training step of a tiny Llama.

Writes tests/Fixtures/tiny_lora_step.json, read by tests/Runtime/Model/LlamaModelTests.cs.

This is its own implementation of the Llama forward pass in plain torch ops (float64): RMSNorm,
rotary embeddings (Hugging Face rotate-half, and Meta/llama2.c interleaved pairs via complex
multiplication), causal grouped-query attention with an explicit mask and softmax, SwiGLU, LoRA
y = x W^T + b + s * drop(x) A^T B^T. Gradients come from torch autograd, not from a hand-written
backward, so the C# backward is checked against something that shares none of its code.

Weights are drawn in float32 (torch.manual_seed) and stored exactly (shortest float32 repr); all
arithmetic is float64 on those values. Loss = loss_scale * sum of per-token cross-entropies over
targets != -100 (loss_scale = 1 / count, the mean); every gradient stored is of that scaled loss.

LoRA dropout uses the project's counter-based mask (src/Kernels/Common/DropoutHash.cs) and the
model's per-slot seed derivation (LlamaModel.DropoutSeedFor), re-implemented here in Python
integers: element (m, k) of slot (layer, module) is kept iff
  uniform(slot_seed, m*K + k) >= p,  slot_seed = mix64(seed ^ mix64(layer*8 + module + 1)),
and kept elements are scaled by 1 / (1 - p).

Run:  /usr/bin/python3 tests/reference/tiny_lora_step.py     (Debian python3-torch 1.13.1)
"""
import json
import math
import os

import numpy as np
import torch

torch.set_default_dtype(torch.float64)

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MASK64 = (1 << 64) - 1
IGNORE = -100


def mix64(x):
    """splitmix64 (Steele, Lea, Flood 2014), as LlamaModel.Mix64."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def hash32(seed, index):
    """DropoutHash.Hash."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z >> 32


def uniform(seed, index):
    """DropoutHash.Uniform: the top 24 bits of the hash times 2^-24 (exact in float32 and float64)."""
    return (hash32(seed, index) >> 8) * (1.0 / 16777216.0)


def slot_seed(seed, layer, module_index):
    return mix64(seed ^ mix64(layer * 8 + module_index + 1))


def dropout_mask(seed, m, k, p):
    keep = [[1.0 if uniform(seed, i * k + j) >= p else 0.0 for j in range(k)] for i in range(m)]
    return torch.tensor(keep)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_rotate_half(x, pos, theta):
    # x (B, T, H, HS); HF: channel i pairs with i + HS/2, angle pos * theta^(-2i/HS)
    hs = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hs, 2) / hs))
    ang = pos[:, None] * inv[None, :]                      # (T, HS/2)
    ang = torch.cat([ang, ang], dim=-1)[None, :, None, :]   # (1, T, 1, HS)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * torch.cos(ang) + rot * torch.sin(ang)


def rope_interleaved(x, pos, theta):
    # Meta llama / llama2.c: pairs (2i, 2i+1) as complex numbers times e^{i pos theta^(-2i/HS)}
    b, t, h, hs = x.shape
    inv = 1.0 / (theta ** (torch.arange(0, hs, 2) / hs))
    ang = pos[:, None] * inv[None, :]                      # (T, HS/2)
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    xc = torch.view_as_complex(x.reshape(b, t, h, hs // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(b, t, h, hs)


def attention(q, k, v):
    # q (B, T, NH, HS); k, v (B, T, NKV, HS); causal; head h uses kv head h // (NH/NKV)
    b, t, nh, hs = q.shape
    nkv = k.shape[2]
    k = k.repeat_interleave(nh // nkv, dim=2)
    v = v.repeat_interleave(nh // nkv, dim=2)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))       # (B, NH, T, HS)
    s = q @ k.transpose(-1, -2) / math.sqrt(hs)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, t, nh * hs)


def make_case(name, seed, cfg, lora_modules, rank, alpha, dropout, dropout_seed, batch, seq_len):
    g = torch.Generator().manual_seed(seed)
    C, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    NH, NKV, HS = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale + shift).to(torch.float32)

    w = {"model.embed_tokens.weight": rnd(V, C, scale=0.5)}
    for i in range(L):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = rnd(C, scale=0.1, shift=1.0)
        w[f"{p}.self_attn.q_proj.weight"] = rnd(NH * HS, C, scale=1 / math.sqrt(C))
        w[f"{p}.self_attn.k_proj.weight"] = rnd(NKV * HS, C, scale=1 / math.sqrt(C))
        w[f"{p}.self_attn.v_proj.weight"] = rnd(NKV * HS, C, scale=1 / math.sqrt(C))
        if cfg["attention_bias"]:
            w[f"{p}.self_attn.q_proj.bias"] = rnd(NH * HS, scale=0.1)
            w[f"{p}.self_attn.k_proj.bias"] = rnd(NKV * HS, scale=0.1)
            w[f"{p}.self_attn.v_proj.bias"] = rnd(NKV * HS, scale=0.1)
        w[f"{p}.self_attn.o_proj.weight"] = rnd(C, NH * HS, scale=1 / math.sqrt(NH * HS))
        w[f"{p}.post_attention_layernorm.weight"] = rnd(C, scale=0.1, shift=1.0)
        w[f"{p}.mlp.gate_proj.weight"] = rnd(F, C, scale=1 / math.sqrt(C))
        w[f"{p}.mlp.up_proj.weight"] = rnd(F, C, scale=1 / math.sqrt(C))
        w[f"{p}.mlp.down_proj.weight"] = rnd(C, F, scale=1 / math.sqrt(F))
    w["model.norm.weight"] = rnd(C, scale=0.1, shift=1.0)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(V, C, scale=1 / math.sqrt(C))

    def linear_path(i, m):
        return f"model.layers.{i}.{'self_attn' if m in MODULES[:4] else 'mlp'}.{m}"

    # LoRA: A and B both nonzero (B = 0, the PEFT init, would make dA identically zero and untestable).
    lw = {}
    for i in range(L):
        for m in lora_modules:
            wt = w[f"{linear_path(i, m)}.weight"]
            n_out, k_in = wt.shape
            lw[f"{linear_path(i, m)}.lora_A.weight"] = rnd(rank, k_in, scale=1 / math.sqrt(k_in))
            lw[f"{linear_path(i, m)}.lora_B.weight"] = rnd(n_out, rank, scale=0.3)

    tokens = torch.randint(0, V, (batch, seq_len), generator=g)
    targets = torch.randint(0, V, (batch, seq_len), generator=g)
    # ignored positions: a prompt-like prefix of sequence 0 and one in the middle of sequence 1
    targets[0, :2] = IGNORE
    targets[1, seq_len // 2] = IGNORE
    count = int((targets != IGNORE).sum())
    loss_scale = 1.0 / count

    params = {k: v.to(torch.float64).clone().requires_grad_(True) for k, v in w.items()}
    lparams = {k: v.to(torch.float64).clone().requires_grad_(True) for k, v in lw.items()}
    scale = alpha / rank
    M = batch * seq_len
    pos = torch.arange(seq_len, dtype=torch.float64)
    rope = rope_rotate_half if cfg["rope_layout"] == "rotate_half" else rope_interleaved
    eps = cfg["rms_norm_eps"]

    def lin(i, m, x):
        p = linear_path(i, m)
        y = x @ params[f"{p}.weight"].T
        if f"{p}.bias" in params:
            y = y + params[f"{p}.bias"]
        if m in lora_modules:
            xr = x.reshape(M, -1)
            if dropout > 0:
                mask = dropout_mask(slot_seed(dropout_seed, i, MODULES.index(m)), M, xr.shape[1], dropout)
                xr = xr * mask / (1.0 - dropout)
            u = xr @ lparams[f"{p}.lora_A.weight"].T
            y = y + scale * (u @ lparams[f"{p}.lora_B.weight"].T).reshape(y.shape)
        return y

    h = params["model.embed_tokens.weight"][tokens]            # (B, T, C)
    for i in range(L):
        p = f"model.layers.{i}"
        xn = rms_norm(h, params[f"{p}.input_layernorm.weight"], eps)
        q = rope(lin(i, "q_proj", xn).reshape(batch, seq_len, NH, HS), pos, cfg["rope_theta"])
        k = rope(lin(i, "k_proj", xn).reshape(batch, seq_len, NKV, HS), pos, cfg["rope_theta"])
        v = lin(i, "v_proj", xn).reshape(batch, seq_len, NKV, HS)
        h = h + lin(i, "o_proj", attention(q, k, v))
        xn = rms_norm(h, params[f"{p}.post_attention_layernorm.weight"], eps)
        act = torch.nn.functional.silu(lin(i, "gate_proj", xn)) * lin(i, "up_proj", xn)
        h = h + lin(i, "down_proj", act)
    h = rms_norm(h, params["model.norm.weight"], eps)
    head = params["lm_head.weight" if "lm_head.weight" in params else "model.embed_tokens.weight"]
    logits = (h @ head.T).reshape(M, V)
    token_losses = torch.nn.functional.cross_entropy(logits, targets.reshape(M), ignore_index=IGNORE, reduction="none")
    loss_sum = token_losses.sum()
    (loss_scale * loss_sum).backward()

    def t32(t):
        return {"shape": list(t.shape), "data": [F32(x) for x in t.reshape(-1).numpy()]}

    def t64(t):
        return {"shape": list(t.shape), "data": t.detach().reshape(-1).tolist()}

    return {
        "name": name,
        "config": cfg,
        "batch": batch,
        "seq_len": seq_len,
        "tokens": tokens.reshape(-1).tolist(),
        "targets": targets.reshape(-1).tolist(),
        "lora": {"modules": lora_modules, "rank": rank, "alpha": alpha, "scale": scale,
                 "dropout": dropout, "dropout_seed": dropout_seed},
        "loss_scale": loss_scale,
        "loss_sum": loss_sum.item(),
        "count": count,
        "token_losses": token_losses.detach().tolist(),
        "weights": {k: t32(v) for k, v in w.items()},
        "lora_weights": {k: t32(v) for k, v in lw.items()},
        "lora_grads": {k: t64(v.grad) for k, v in lparams.items()},
        "base_grads": {k: t64(v.grad) for k, v in params.items()},
    }


class F32:
    """A float32 value, written as its shortest float32 repr (parse it back as float32, not via double)."""

    def __init__(self, v):
        self.v = np.float32(v)


def fmt(o):
    """JSON with float32 weights as their shortest float32 repr and float64 results to 13 digits."""
    if isinstance(o, dict):
        return "{" + ",".join(json.dumps(k) + ":" + fmt(v) for k, v in o.items()) + "}"
    if isinstance(o, list):
        return "[" + ",".join(fmt(v) for v in o) + "]"
    if isinstance(o, F32):
        return np.format_float_positional(o.v, unique=True, trim="-") if o.v != 0 else "0"
    if isinstance(o, float):
        if not math.isfinite(o):
            raise ValueError("non-finite value in fixture")
        return "%.13g" % o
    return json.dumps(o)


def main():
    base = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 37, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    cases = [
        make_case("untied_bias_rotatehalf", 1234,
                  dict(base, tie_word_embeddings=False, attention_bias=True, rope_layout="rotate_half"),
                  MODULES, rank=2, alpha=4.0, dropout=0.0, dropout_seed=0, batch=2, seq_len=5),
        make_case("tied_interleaved_dropout", 5678,
                  dict(base, tie_word_embeddings=True, attention_bias=False, rope_layout="interleaved", rope_theta=500.0),
                  ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank=3, alpha=6.0, dropout=0.25,
                  dropout_seed=987654321, batch=2, seq_len=5),
    ]
    out = {
        "header": "Produced by tests/reference/tiny_lora_step.py (plain torch ops in float64, torch "
                  + torch.__version__ + ", autograd); weights are float32 values drawn with torch.manual_seed; "
                  "gradients are of loss_scale * sum(token losses), targets == -100 ignored.",
        "cases": cases,
    }
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "Fixtures", "tiny_lora_step.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(fmt(out))
        f.write("\n")
    os.replace(tmp, path)
    for c in cases:
        print(f"{c['name']}: loss_sum={c['loss_sum']:.9f} count={c['count']}")


if __name__ == "__main__":
    main()
