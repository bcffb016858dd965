"""autodiff_attention.attention against torch.nn.functional.scaled_dot_product_attention (eager).

Tolerances: float64 1e-10 absolute on O(1) values (both sides are exact up to rounding, ~1e-15);
float32 1e-5 relative to the largest magnitude of the float64 reference (one rounding per op).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import autodiff_attention as aa
from autodiff_attention import attention

N, H, LQ, LK, E, EV = 2, 3, 7, 9, 8, 5


def make(shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad)


def qkv(dtype=torch.float64, lq=LQ, lk=LK, lead=(N, H)):
    return make((*lead, lq, E), dtype, 1), make((*lead, lk, E), dtype, 2), make((*lead, lk, EV), dtype, 3)


def grads(out, inputs, seed=9):
    g = make(out.shape, out.dtype, seed, grad=False)
    return torch.autograd.grad(out, inputs, g)


def sdpa(q, k, v, bias=None, mask=None, is_causal=False, scale=None):
    """SDPA with our conventions: a float bias and a bool keep-mask may come together."""
    attn_mask = bias
    if mask is not None or (is_causal and bias is not None):
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
        if is_causal:
            keep = keep.tril()
        if mask is not None:
            keep = keep & mask
        additive = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, -math.inf)
        attn_mask = additive if bias is None else bias + additive
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


BIAS_SHAPES = [(LQ, LK), (H, LQ, LK), (N, H, LQ, LK), (N, 1, LQ, LK), (1, H, 1, LK), (LK,), (N, 1, 1, 1), (1, 1)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
def test_float64_output_and_gradients_match_sdpa_for_every_bias_shape(bias_shape):
    q, k, v = qkv()
    bias = make(bias_shape, seed=4)
    out = attention(q, k, v, bias=bias)
    ref = sdpa(q, k, v, bias=bias)
    assert_close(out, ref, 1e-10, "out")
    for name, a, e in zip("q k v bias".split(), grads(out, (q, k, v, bias)), grads(ref, (q, k, v, bias))):
        assert a.shape == e.shape, name
        assert_close(a, e, 1e-10, f"d{name}")


@pytest.mark.parametrize("bias_shape", [(LQ, LK), (N, H, LQ, LK), (1, H, 1, LK)], ids=str)
def test_float32_matches_a_float64_reference(bias_shape):
    q, k, v = qkv(torch.float32)
    bias = make(bias_shape, torch.float32, seed=4)
    out = attention(q, k, v, bias=bias)
    assert out.dtype == torch.float32
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = sdpa(*inputs64[:3], bias=inputs64[3])
    assert_close(out, ref, 1e-5, "out")
    g = make(out.shape, torch.float64, 9, grad=False)
    ours = torch.autograd.grad(out, (q, k, v, bias), g.float())
    theirs = torch.autograd.grad(ref, inputs64, g)
    for name, a, e in zip("q k v bias".split(), ours, theirs):
        assert a.dtype == torch.float32
        assert_close(a, e, 1e-5, f"d{name}")


@pytest.mark.parametrize("lead", [(), (H,), (N, H)], ids=["rank2", "rank3", "rank4"])
def test_ranks_two_to_four(lead):
    q, k, v = qkv(lead=lead)
    out = attention(q, k, v)
    ref = sdpa(q, k, v)
    assert_close(out, ref, 1e-10, "out")
    for a, e in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, e, 1e-10, "grad")


@pytest.mark.parametrize("mask_shape", [(LQ, LK), (N, 1, 1, LK), (N, H, LQ, LK)], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_masks_and_causal(mask_shape, is_causal, with_bias):
    # Lq < Lk so that causal is top-left aligned and no row loses all its keys.
    q, k, v = qkv()
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(mask_shape, generator=g) > 0.3
    mask[..., 0] = True  # every row keeps key 0: no fully masked row here
    bias = make((H, LQ, LK), seed=6) if with_bias else None
    inputs = (q, k, v) + ((bias,) if with_bias else ())
    out = attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
    ref = sdpa(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
    assert_close(out, ref, 1e-10, "out")
    for a, e in zip(grads(out, inputs), grads(ref, inputs)):
        assert_close(a, e, 1e-10, "grad")


def test_causal_alone_is_sdpas_is_causal_also_when_lq_differs_from_lk():
    for lq, lk in ((LQ, LK), (LK, LQ), (LQ, LQ)):
        q, k, v = qkv(lq=lq, lk=lk)
        out = attention(q, k, v, is_causal=lq <= lk)  # lq > lk: SDPA's causal masks whole rows (NaN)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=lq <= lk)
        assert_close(out, ref, 1e-10, f"out {lq}x{lk}")


def test_fully_masked_rows_give_zero_output_and_zero_gradient():
    q, k, v = qkv()
    bias = make((N, H, LQ, LK), seed=4)
    mask = torch.ones(LQ, LK, dtype=torch.bool)
    mask[2] = False  # query 2 sees no key
    out = attention(q, k, v, bias=bias, mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    # torch >= 2.5's SDPA gives 0 there too (its "safe softmax"); a plain softmax, and older SDPA, give NaN.
    ref = sdpa(q, k, v, bias=bias, mask=mask)
    keep_rows = [i for i in range(LQ) if i != 2]
    assert_close(out[:, :, keep_rows], ref[:, :, keep_rows], 1e-10, "kept rows")
    dq, dk, dv, dbias = grads(out, (q, k, v, bias))
    assert torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))
    assert torch.equal(dbias[:, :, 2], torch.zeros_like(dbias[:, :, 2]))
    # The other rows' gradients equal SDPA's on the problem without row 2.
    g = make(out.shape, seed=9, grad=False)
    g[:, :, 2] = 0
    ref_rows = sdpa(q[:, :, keep_rows], k, v, bias=bias[:, :, keep_rows], mask=mask[keep_rows])
    rq, rk, rv, rb = torch.autograd.grad(ref_rows, (q, k, v, bias), g[:, :, keep_rows])
    for a, e in ((dq, rq), (dk, rk), (dv, rv), (dbias, rb)):
        assert_close(a, e, 1e-10, "grad")


def test_a_full_trainable_bias_keeps_the_scores_and_a_second_backward_recomputes_them():
    # The first backward reads the kept scores and returns dbias in their buffer; retain_graph's second
    # backward must give the same gradients by recomputing.
    q, k, v = qkv()
    bias = make((N, H, LQ, LK), seed=4)
    mask = torch.rand(LQ, LK, generator=torch.Generator().manual_seed(5)) > 0.2
    mask[:, 0] = True
    out = attention(q, k, v, bias=bias, mask=mask, is_causal=True, dropout_p=0.2, seed=4)
    assert out.grad_fn.scores is not None and out.grad_fn.saved_tensors[-1] is not None  # scores and dropout bits kept
    g = make(out.shape, seed=9, grad=False)
    first = torch.autograd.grad(out, (q, k, v, bias), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v, bias), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    weights = dropped_weights(q, k, 0.2, 4, bias=bias, mask=mask, is_causal=True)
    (dv,) = torch.autograd.grad(weights @ v, (v,), g)
    assert_close(first[2], dv, 1e-10, "dv")


def test_the_kept_dropout_mask_gives_the_regenerated_masks_gradients_and_no_grad_keeps_nothing():
    q, k, v = qkv()
    bias = make((H, LQ, LK), seed=4)
    args = (q, k, v, bias, None, False, 0.3, 0.5, 11)
    kept = aa.AttentionFunction.apply(*args, True)
    assert kept.grad_fn.saved_tensors[-1] is not None and kept.grad_fn.scores is None  # bits; a broadcast bias keeps no scores
    # track=False (the caller's grad mode was off): nothing is kept and the backward regenerates the mask.
    regenerated = aa.AttentionFunction.apply(*args, False)
    assert regenerated.grad_fn.saved_tensors[-1] is None
    assert torch.equal(kept, regenerated)
    g = make(kept.shape, seed=9, grad=False)
    for a, b in zip(torch.autograd.grad(kept, (q, k, v, bias), g), torch.autograd.grad(regenerated, (q, k, v, bias), g)):
        assert torch.equal(a, b)


def test_scale_argument():
    q, k, v = qkv()
    out = attention(q, k, v, scale=0.3)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), 1e-10, "out")


def test_only_the_gradients_asked_for_are_computed():
    q, k, v = qkv()
    q.requires_grad_(False)
    v.requires_grad_(False)
    bias = make((H, LQ, LK), seed=4)
    out = attention(q, k, v, bias=bias)
    dk, dbias = grads(out, (k, bias))
    rk, rbias = grads(sdpa(q, k, v, bias=bias), (k, bias))
    assert_close(dk, rk, 1e-10, "dk")
    assert_close(dbias, rbias, 1e-10, "dbias")
    out = attention(q.detach(), k.detach(), v.detach())
    assert not out.requires_grad


def test_non_contiguous_inputs_are_made_contiguous():
    q, k, v = qkv()
    qt = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()  # same values, other strides
    assert not qt.is_contiguous()
    bias = make((LK,), seed=4).expand(LQ, LK)  # stride 0
    out = attention(qt, k, v, bias=bias)
    ref = sdpa(q, k, v, bias=bias)
    assert_close(out, ref, 1e-10, "out")
    for a, e in zip(grads(out, (qt, k, v)), grads(ref, (q, k, v))):
        assert_close(a, e, 1e-10, "grad")


def test_the_native_function_reads_inputs_in_place_and_refuses_strided_ones():
    # No silent copy inside the extension: a non-contiguous tensor is an error there (attention() makes it
    # contiguous before), and results are the kernels' buffers, alive as long as torch holds them.
    q, k, v = (t.detach() for t in qkv())
    with pytest.raises(aa.Error, match=r"attention: q \(2,3,8,7\) is not contiguous"):
        aa._C.attention_forward(q.transpose(-1, -2), k, v, None, None, False, 0.0, 1.0, 0)
    out, lse, scores, bits = aa._C.attention_forward(q, k, v, None, None, False, 0.0, 1.0, 0)
    assert scores is None and bits is None
    assert out.is_contiguous() and out.shape == (N, H, LQ, EV) and lse.shape == (N, H, LQ)
    expected = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    del q, k, v
    assert_close(out, expected, 1e-10, "out")
    out.add_(1.0)  # writable, owned by torch now
    assert_close(out, expected + 1.0, 1e-10, "out + 1")


def test_a_dropout_mask_of_the_wrong_dtype_or_shape_is_refused():
    q, k, v = (t.detach() for t in qkv())
    out, lse, _, bits = aa._C.attention_forward(q, k, v, None, None, False, 0.1, 0.5, 3, False, True)
    assert bits.dtype == torch.uint64 and bits.shape == (N * H * LQ, 1)
    args = (torch.ones_like(out), q, k, v, None, None, out, lse, False, 0.1, 0.5, 3, [True, True, True, False], None)
    with pytest.raises(aa.Error, match=r"attention: keep_bits must be uint64 \(the forward's dropout mask\), got \(DLPack"):
        aa._C.attention_backward(*args, bits.view(torch.int64))
    with pytest.raises(aa.Error, match=r"saved dropout mask \(41,1\) must have the shape \(42,1\)"):
        aa._C.attention_backward(*args, bits[:-1])


def test_gradcheck_float64_with_bias_mask_causal_and_dropout():
    q, k, v = qkv(lq=5, lk=6)
    bias = make((H, 5, 6), seed=4)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1, 3] = False
    f = lambda q, k, v, b: attention(q, k, v, bias=b, mask=mask, is_causal=True, dropout_p=0.25, seed=11)
    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


def dropped_weights(q, k, p, seed, **kw):
    """The attention weights after dropout: attention with v = identity returns them."""
    eye = torch.eye(k.shape[-2], dtype=q.dtype).expand(*k.shape[:-1], k.shape[-2])
    kw = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    return attention(q.detach(), k.detach(), eye, dropout_p=p, seed=seed, **kw)


def test_dropout_statistics_and_scaling():
    p = 0.3
    q, k, _ = (t.detach() for t in qkv(lq=64, lk=64))
    weights = dropped_weights(q, k, 0.0, 0)
    dropped = dropped_weights(q, k, p, 123)
    kept = dropped != 0
    # Kept entries are scaled by 1/(1-p) exactly (up to rounding); dropped ones are 0.
    assert_close(dropped[kept], weights[kept] / (1 - p), 1e-12, "kept entries")
    n = weights.numel()
    frac = 1 - kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 5 * sigma, f"dropped fraction {frac:.4f}, expected {p} +- {5 * sigma:.4f}"
    # Decisions are independent of position: both halves of the keys drop at the rate p.
    for half in (kept[..., :32], kept[..., 32:]):
        assert abs(1 - half.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / half.numel())


def test_dropout_seed_reproducibility():
    q, k, v = (t.detach() for t in qkv())
    a = attention(q, k, v, dropout_p=0.5, seed=7)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=7))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=8))
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.5)
    c = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.5))
    assert not torch.equal(b, c)


def test_dropout_backward_uses_the_forwards_mask():
    # O = dropout(P)·V, so dV = dropout(P)ᵀ·dO with the very mask the forward drew.
    p, seed = 0.4, 99
    q, k, v = qkv()
    weights = dropped_weights(q, k, p, seed)
    out = attention(q, k, v, dropout_p=p, seed=seed)
    assert_close(out, weights @ v, 1e-10, "out")
    g = make(out.shape, seed=9, grad=False)
    (dv,) = torch.autograd.grad(out, (v,), g)
    assert_close(dv, weights.transpose(-1, -2) @ g, 1e-10, "dv")


def test_torch_compile_runs_the_custom_op():
    q, k, v = qkv(torch.float32)
    bias = make((H, LQ, LK), torch.float32, seed=4)

    def f(q, k, v, bias):
        return (attention(q, k, v, bias=bias, is_causal=True) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, bias)
    got = torch.autograd.grad(loss, (q, k, v, bias))
    expected_loss = f(q, k, v, bias)
    expected = torch.autograd.grad(expected_loss, (q, k, v, bias))
    assert torch.allclose(loss, expected_loss, rtol=1e-6, atol=0)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


def test_opcheck_of_the_custom_ops():
    q, k, v = (t.detach() for t in qkv())
    bias = make((H, LQ, LK), seed=4, grad=False)
    mask = torch.ones(LQ, LK, dtype=torch.bool)
    for keep_mask in (False, True):
        args = (q, k, v, bias, mask, True, 0.1, 0.5, 3, False, keep_mask)
        torch.library.opcheck(torch.ops.autodiff_attention.attention_forward, args)
        out, lse, _, bits = torch.ops.autodiff_attention.attention_forward(*args)
        assert bits.shape == ((N * H * LQ, 1) if keep_mask else (0,))
        torch.library.opcheck(torch.ops.autodiff_attention.attention_backward,
                              (torch.ones_like(out), q, k, v, bias, mask, out, lse, True, 0.1, 0.5, 3, [True, False, True, True],
                               None, bits if keep_mask else None))
    full = make((N, H, LQ, LK), seed=5, grad=False)
    args = (q, k, v, full, mask, True, 0.1, 0.5, 3, True, True)
    torch.library.opcheck(torch.ops.autodiff_attention.attention_forward, args)
    out, lse, scores, bits = torch.ops.autodiff_attention.attention_forward(*args)
    assert scores.shape == (N, H, LQ, LK) and bits.shape == (N * H * LQ, 1)
    torch.library.opcheck(torch.ops.autodiff_attention.attention_backward,
                          (torch.ones_like(out), q, k, v, full, mask, out, lse, True, 0.1, 0.5, 3, [True, True, True, True], scores,
                           bits))


@pytest.mark.parametrize("case, message", [
    (lambda q, k, v: attention(q, k[..., :4], v), r"attention: q \(2,3,7,8\) and k \(2,3,9,4\) must have the same head dimension"),
    (lambda q, k, v: attention(q, k, v[:, :, :4]), r"attention: .*k \(2,3,9,8\).*v \(2,3,4,5\)"),
    (lambda q, k, v: attention(q, k, v, bias=torch.zeros(4, LQ, LK, dtype=torch.float64)), r"attention: .*bias \(4,7,9\)"),
    (lambda q, k, v: attention(q, k, v, bias=torch.zeros(LQ, LK)), r"attention: bias has dtype float32 but q has float64"),
    (lambda q, k, v: attention(q.half(), k.half(), v.half()), r"attention: q must be float32 or float64, got \(DLPack"),
    (lambda q, k, v: attention(q, k, v, mask=torch.ones(LQ, LK)), r"attention: mask must be a bool tensor"),
    (lambda q, k, v: attention(q, k, v, mask=torch.ones(LQ, 3, dtype=torch.bool)), r"attention: .*mask.*\(7,3\)"),
    (lambda q, k, v: attention(q, k, v, dropout_p=1.0, seed=1), r"attention: rate must be in \[0, 1\), got 1"),
    (lambda q, k, v: attention(q, k, v, dropout_p=-0.1, seed=1), r"attention: rate must be in \[0, 1\), got -0.1"),
    (lambda q, k, v: attention(q, k, v, scale=math.nan), r"attention: scale must be finite, got nan"),
    (lambda q, k, v: attention(q[None], k[None], v[None]), r"attention: q has rank 5 \(1,2,3,7,8\); at most 4"),
    (lambda q, k, v: attention(q, k, v, seed=-1), r"attention: seed must be in \[0, 2\^63\), got -1"),
], ids=["head_dim", "k_v_length", "bias_shape", "bias_dtype", "float16", "float_mask", "mask_shape", "rate_1",
        "rate_negative", "scale_nan", "rank5", "seed"])
def test_bad_inputs_raise_the_cpp_message(case, message):
    q, k, v = qkv()
    with pytest.raises(aa.Error, match=message):
        case(q, k, v)


def test_error_is_a_value_error_and_leaves_no_state_behind():
    assert issubclass(aa.Error, ValueError)
    q, k, v = qkv()
    with pytest.raises(ValueError):
        attention(q, k[..., :4], v)
    assert_close(attention(q, k, v), sdpa(q, k, v), 1e-10, "out after an error")
