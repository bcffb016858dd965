#!/usr/bin/env python3
"""PyTorch golden fixtures for tests/test_goldens.cpp.

Setup (PyTorch from PyPI, CPU is enough):

    pip install torch numpy

Regenerate (from the repository root; overwrites tests/data/*.bin, deterministic):

    python3 tools/make_goldens.py              # every case
    python3 tools/make_goldens.py mha_self     # only the named cases

Every case is written twice: <case>.f64.bin computed by torch in float64 and <case>.f32.bin
computed by torch in float32 from the same inputs rounded to float32. A file holds the case's inputs,
every parameter, the upstream gradient used (`dout`), the outputs and every gradient (`grad.<name>`).
The tests never need PyTorch: the fixtures are committed.

File format (little-endian; tests/golden.hpp reads it):

    magic    8 bytes  b"ADGOLDEN"
    version  uint32   1
    count    uint32   number of tensors
    count times:
      name_len uint32, name (UTF-8, name_len bytes)
      dtype    uint8    0 = float32, 1 = float64
      rank     uint8    0..4
      dims     rank x int64
      data     prod(dims) elements of dtype, row-major

Boolean masks are stored as 0/1 in the file's dtype, in torch's convention (1 = masked out).
"""

import math
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAGIC = b"ADGOLDEN"
VERSION = 1
DTYPE_CODES = {np.dtype("<f4"): 0, np.dtype("<f8"): 1}
DATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"

torch.use_deterministic_algorithms(True)


def write_case(path, tensors):
    """tensors: dict name -> torch tensor (float, or bool stored as 0/1 in `dtype`)."""
    out = bytearray(MAGIC)
    out += struct.pack("<II", VERSION, len(tensors))
    for name, t in tensors.items():
        a = t.detach().cpu().numpy().copy(order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        assert a.ndim <= 4, (name, a.shape)
        assert a.dtype in (np.float32, np.float64), (name, a.dtype)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        encoded = name.encode()
        out += struct.pack("<I", len(encoded)) + encoded
        out += struct.pack("<BB", DTYPE_CODES[a.dtype], a.ndim)
        out += struct.pack(f"<{a.ndim}q", *a.shape)
        out += a.tobytes(order="C")
    path.write_bytes(bytes(out))


def generator(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0):
    """float64 normal samples from the case's own generator (cast to the case dtype later)."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def as_mask(m, dtype):
    return m.to(dtype)


def causal_torch_mask(lq, lk):
    """torch boolean attn_mask, True = not allowed: key j is hidden from query i iff j > i (top-left)."""
    return torch.ones(lq, lk, dtype=torch.bool).triu(1)


# ---- a, b, f: torch.nn.MultiheadAttention -------------------------------------------------------


def make_mha(E, H, kdim, vdim, g, dtype):
    mha = torch.nn.MultiheadAttention(E, H, dropout=0.0, bias=True, batch_first=True, kdim=kdim, vdim=vdim)
    # Random values everywhere (torch initialises the biases to zero, which would hide bias bugs).
    with torch.no_grad():
        for _, p in mha.named_parameters():
            p.copy_(randn(g, *p.shape, scale=0.3))
    return mha.to(dtype)


def mha_param_names(mha):
    return [n for n, _ in mha.named_parameters()]


def mha_case(seed, dtype, B=2, Lq=5, Lk=5, E=16, H=4, kdim=None, vdim=None, self_attention=True,
             key_padding=None, causal=False, bias_shape=None):
    """Forward and backward of one MHA call; key_padding is a list of padded key counts per batch."""
    g = generator(seed)
    kd, vd = kdim or E, vdim or E
    mha = make_mha(E, H, kdim, vdim, g, dtype)
    t = {"num_heads": torch.tensor(float(H), dtype=dtype)}
    if self_attention:
        x = randn(g, B, Lq, E).to(dtype).requires_grad_()
        q = k = v = x
        t["x"] = x
    else:
        q = randn(g, B, Lq, E).to(dtype).requires_grad_()
        k = randn(g, B, Lk, kd).to(dtype).requires_grad_()
        v = randn(g, B, Lk, vd).to(dtype).requires_grad_()
        t.update(query=q, key=k, value=v)
    Lk = k.shape[1]
    for n, p in mha.named_parameters():
        t[n] = p
    kpm = None
    if key_padding is not None:
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        for b, n in enumerate(key_padding):
            if n:
                kpm[b, Lk - n:] = True  # pad at the end: every query keeps key 0, no fully masked row
        t["key_padding_mask"] = as_mask(kpm, dtype)
    attn_mask = None
    if causal:
        attn_mask = causal_torch_mask(Lq, Lk)
        t["causal_mask"] = as_mask(attn_mask, dtype)
    bias = None
    if bias_shape is not None:
        assert attn_mask is None
        bias = randn(g, *bias_shape, scale=0.5).to(dtype).requires_grad_()
        attn_mask = bias
        t["attn_bias"] = bias
    if kpm is not None and bias is not None:
        # torch wants both masks of one kind: a float key padding mask, -inf where padded.
        kpm = torch.zeros(B, Lk, dtype=dtype).masked_fill(kpm, float("-inf"))
    out, _ = mha(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    dout = randn(g, *out.shape).to(dtype)
    out.backward(dout)
    t["dout"] = dout
    t["out"] = out
    inputs = ["x"] if self_attention else ["query", "key", "value"]
    for n in inputs + ([] if bias is None else ["attn_bias"]):
        t["grad." + n] = t[n].grad
    for n, p in mha.named_parameters():
        t["grad." + n] = p.grad
    assert all(torch.isfinite(v).all() for v in t.values()), "a fully masked row would give NaN"
    return t


def training_case(seed, dtype, B=2, L=5, E=16, H=4, steps=2):
    """MHA self-attention + MSE loss, `steps` optimiser steps each with Adam(lr 1e-2) and
    SGD(lr 1e-2, momentum 0.9), both from the same initial parameters."""
    t = {"num_heads": torch.tensor(float(H), dtype=dtype)}
    g = generator(seed)
    x = randn(g, B, L, E).to(dtype)
    target = randn(g, B, L, E).to(dtype)
    init = make_mha(E, H, None, None, g, dtype)
    t["x"] = x
    t["target"] = target
    for n, p in init.named_parameters():
        t[n] = p.detach().clone()
    for opt_name, make_opt in (("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2)),
                               ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9))):
        mha = torch.nn.MultiheadAttention(E, H, dropout=0.0, bias=True, batch_first=True).to(dtype)
        mha.load_state_dict(init.state_dict())
        opt = make_opt(mha.parameters())
        for s in range(steps):
            opt.zero_grad()
            out, _ = mha(x, x, x, need_weights=False)
            loss = F.mse_loss(out, target)
            loss.backward()
            opt.step()
            t[f"{opt_name}.loss.{s}"] = loss.detach().clone()
            for n, p in mha.named_parameters():
                t[f"{opt_name}.grad.{s}.{n}"] = p.grad.detach().clone()
                t[f"{opt_name}.after.{s}.{n}"] = p.detach().clone()
    return t


# ---- c: biased attention functional ------------------------------------------------------------


def biased_attention_case(seed, dtype, bias_shape, n=2, h=3, Lq=5, Lk=7, d=6):
    """O = softmax(Q Kᵀ/√d + B) V with B broadcast to (n, h, Lq, Lk)."""
    g = generator(seed)
    t = {
        "Q": randn(g, n, h, Lq, d).to(dtype).requires_grad_(),
        "K": randn(g, n, h, Lk, d).to(dtype).requires_grad_(),
        "V": randn(g, n, h, Lk, d).to(dtype).requires_grad_(),
        "B": randn(g, *bias_shape).to(dtype).requires_grad_(),
    }
    S = t["Q"] @ t["K"].transpose(-1, -2) / math.sqrt(d) + t["B"]
    O = torch.softmax(S, dim=-1) @ t["V"]
    dO = randn(g, *O.shape).to(dtype)
    O.backward(dO)
    t["dout"] = dO
    t["out"] = O
    for k in "QKVB":
        t["grad." + k] = t[k].grad
    return t


# ---- d: softmax with masks ---------------------------------------------------------------------


def masked_softmax_case(seed, dtype, kind, n=2, h=3, Lq=5, Lk=6):
    """y = softmax(x masked) over the last dimension; no row is fully masked (torch gives NaN there)."""
    g = generator(seed)
    x = randn(g, n, h, Lq, Lk, scale=2.0).to(dtype).requires_grad_()
    t = {"x": x}
    logits = x
    masked = torch.zeros(n, h, Lq, Lk, dtype=torch.bool)
    if kind in ("causal", "causal_key_padding"):
        masked |= causal_torch_mask(Lq, Lk)
        t["causal_mask"] = as_mask(causal_torch_mask(Lq, Lk), dtype)
    if kind in ("key_padding", "causal_key_padding"):
        kpm = torch.zeros(n, Lk, dtype=torch.bool)
        kpm[0, Lk - 2:] = True
        kpm[1, 1] = True
        kpm[1, Lk - 1] = True
        masked |= kpm[:, None, None, :]
        t["key_padding_mask"] = as_mask(kpm, dtype)
    if kind == "boolean":
        # An explicit mask of shape (h, Lq, Lk), broadcast over the batch; key 0 always kept.
        m = torch.rand(h, Lq, Lk, generator=g, dtype=torch.float64) < 0.4
        m[..., 0] = False
        masked |= m
        t["mask"] = as_mask(m, dtype)
    if kind in ("causal", "key_padding", "causal_key_padding", "boolean"):
        logits = x.masked_fill(masked, float("-inf"))
    if kind == "additive":
        # A float mask of shape (Lq, Lk), broadcast over (n, h), with -inf entries (never a whole row).
        a = randn(g, Lq, Lk)
        a[torch.rand(Lq, Lk, generator=g, dtype=torch.float64) < 0.3] = float("-inf")
        a[:, 0] = 0.5
        a = a.to(dtype)
        t["additive"] = a
        logits = x + a
    y = torch.softmax(logits, dim=-1)
    dy = randn(g, *y.shape).to(dtype)
    y.backward(dy)
    t["dout"] = dy
    t["out"] = y
    t["grad.x"] = x.grad
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    return t


# ---- e: nn.Linear ------------------------------------------------------------------------------


def linear_case(seed, dtype, x_shape, out_features=4):
    g = generator(seed)
    lin = torch.nn.Linear(x_shape[-1], out_features)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(randn(g, *p.shape, scale=0.5))
    lin = lin.to(dtype)
    x = randn(g, *x_shape).to(dtype).requires_grad_()
    y = lin(x)
    dy = randn(g, *y.shape).to(dtype)
    y.backward(dy)
    return {"x": x, "weight": lin.weight, "bias": lin.bias, "dout": dy, "out": y,
            "grad.x": x.grad, "grad.weight": lin.weight.grad, "grad.bias": lin.bias.grad}


# ---- g: layer_norm, rms_norm, gelu, bias_gelu (issue 11) ---------------------------------------


def layer_norm_case(seed, dtype, x_shape, normalized_rank, weight=True, bias=True, eps=1e-5):
    """y = F.layer_norm(x, x_shape[-normalized_rank:], weight, bias, eps); `eps` and `normalized_rank` are
    stored as scalars, weight and bias only when present."""
    g = generator(seed)
    ns = tuple(x_shape[len(x_shape) - normalized_rank:])
    x = (randn(g, *x_shape, scale=2.0) + 0.5).to(dtype).requires_grad_()
    t = {"x": x, "eps": torch.tensor(eps, dtype=dtype), "normalized_rank": torch.tensor(float(normalized_rank), dtype=dtype)}
    w = (1 + randn(g, *ns, scale=0.5)).to(dtype).requires_grad_() if weight else None
    b = randn(g, *ns, scale=0.5).to(dtype).requires_grad_() if bias else None
    if w is not None:
        t["weight"] = w
    if b is not None:
        t["bias"] = b
    y = F.layer_norm(x, ns, w, b, eps)
    dy = randn(g, *y.shape).to(dtype)
    y.backward(dy)
    t.update({"dout": dy, "out": y, "grad.x": x.grad})
    if w is not None:
        t["grad.weight"] = w.grad
    if b is not None:
        t["grad.bias"] = b.grad
    return t


def rms_norm_case(seed, dtype, x_shape, normalized_rank, weight=True, eps=None):
    """y = F.rms_norm(x, normalized_shape, weight, eps); eps=None is torch.finfo(dtype).eps, and the eps
    torch used is stored."""
    g = generator(seed)
    ns = tuple(x_shape[len(x_shape) - normalized_rank:])
    x = (randn(g, *x_shape, scale=2.0) + 0.5).to(dtype).requires_grad_()
    used_eps = torch.finfo(dtype).eps if eps is None else eps
    t = {"x": x, "eps": torch.tensor(used_eps, dtype=dtype), "normalized_rank": torch.tensor(float(normalized_rank), dtype=dtype)}
    w = (1 + randn(g, *ns, scale=0.5)).to(dtype).requires_grad_() if weight else None
    if w is not None:
        t["weight"] = w
    y = F.rms_norm(x, ns, w, eps)
    dy = randn(g, *y.shape).to(dtype)
    y.backward(dy)
    t.update({"dout": dy, "out": y, "grad.x": x.grad})
    if w is not None:
        t["grad.weight"] = w.grad
    return t


def gelu_case(seed, dtype, x_shape, approximate, bias):
    """y = F.gelu(x + b, approximate) with b (n) broadcast over the rows, or F.gelu(x) without b;
    `approximate` is stored as 0 ('none') or 1 ('tanh')."""
    g = generator(seed)
    x = randn(g, *x_shape, scale=2.0).to(dtype).requires_grad_()
    t = {"x": x, "approximate": torch.tensor(float(approximate == "tanh"), dtype=dtype)}
    z = x
    if bias:
        b = randn(g, x_shape[-1]).to(dtype).requires_grad_()
        t["bias"] = b
        z = x + b
    y = F.gelu(z, approximate=approximate)
    dy = randn(g, *y.shape).to(dtype)
    y.backward(dy)
    t.update({"dout": dy, "out": y, "grad.x": x.grad})
    if bias:
        t["grad.bias"] = b.grad
    return t


# ---- h: torch.nn.TransformerEncoderLayer ----------------------------------------------------------


def encoder_layer_case(seed, dtype, norm_first, activation, batch_first, B=2, L=5, E=16, H=4, FF=24, bias_shape=None,
                       causal=False):
    """One TransformerEncoderLayer call (eval mode: no dropout), forward and backward: output, d(src),
    d(attention bias) and every parameter's gradient. `activation` is 'relu', 'gelu' or 'gelu_tanh'
    (stored as 0, 1, 2); norm_first and batch_first are stored as 0/1."""
    g = generator(seed)
    act = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[activation]
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=FF, dropout=0.0, activation=act,
                                             batch_first=batch_first, norm_first=norm_first)
    with torch.no_grad():
        for _, p in layer.named_parameters():
            p.copy_(randn(g, *p.shape, scale=0.3))
    layer = layer.to(dtype).eval()
    t = {"num_heads": torch.tensor(float(H), dtype=dtype),
         "norm_first": torch.tensor(float(norm_first), dtype=dtype),
         "batch_first": torch.tensor(float(batch_first), dtype=dtype),
         "activation": torch.tensor(float(["relu", "gelu", "gelu_tanh"].index(activation)), dtype=dtype)}
    src = randn(g, *((B, L, E) if batch_first else (L, B, E))).to(dtype).requires_grad_()
    t["src"] = src
    for n, p in layer.named_parameters():
        t[n] = p
    mask = None
    if causal:
        mask = causal_torch_mask(L, L)
        t["causal_mask"] = as_mask(mask, dtype)
    bias = None
    if bias_shape is not None:
        assert mask is None
        bias = randn(g, *bias_shape, scale=0.5).to(dtype).requires_grad_()
        mask = bias
        t["attn_bias"] = bias
    out = layer(src, src_mask=mask)
    dout = randn(g, *out.shape).to(dtype)
    out.backward(dout)
    t.update({"dout": dout, "out": out, "grad.src": src.grad})
    if bias is not None:
        t["grad.attn_bias"] = bias.grad
    for n, p in layer.named_parameters():
        t["grad." + n] = p.grad
    return t


# ---- the cases ---------------------------------------------------------------------------------

CASES = {
    # a. packed projections (kdim = vdim = E)
    "mha_self": lambda dt: mha_case(1, dt),
    "mha_self_key_padding": lambda dt: mha_case(2, dt, key_padding=[0, 2]),
    "mha_self_causal": lambda dt: mha_case(3, dt, causal=True),
    "mha_self_causal_key_padding": lambda dt: mha_case(4, dt, causal=True, key_padding=[1, 2]),
    "mha_cross": lambda dt: mha_case(5, dt, Lq=4, Lk=6, self_attention=False),
    "mha_cross_key_padding": lambda dt: mha_case(6, dt, Lq=4, Lk=6, self_attention=False, key_padding=[2, 0]),
    "mha_cross_causal_key_padding": lambda dt: mha_case(7, dt, Lq=4, Lk=6, self_attention=False, causal=True,
                                                        key_padding=[1, 2]),
    # a. separate projections (kdim, vdim != E)
    "mha_separate_proj": lambda dt: mha_case(8, dt, Lq=4, Lk=6, kdim=12, vdim=10, self_attention=False),
    "mha_separate_proj_key_padding": lambda dt: mha_case(9, dt, Lq=4, Lk=6, kdim=12, vdim=10,
                                                         self_attention=False, key_padding=[2, 1]),
    # b. trainable additive attention bias
    "mha_bias_lq_lk": lambda dt: mha_case(10, dt, Lq=4, Lk=6, self_attention=False, bias_shape=(4, 6)),
    "mha_bias_per_batch_head": lambda dt: mha_case(11, dt, Lq=4, Lk=6, self_attention=False,
                                                   bias_shape=(2 * 4, 4, 6)),
    "mha_bias_per_batch_head_key_padding": lambda dt: mha_case(12, dt, bias_shape=(2 * 4, 5, 5), key_padding=[2, 0]),
    # c. biased attention, every broadcast shape of the bias
    "attention_bias_n_h_lq_lk": lambda dt: biased_attention_case(20, dt, (2, 3, 5, 7)),
    "attention_bias_h_lq_lk": lambda dt: biased_attention_case(21, dt, (3, 5, 7)),
    "attention_bias_lq_lk": lambda dt: biased_attention_case(22, dt, (5, 7)),
    "attention_bias_n_1_lq_lk": lambda dt: biased_attention_case(23, dt, (2, 1, 5, 7)),
    "attention_bias_1_h_1_lk": lambda dt: biased_attention_case(24, dt, (1, 3, 1, 7)),
    "attention_bias_lk": lambda dt: biased_attention_case(25, dt, (7,)),
    # d. softmax with masks
    "softmax_causal": lambda dt: masked_softmax_case(30, dt, "causal"),
    "softmax_key_padding": lambda dt: masked_softmax_case(31, dt, "key_padding"),
    "softmax_causal_key_padding": lambda dt: masked_softmax_case(32, dt, "causal_key_padding"),
    "softmax_boolean": lambda dt: masked_softmax_case(33, dt, "boolean"),
    "softmax_additive": lambda dt: masked_softmax_case(34, dt, "additive"),
    # e. nn.Linear
    "linear_rank2": lambda dt: linear_case(40, dt, (5, 7)),
    "linear_rank3": lambda dt: linear_case(41, dt, (2, 3, 7)),
    # f. training steps
    "training_step": lambda dt: training_case(50, dt),
    # g. normalisation and activations of the transformer block
    "layer_norm_rank2": lambda dt: layer_norm_case(60, dt, (5, 8), 1),
    "layer_norm_rank4_two_dims": lambda dt: layer_norm_case(61, dt, (2, 3, 4, 6), 2),
    "layer_norm_rank3_all_dims": lambda dt: layer_norm_case(62, dt, (2, 3, 5), 3, eps=1e-3),
    "layer_norm_rank1_no_affine": lambda dt: layer_norm_case(63, dt, (7,), 1, weight=False, bias=False),
    "layer_norm_weight_only": lambda dt: layer_norm_case(64, dt, (2, 3, 5), 1, bias=False, eps=1e-3),
    "layer_norm_bias_only": lambda dt: layer_norm_case(65, dt, (3, 4), 1, weight=False, eps=0.1),
    "layer_norm_size1": lambda dt: layer_norm_case(66, dt, (4, 1), 1),
    "rms_norm_default_eps": lambda dt: rms_norm_case(70, dt, (2, 3, 8), 1),
    "rms_norm_two_dims_no_weight": lambda dt: rms_norm_case(71, dt, (3, 4, 5), 2, weight=False, eps=1e-6),
    "rms_norm_rank1": lambda dt: rms_norm_case(72, dt, (9,), 1, eps=0.5),
    "gelu_exact": lambda dt: gelu_case(80, dt, (4, 7), "none", bias=False),
    "gelu_tanh": lambda dt: gelu_case(81, dt, (4, 7), "tanh", bias=False),
    "bias_gelu_exact": lambda dt: gelu_case(82, dt, (2, 3, 8), "none", bias=True),
    "bias_gelu_tanh": lambda dt: gelu_case(83, dt, (2, 3, 8), "tanh", bias=True),
    # h. transformer encoder layer (eval mode), both norm placements, every activation, both layouts
    "encoder_post_norm_relu": lambda dt: encoder_layer_case(90, dt, False, "relu", False),
    "encoder_pre_norm_gelu_batch_first": lambda dt: encoder_layer_case(91, dt, True, "gelu", True),
    "encoder_post_norm_gelu_tanh_bias": lambda dt: encoder_layer_case(92, dt, False, "gelu_tanh", True,
                                                                       bias_shape=(2 * 4, 5, 5)),
    "encoder_pre_norm_relu_causal": lambda dt: encoder_layer_case(93, dt, True, "relu", False, causal=True),
}


def main():
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])  # optional case names, to regenerate only those
    unknown = only - CASES.keys()
    if unknown:
        sys.exit(f"unknown cases: {sorted(unknown)}; known: {list(CASES)}")
    total = files = 0
    for name, make in CASES.items():
        if only and name not in only:
            continue
        for suffix, dtype in (("f64", torch.float64), ("f32", torch.float32)):
            tensors = make(dtype)
            for k, v in tensors.items():
                assert v.dtype in (torch.float32, torch.float64) and v.dtype == dtype, (name, k, v.dtype)
            path = DATA_DIR / f"{name}.{suffix}.bin"
            write_case(path, tensors)
            total += path.stat().st_size
            files += 1
    print(f"wrote {files} files, {total} bytes, into {DATA_DIR}")


if __name__ == "__main__":
    main()
