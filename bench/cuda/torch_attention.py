"""PyTorch's attention on the GPU, for bench/cuda/run.sh (issue 12), same sizes as bench_cuda_attention:
bf16, n=2, h=8, d=64 and d=128, full trainable bias (n, h, L, L) requiring grad:
  eager   softmax(q·kᵀ·scale + bias)·v in plain torch ops
  sdpa    scaled_dot_product_attention(attn_mask=bias) (PyTorch picks the backend; a float mask that needs
          a gradient rules out flash, so it is the memory-efficient or the math kernel)
  flex    flex_attention under torch.compile with score_mod = score + bias[b, h, q, kv]
and without bias, causal: sdpa_flash = scaled_dot_product_attention(is_causal=True) on the flash backend.
Median of CUDA-event timings (triton.testing.do_bench) on random inputs. One CSV line per case:
  torch,<impl>,<case>,<d>,<L>,<forward ms>,<forward+backward ms>,<peak bytes of the fwd+bwd step>
"""
import os
import sys

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

n, h = 2, 8
dt = torch.bfloat16
# One compiled flex_attention per (d, L, grad mode): 16 graphs, past dynamo's default recompile limit of
# 8, beyond which flex_attention silently runs unfused (the 2026-12-03b run's d=128 flex rows did).
for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, limit):
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
flex = torch.compile(flex_attention, dynamic=False)


def eager(q, k, v, b):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + b, dim=-1) @ v


def sdpa(q, k, v, b):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=b)


def flex_bias(q, k, v, b):
    def score_mod(score, bi, hi, qi, ki):
        return score + b[bi, hi, qi, ki]
    return flex(q, k, v, score_mod=score_mod)


def sdpa_flash_causal(q, k, v, b):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def documents(L):
    # Document id of each position: 4 equal documents (bench_cuda_attention's docmask case).
    return torch.arange(L, device="cuda") * 4 // L


def flex_doc(q, k, v, b):
    # flex_attention with the block mask of the 4 documents (empty 128 × 128 blocks skipped, full ones
    # run without mask_mod); the block mask is built once per L (cached), outside the timing.
    L = q.shape[-2]
    if L not in flex_doc.masks:
        doc = documents(L)
        flex_doc.masks[L] = create_block_mask(lambda bi, hi, qi, ki: doc[qi] == doc[ki], None, None, L, L, device="cuda")
    return flex(q, k, v, block_mask=flex_doc.masks[L])


flex_doc.masks = {}


def sdpa_doc(q, k, v, b):
    # The same documents as a dense boolean attn_mask (L, L): PyTorch picks the backend (not flash).
    L = q.shape[-2]
    if L not in sdpa_doc.masks:
        doc = documents(L)
        sdpa_doc.masks[L] = doc[:, None] == doc[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_doc.masks[L])


sdpa_doc.masks = {}


def measure(name, case, f, L, d, with_bias):
    g = torch.Generator(device="cuda").manual_seed(L)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt, generator=g).requires_grad_(True)
    q, k, v = mk(n, h, L, d), mk(n, h, L, d), mk(n, h, L, d)
    b = mk(n, h, L, L) if with_bias else None
    do = torch.randn(n, h, L, d, device="cuda", dtype=dt, generator=g)
    try:
        with torch.no_grad():
            fwd = do_bench(lambda: f(q, k, v, b), warmup=50, rep=300, return_mode="median")
        params = [q, k, v] + ([b] if with_bias else [])

        def step():
            out = f(q, k, v, b)
            torch.autograd.grad(out, params, do)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base + sum(p.numel() * p.element_size() for p in params) + do.numel() * 2
        both = do_bench(step, warmup=50, rep=300, return_mode="median")
        print(f"torch,{name},{case},{d},{L},{fwd:.4f},{both:.4f},{peak}", flush=True)
    except Exception as e:  # report, never hide, a failing implementation
        print(f"torch,{name},{case},{d},{L},failed,failed,0  # {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    del q, k, v, b, do
    torch.cuda.empty_cache()


if __name__ == "__main__":
    lengths = [int(x) for x in sys.argv[1:]] or [1024, 2048, 4096, 8192]
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    # BENCH_DIMS ("64,128") and BENCH_IMPLS ("eager,sdpa,flex,sdpa_flash", and the documents case's
    # "flex_doc,sdpa_doc", only when listed) narrow a run; default: the first four.
    dims = [int(x) for x in os.environ.get("BENCH_DIMS", "64,128").split(",") if x]
    impls = set(os.environ.get("BENCH_IMPLS", "eager,sdpa,flex,sdpa_flash").split(","))
    for d in dims:
        for L in lengths:
            for name, case, f, bias in (("eager", "bias", eager, True), ("sdpa", "bias", sdpa, True), ("flex", "bias", flex_bias, True),
                                        ("sdpa_flash", "causal", sdpa_flash_causal, False), ("flex_doc", "docmask", flex_doc, False),
                                        ("sdpa_doc", "docmask", sdpa_doc, False)):
                if name in impls:
                    measure(name, case, f, L, d, bias)
