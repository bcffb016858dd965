"""Fused CPU attention with a trainable bias for PyTorch, from the autodiff_attention C++ engine.

    from autodiff_attention import attention
    out = attention(q, k, v, bias=bias, mask=keep, is_causal=False, dropout_p=0.1)
    out.sum().backward()          # q.grad, k.grad, v.grad, bias.grad (bias.grad in the bias's own shape)

See attention() for the semantics, and README.md ("Python") for the parameter files and the graph view.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C
from ._C import Error

__all__ = ["attention", "AttentionFunction", "Error", "save_file", "load_file", "load_metadata", "to_dot"]

_OP = "autodiff_attention"


def _seed_from_torch() -> int:
    """A dropout seed drawn from torch's default CPU generator: torch.manual_seed makes runs reproducible."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # detach(): DLPack refuses tensors that require grad; it is a view, not a copy.
    # contiguous(): a copy only when the tensor is not contiguous already.
    return None if t is None else t.detach().contiguous()


@torch.library.custom_op(f"{_OP}::attention_forward", mutates_args=(), device_types="cpu")
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], is_causal: bool, dropout_p: float, scale: float,
                seed: int, keep_scores: bool, keep_mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, scores, bits = _C.attention_forward(_contiguous(q), _contiguous(k), _contiguous(v), _contiguous(bias),
                                                  _contiguous(mask), is_causal, dropout_p, scale, seed, keep_scores,
                                                  keep_mask)
    # A custom op returns tensors: an empty one stands for scores (or a dropout mask) that were not kept.
    return (out, lse, scores if scores is not None else q.new_empty(0),
            bits if bits is not None else q.new_empty(0, dtype=torch.uint64))


def _dropout_mask_shape(q, k, dropout_p: float, keep_scores: bool, keep_mask: bool) -> tuple:
    """The shape of the dropout mask attention_forward returns: (leading index·Lq, ⌈Lk/64⌉) uint64 words,
    or (0,) when it keeps none (the C++ kernels decide: kernels/attention.hpp)."""
    if not keep_mask or not _C.stores_dropout_mask(list(q.shape), list(k.shape), q.dtype == torch.float64,
                                                   dropout_p, keep_scores):
        return (0,)
    return (math.prod(q.shape[:-1]), (k.shape[-2] + 63) // 64)


@_forward_op.register_fake
def _(q, k, v, bias, mask, is_causal, dropout_p, scale, seed, keep_scores, keep_mask):
    scores = q.shape[:-1] + k.shape[-2:-1] if keep_scores else (0,)
    bits = _dropout_mask_shape(q, k, dropout_p, keep_scores, keep_mask)
    return (q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(q.shape[:-1]), q.new_empty(scores),
            q.new_empty(bits, dtype=torch.uint64))


@torch.library.custom_op(f"{_OP}::attention_backward", mutates_args=("scores",), device_types="cpu")
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], out: torch.Tensor,
                 lse: torch.Tensor, is_causal: bool, dropout_p: float, scale: float, seed: int,
                 needs: list[bool], scores: Optional[torch.Tensor],
                 keep_bits: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """With `scores` (the forward's, kept for a full trainable bias) the bias gradient is written into
    them: the returned dbias is then empty and the caller uses `scores`. With `keep_bits` (the forward's
    dropout mask) the mask is read instead of regenerated."""
    grads = _C.attention_backward(_contiguous(grad_out), _contiguous(q), _contiguous(k), _contiguous(v),
                                  _contiguous(bias), _contiguous(mask), _contiguous(out), _contiguous(lse),
                                  is_causal, dropout_p, scale, seed, needs, scores, keep_bits)
    # A custom op returns tensors: an empty one stands for a gradient that was not asked for.
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_backward_op.register_fake
def _(grad_out, q, k, v, bias, mask, out, lse, is_causal, dropout_p, scale, seed, needs, scores, keep_bits):
    shapes = (q.shape, k.shape, v.shape, bias.shape if bias is not None and scores is None else (0,))
    return tuple(q.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))


class AttentionFunction(torch.autograd.Function):
    """out = dropout(softmax(scale·q·kᵀ + bias, masked))·v, forward and backward by the fused C++ kernels.

    apply(q, k, v, bias, mask, is_causal, dropout_p, scale, seed, track) with every argument given
    (attention() fills in the defaults); track: whether the caller records a graph (its
    torch.is_grad_enabled(): inside forward grad mode is always off). The backward returns dq, dk, dv
    and dbias in the bias's own shape.

    What the forward keeps for the backward, when tracking and an input needs a gradient, as the C++
    engine does: with dropout, the mask as bits when they are cheap (always with a full trainable bias,
    else when they take at most q's bytes; otherwise the backward regenerates the same mask from (seed,
    element index)); with a trainable bias of the scores' full shape (..., Lq, Lk), outside
    torch.compile, the scores S in an L×L buffer: the first backward reads P from it (instead of
    recomputing q·kᵀ + bias) and returns the bias gradient in that same buffer; a second backward
    (retain_graph) recomputes. Under torch.compile the scores are always recomputed.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, is_causal, dropout_p, scale, seed, track):
        backward_runs = track and any(ctx.needs_input_grad[:4])
        keep = (backward_runs and bias is not None and ctx.needs_input_grad[3]
                and not torch.compiler.is_compiling()
                and tuple(bias.shape) == tuple(q.shape[:-1]) + (k.shape[-2],))
        out, lse, scores, bits = torch.ops.autodiff_attention.attention_forward(
            q, k, v, bias, mask, is_causal, dropout_p, scale, seed, keep, backward_runs)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse, bits if bits.numel() else None)
        # Not saved for backward: the backward overwrites it (with the bias gradient), once.
        ctx.scores = scores if keep else None
        ctx.options = (is_causal, dropout_p, scale, seed)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, out, lse, bits = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]] + [ctx.has_bias and bool(ctx.needs_input_grad[3])]
        if not any(needs):
            return (None,) * 10
        scores, ctx.scores = (ctx.scores if needs[3] else None), None
        dq, dk, dv, dbias = torch.ops.autodiff_attention.attention_backward(
            grad_out, q, k, v, bias, mask, out, lse, *ctx.options, needs, scores, bits)
        if scores is not None and dbias.numel() == 0 and scores.numel() != 0:
            dbias = scores
        grads = [g if need else None for g, need in zip((dq, dk, dv, dbias), needs)]
        return (*grads, None, None, None, None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, is_causal: bool = False, dropout_p: float = 0.0,
              scale: Optional[float] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Fused attention on CPU tensors, differentiable in q, k, v and bias.

    out = dropout(softmax(scale·q·kᵀ + bias, masked), dropout_p)·v

    q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev), with equal leading dimensions (rank 2 to 4);
    out (..., Lq, Ev). float32 or float64, all the same dtype, on the CPU.
    bias: a float tensor broadcastable to the scores (..., Lq, Lk), e.g. (Lq, Lk), (heads, Lq, Lk),
      (batch, 1, Lq, Lk), (1, heads, 1, Lk); trainable: its gradient comes back in its own shape.
    mask: a bool tensor broadcastable to the scores, True = keep (SDPA's boolean attn_mask).
    is_causal: key j is visible to query i iff j <= i (top-left aligned, as SDPA); combines with mask.
    dropout_p: drop probability of the attention weights (scaled by 1/(1-p)); applied whenever > 0 (as
      SDPA, which has no train/eval flag: pass 0.0 in evaluation).
    scale: of q·kᵀ; None gives 1/sqrt(E), as SDPA.
    seed: the dropout stream's Philox key. None draws one from torch's default generator, so
      torch.manual_seed(...) makes a run reproducible; the same seed gives the same mask. The backward
      applies the forward's mask (kept as bits, or regenerated from the seed).

    Semantics are those of torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias or
    mask, ...), except that a query row whose keys are all masked gives 0 (and zero gradients) where SDPA
    gives NaN, and that a float bias and a bool mask may be given together.

    Copies: none for contiguous inputs (they are read in place through DLPack, and the results are the
    kernels' own buffers handed to torch). A non-contiguous input (a transposed or expanded view, or a
    non-contiguous incoming gradient) is made contiguous once, per call. Errors (shapes, dtypes, ranks, a
    rate outside [0, 1)) raise autodiff_attention.Error (a ValueError) with the C++ message.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("attention: q, k and v must be torch tensors")
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias), ("mask", mask)):
        if t is not None and t.device.type != "cpu":
            raise Error(f"attention: {name} is on {t.device}; only CPU tensors are supported")
    if mask is not None and mask.dtype != torch.bool:
        raise Error(f"attention: mask must be a bool tensor (True = keep), got dtype {mask.dtype}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    if seed is None:
        seed = _seed_from_torch() if dropout_p > 0 else 0
    elif not 0 <= seed < 2**63:
        raise Error(f"attention: seed must be in [0, 2^63), got {seed}")
    return AttentionFunction.apply(q, k, v, bias, mask, bool(is_causal), float(dropout_p), float(scale), int(seed),
                                   torch.is_grad_enabled())


# ---- parameter files -------------------------------------------------------------------------------

def save_file(tensors: dict, path, metadata: Optional[dict] = None) -> None:
    """Writes {name: tensor} (float32 or float64 CPU tensors) as a safetensors file with the C++ writer
    (include/autodiff/io/safetensors.hpp): the format of nn::save, which safetensors.torch.load_file and
    torch read. A non-contiguous tensor is made contiguous first (a copy); others are written in place."""
    items = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise Error(f"save_safetensors: {path}: tensor '{name}' must be a CPU torch tensor")
        items.append((name, t.detach().contiguous()))
    _C.save_safetensors(str(path), items, dict(metadata or {}))


def load_file(path) -> dict:
    """Reads a safetensors file with the C++ reader, which validates everything in it (truncation, dtypes
    other than F32/F64, shapes against byte ranges, overlaps); returns {name: tensor} in file order."""
    tensors, _ = _C.load_safetensors(str(path))
    return tensors


def load_metadata(path) -> dict:
    """The file's "__metadata__" (string to string)."""
    return _C.load_safetensors(str(path))[1]


# ---- graph view ------------------------------------------------------------------------------------

def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(output: torch.Tensor, params: Optional[dict] = None) -> str:
    """The autograd graph that computed `output`, as Graphviz DOT (the Python counterpart of C++'s
    ad::to_dot): one box per backward node, with the op, the shape of the output it differentiates and
    "(fused)" for this package's attention (one node for the whole fused kernel); one ellipse per leaf
    tensor, named from `params` ({name: tensor}, e.g. dict(model.named_parameters())) when given.
    Render with `dot -Tpng graph.dot -o graph.png` (Debian's graphviz)."""
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        raise Error("to_dot: the tensor has no autograd graph (it does not require grad, or is a leaf)")
    names = {id(t): n for n, t in (params or {}).items()}
    ids, lines, stack = {}, [], []

    def node_id(fn):
        if fn not in ids:
            ids[fn] = f"n{len(ids)}"
            stack.append(fn)
        return ids[fn]

    def shape_of(fn):
        meta = getattr(fn, "_input_metadata", None)
        return "(" + ",".join(str(d) for d in meta[0].shape) + ")" if meta else "?"

    node_id(output.grad_fn)
    done = set()
    while stack:
        fn = stack.pop()
        if fn in done:
            continue
        done.add(fn)
        me = ids[fn]
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            v = fn.variable
            label = names.get(id(v), "leaf")
            shape = "(" + ",".join(str(d) for d in v.shape) + ")"
            lines.append(f'  {me} [shape=ellipse, style=filled, fillcolor="#fdd0a2", label="{_dot_escape(label)}\\n{shape}"];')
        else:
            name = fn.name()
            fused = name.startswith("AttentionFunctionBackward")
            op = name.removesuffix("Backward0").removesuffix("Backward")
            lines.append(f'  {me} [shape=box, style="rounded,filled", fillcolor="{"#9ecae1" if fused else "#f0f0f0"}", '
                         f'label="{_dot_escape(op)}{" (fused)" if fused else ""}\\n{shape_of(fn)}"];')
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is None:
                continue
            lines.append(f"  {node_id(nxt)} -> {me};")  # an input used twice gets two edges
    return "digraph autograd {\n  rankdir=BT;\n  node [fontname=\"Helvetica\", fontsize=10];\n" + "\n".join(lines) + "\n}\n"
