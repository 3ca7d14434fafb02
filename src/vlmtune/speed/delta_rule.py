"""The chunked gated delta rule (Qwen3.5's gated DeltaNet token mixer) in PyTorch, with few operators.

The same computation as transformers' reference `torch_chunk_gated_delta_rule` (and flash-linear-attention's
`chunk_gated_delta_rule`), which `speed/opaque_delta_rule.py` runs for training where fla cannot. Per head, with
l2-normed queries q (scaled by dk^-1/2) and keys k, values v, write strengths beta and log-decays g, the sequence is
cut into chunks of c tokens; within a chunk, with G the cumulative sum of g and D[i, j] = exp(G_i - G_j) for j <= i:

    A   = I + strictly_lower((beta k) k^T * D)          (the UT transform of c delta-rule updates)
    U   = A^-1 (beta v),   W = A^-1 (beta k exp(G))     (one triangular solve for both)
    per chunk, state S (dk x dv, fp32), in order:
        V'  = U - W S
        O   = (q exp(G)) S + (q k^T * D) V'
        S   = S exp(G_last) + (k exp(G_last - G))^T V'

What differs from the reference is only how many operators it takes, which is what its step costs (its loop over
chunks issues many small kernels): the two triangular solves are one, the per-chunk slices come from one `unbind` per
tensor instead of an index per chunk and tensor, and the outputs are stacked once instead of written chunk by chunk
into a preallocated tensor. The matmuls and additions are the reference's, in the same order and dtypes, so under
autocast the state stays fp32 as there. Tested against transformers' function (tests/speed/test_delta_rule.py).
"""

from __future__ import annotations

import torch

L2NORM_EPS = 1e-6
"""As the reference's `use_qk_l2norm_in_kernel` (and fla): x / sqrt(sum(x^2) + eps)."""


def chunk_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """query, key (batch, tokens, key heads, dk); value (batch, tokens, value heads, dv); g, beta (batch, tokens,
    value heads) -> (batch, tokens, value heads, dv) in query's dtype. Key heads are repeated to the value heads."""
    dtype = query.dtype
    batch, tokens, key_heads, dk = key.shape
    heads, dv = value.shape[-2:]
    if key_heads != heads:  # each key head serves heads // key_heads consecutive value heads (repeat_interleave)
        repeat = heads // key_heads
        query, key = (x[:, :, :, None].expand(batch, tokens, key_heads, repeat, dk).reshape(batch, tokens, heads, dk)
                      for x in (query, key))
    query, key, value, g, beta = (x.transpose(1, 2).float() for x in (query, key, value, g, beta))
    if use_qk_l2norm:
        query = query * torch.rsqrt(query.square().sum(-1, keepdim=True) + L2NORM_EPS)
        key = key * torch.rsqrt(key.square().sum(-1, keepdim=True) + L2NORM_EPS)
    query = query * dk**-0.5
    pad = -tokens % chunk_size
    if pad:
        query, key, value = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    chunks = (tokens + pad) // chunk_size
    # (batch * heads, chunks, chunk_size, width)
    query, key, value = (x.reshape(batch * heads, chunks, chunk_size, -1) for x in (query, key, value))
    g, beta = (x.reshape(batch * heads, chunks, chunk_size) for x in (g, beta))

    cum = g.cumsum(-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    key_beta = key * beta[..., None]
    system = _bmm(key_beta, key.transpose(-1, -2)) * decay  # read as I + its strict lower part (unit triangular)
    rhs = torch.cat([value * beta[..., None], key_beta * cum.exp()[..., None]], dim=-1)
    new_values, key_cumdecay = torch.linalg.solve_triangular(
        system, rhs, upper=False, unitriangular=True).split([dv, dk], dim=-1)
    intra = _bmm(query, key.transpose(-1, -2)) * decay
    query = query * cum.exp()[..., None]
    key_t = (key * (cum[..., -1:] - cum).exp()[..., None]).transpose(-1, -2)
    chunk_decay = cum[..., -1].exp()[..., None, None]

    state = query.new_zeros(batch * heads, dk, dv)
    outputs = []
    for u, w, q, a, k_t, d in zip(new_values.unbind(1), key_cumdecay.unbind(1), query.unbind(1), intra.unbind(1),
                                  key_t.unbind(1), chunk_decay.unbind(1), strict=True):
        v_new = u - torch.bmm(w, state)  # bmm on 3-D slices: `@` would add expand / view operators around each
        outputs.append(torch.bmm(q, state) + torch.bmm(a, v_new))
        state = state * d + torch.bmm(k_t, v_new)
    out = torch.stack(outputs, dim=1).reshape(batch, heads, chunks * chunk_size, dv)[:, :, :tokens]
    return out.transpose(1, 2).to(dtype).contiguous()


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for (n, chunks, rows, inner) x (n, chunks, inner, cols) as one bmm over n * chunks."""
    n, chunks = a.shape[:2]
    return torch.bmm(a.reshape(n * chunks, *a.shape[2:]), b.reshape(n * chunks, *b.shape[2:])).view(
        n, chunks, a.shape[2], b.shape[3])
