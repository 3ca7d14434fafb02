"""vlmtune's chunked gated delta rule (speed/delta_rule.py) against transformers' reference: the same outputs and
gradients, in fewer operators."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlmtune.speed.delta_rule import chunk_gated_delta_rule


def _reference():
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    bound = modeling.torch_chunk_gated_delta_rule
    return getattr(bound, "__wrapped__", bound)


def _inputs(length: int, key_heads: int, heads: int, dim: int = 16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(length + key_heads)
    q, k = (torch.randn(2, length, key_heads, dim, generator=generator) for _ in range(2))
    v = torch.randn(2, length, heads, dim, generator=generator)
    g = -torch.rand(2, length, heads, generator=generator) * 2  # log decays <= 0
    beta = torch.rand(2, length, heads, generator=generator)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)] + [g.requires_grad_(True), beta.to(dtype).requires_grad_(True)]


def _reference_call(chunk, l2norm):
    def call(q, k, v, g, beta):
        if q.shape[2] != v.shape[2]:  # transformers 5.17 repeats the key heads in the layer, 5.23 in the function
            q, k = (x.repeat_interleave(v.shape[2] // q.shape[2], dim=2) for x in (q, k))
        return _reference()(q, k, v, g=g, beta=beta, chunk_size=chunk, use_qk_l2norm_in_kernel=l2norm)[0]

    return call


@pytest.mark.parametrize(("length", "key_heads", "chunk", "l2norm"), [
    (64, 4, 64, True),  # one whole chunk
    (150, 4, 64, True),  # three, the last padded
    (300, 2, 128, True),  # key heads repeated to the value heads; the operator's chunk size
    (129, 4, 128, False),  # one token into the second chunk; no l2 norm
])
def test_same_outputs_and_gradients_as_the_reference(length, key_heads, chunk, l2norm):
    inputs = _inputs(length, key_heads, 4)
    weights = torch.randn(2, length, 4, 16)
    results = []
    for fn in (_reference_call(chunk, l2norm),
               lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, chunk, l2norm)):
        out = fn(*inputs)
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), inputs)))
    (expected, expected_grads), (out, grads) = results
    assert out.shape == (2, length, 4, 16) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_returns_the_input_dtype():
    q, k, v, g, beta = _inputs(70, 4, 4, dtype=torch.bfloat16)
    assert chunk_gated_delta_rule(q, k, v, g, beta, 64, True).dtype == torch.bfloat16


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_fewer_operators_than_the_reference():
    """What the step pays for (each operator is a dispatch and most are a kernel launch): forward and backward at
    the same chunk size, 10 chunks."""
    counts = []
    for fn in (_reference_call(64, True), lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, 64, True)):
        inputs = _inputs(640, 4, 4)
        with _Count() as count:
            fn(*inputs).sum().backward()
        counts.append(count.calls)
    reference, ours = counts
    assert ours < 0.6 * reference, counts
