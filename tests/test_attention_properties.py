"""Property test: random shapes, masks, windows and GQA ratios, Triton kernels vs the oracle."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_close, attention_oracle

from llm2vec_fast import flash_attn_func


@st.composite
def attention_problems(draw):
    batch = draw(st.integers(1, 2))
    seqlen = draw(st.integers(1, 48))
    heads_kv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 24, 40]))
    bits = draw(st.lists(st.booleans(), min_size=batch * seqlen, max_size=batch * seqlen))
    mask = torch.tensor(bits).view(batch, seqlen) if draw(st.booleans()) else None
    causal = draw(st.booleans())
    left = draw(st.sampled_from([-1, 0, 3, 17]))
    right = draw(st.sampled_from([-1, 0, 5]))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, seqlen, heads_kv, group, head_dim, mask, causal, (left, right), seed


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems())
def test_random_problems_match_oracle(kernel_device, problem):
    batch, seqlen, heads_kv, group, head_dim, mask, causal, window, seed = problem
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, seqlen, heads_kv * group, head_dim),) + ((batch, seqlen, heads_kv, head_dim),) * 2
    q, k, v = (torch.randn(shape, generator=generator).to(kernel_device).requires_grad_() for shape in shapes)
    device_mask = None if mask is None else mask.to(kernel_device)
    out = flash_attn_func(q, k, v, device_mask, causal=causal, window_size=window, backend="triton")
    dout = torch.randn(out.shape, generator=generator).to(kernel_device)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_oracle(*leaves, key_mask=mask, causal=causal, window_size=window)
    assert_close(out.cpu(), ref, torch.float32, "out")
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, dout.cpu().double())):
        assert_close(grad.cpu(), ref_grad, torch.float32, name)
