"""autodiff_attention.to_dot: the autograd graph of a computation using attention(), as DOT."""
import pytest
import torch

import autodiff_attention as aa


def test_to_dot_marks_the_fused_attention_and_names_the_parameters():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.zeros(3, 6, 6, requires_grad=True)
    out = aa.attention(q, k, v, bias=bias, is_causal=True)
    loss = (out * out).mean()
    dot = aa.to_dot(loss, params={"q": q, "k": k, "v": v, "bias": bias})
    assert dot.startswith("digraph autograd {")
    assert dot.count("(fused)") == 1
    assert 'label="AttentionFunction (fused)\\n(2,3,6,4)"' in dot
    for name, shape in (("q", "(2,3,6,4)"), ("k", "(2,3,6,4)"), ("v", "(2,3,6,4)"), ("bias", "(3,6,6)")):
        assert f'label="{name}\\n{shape}"' in dot
    assert dot.count("shape=box") == 3  # mean, mul, attention
    assert dot.count(" -> ") == 4 + 2 + 1  # attention's 4 inputs, mul's two (the same output), mean's one


def test_to_dot_refuses_a_tensor_without_a_graph():
    with pytest.raises(aa.Error, match="to_dot: the tensor has no autograd graph"):
        aa.to_dot(torch.zeros(2))
