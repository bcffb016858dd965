#!/usr/bin/env python3
"""A PyTorch training loop through autodiff_attention.attention: multi-head self-attention with a
trainable attention bias (heads, L, L) learns to copy its input three positions back under a causal
mask (the task of examples/train_mha.cpp), with torch.optim.Adam. The fused C++ kernels compute the
attention and the gradients of q, k, v and the bias.

    pip install .  &&  python3 examples/python/train_bias.py [--steps 300] [--dot graph.dot]
"""
import argparse

import torch
import torch.nn.functional as F

import autodiff_attention as aa

SHIFT = 3


class BiasedSelfAttention(torch.nn.Module):
    def __init__(self, embed_dim, num_heads, length):
        super().__init__()
        self.h = num_heads
        self.qkv = torch.nn.Linear(embed_dim, 3 * embed_dim)
        self.out = torch.nn.Linear(embed_dim, embed_dim)
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, length, length))  # trainable, broadcast over the batch

    def forward(self, x):  # x (B, L, E) -> (B, L, E)
        b, l, e = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
        o = aa.attention(q, k, v, bias=self.bias, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, l, e))


def batch(generator, n, length, dim):
    x = torch.randn(n, length, dim, generator=generator)
    y = torch.zeros_like(x)
    y[:, SHIFT:] = x[:, :-SHIFT]
    return x, y


def train(steps=300, length=16, dim=16, heads=2, batch_size=16, seed=0, log_every=0):
    """Trains from torch.manual_seed(seed); returns the model and the loss of every step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = BiasedSelfAttention(dim, heads, length)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for step in range(steps):
        x, y = batch(g, batch_size, length, dim)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return model, losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dot", help="write the autograd graph of one step as Graphviz DOT to this file")
    a = ap.parse_args()
    model, losses = train(a.steps, log_every=25)
    model.eval()
    x, y = batch(torch.Generator().manual_seed(123), 64, 16, 16)
    with torch.no_grad():
        print(f"eval loss {F.mse_loss(model(x), y).item():.4f} (predicting zeros: {F.mse_loss(torch.zeros_like(y), y).item():.4f})")
    # Where the learnt bias points: for query 10, the key with the largest bias in each head.
    print("head-wise argmax of the bias for query 10:", model.bias[:, 10, :11].argmax(-1).tolist(), f"(the task's key: {10 - SHIFT})")
    if a.dot:
        with open(a.dot, "w") as f:
            f.write(aa.to_dot(F.mse_loss(model(x), y), params=dict(model.named_parameters())))
        print(f"wrote {a.dot}; render it with: dot -Tpng {a.dot} -o graph.png")


if __name__ == "__main__":
    main()
