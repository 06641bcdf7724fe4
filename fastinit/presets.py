"""Model presets for ``fastinit bench``, in plain torch (no downloads).

Each preset builds a real model whose constructor initializes it the way its
family does (``init_weights``): Llama (normal(0, 0.02) weights, ones for RMSNorm,
rotary frequencies as a buffer, tied embeddings), GPT-2 (normal(0, 0.02) with
residual projections scaled by 1/sqrt(2 n_layer)), and a ResNet-style conv net
(Kaiming normal, fan_out, for convolutions; BatchNorm ones and zeros).
``expected_std(name)`` says what each weight's std should be, for the
statistical check of the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaBlock(nn.Module):
    def __init__(self, d: int, ffn: int, heads: int, kv_heads: int):
        super().__init__()
        hd = d // heads
        self.q_proj = nn.Linear(d, heads * hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(heads * hd, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.input_norm = RMSNorm(d)
        self.post_norm = RMSNorm(d)
        self.heads, self.kv_heads = heads, kv_heads

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv_heads, -1).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, -1))
        h = self.post_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def _rotate(x, cos, sin):
    """Rotary position embedding (the half-split form of Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Llama(nn.Module):
    """Llama-3-style decoder: tied embeddings, rotary frequencies as a buffer."""

    def __init__(self, d: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                 rope_theta: float = 500000.0, std: float = 0.02):
        super().__init__()
        self.std = std
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, ffn, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        hd = d // heads
        self.register_buffer("inv_freq", 1.0 / (rope_theta ** (torch.arange(0, hd, 2).float() / hd)),
                             persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, tokens):
        """Logits for ``tokens`` (integer ids, ``(batch, length)``; float input, as
        ``--input-shape`` makes, is taken modulo the vocabulary)."""
        if tokens.is_floating_point():
            tokens = (tokens.abs() * 1000).long() % self.embed_tokens.num_embeddings
        x = self.embed_tokens(tokens)
        pos = torch.arange(tokens.shape[1], device=x.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def expected_std(self, name: str) -> float | None:
        return self.std if name.endswith("proj.weight") or "embed" in name else None


class GPT2Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)
        self.heads = max(1, d // 64)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, d: int, layers: int, vocab: int, positions: int, std: float = 0.02):
        super().__init__()
        self.std, self.n_layer = std, layers
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(positions, d)
        self.h = nn.ModuleList(GPT2Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # GPT-2's scaled residual init: 1/sqrt(2 * n_layer) on the residual projections.
        for block in self.h:
            for proj in (block.attn_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=self.std / math.sqrt(2 * self.n_layer))

    def forward(self, tokens):
        """Logits for ``tokens`` (ids; float input is taken modulo the vocabulary)."""
        if tokens.is_floating_point():
            tokens = (tokens.abs() * 1000).long() % self.wte.num_embeddings
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def expected_std(self, name: str) -> float | None:
        if name.endswith(("attn_proj.weight", "mlp_proj.weight")):
            return self.std / math.sqrt(2 * self.n_layer)
        if name.endswith(("c_attn.weight", "c_fc.weight")) or name.startswith(("wte", "wpe")):
            return self.std
        return None


class ConvNet(nn.Module):
    """A ResNet-50-sized stack of conv/BN stages (Kaiming normal, fan_out, ReLU)."""

    def __init__(self, widths=(256, 512, 1024, 2048), blocks=(3, 4, 6, 3), classes: int = 1000):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        cin = 64
        for w, n in zip(widths, blocks):
            for _ in range(n):
                mid = w // 4
                layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                           nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                           nn.Conv2d(mid, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def expected_std(self, name: str) -> float | None:
        mod = self.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(mod, nn.Conv2d) and name.endswith("weight"):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            return math.sqrt(2.0 / (mod.out_channels * k))
        if name == "fc.weight":
            return 0.01
        return None


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[], nn.Module]


PRESETS = {
    p.name: p
    for p in [
        Preset("llama-1b", "Llama-3.2-1B shape: hidden 2048, 16 layers, vocab 128256, tied (1.24B params)",
               lambda: Llama(2048, 16, 8192, 32, 8, 128256)),
        Preset("llama-8b", "Llama-3-8B shape: hidden 4096, 32 layers, vocab 128256 (7.5B params, tied here)",
               lambda: Llama(4096, 32, 14336, 32, 8, 128256)),
        Preset("gpt2-xl", "GPT-2 XL: hidden 1600, 48 layers, vocab 50257, 1024 positions (1.56B params)",
               lambda: GPT2(1600, 48, 50257, 1024)),
        Preset("convnet", "ResNet-50-sized conv/BatchNorm stack (25M params)", lambda: ConvNet()),
        Preset("llama-tiny", "Llama shape for tests: hidden 256, 2 layers, vocab 4096 (2.6M params)",
               lambda: Llama(256, 2, 512, 8, 4, 4096)),
    ]
}
