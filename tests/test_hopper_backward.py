"""Our replacement for fla's refused backward piece (``hopper_backward.chunk_bwd_dqkwg``) against autograd, in
float64, through a direct transcription of the chunk's forward: outputs and the state leaving it as functions of
q, k, v_new, the gate and the state entering it. The whole backward on the GPU is in tests/gpu."""

from __future__ import annotations

import math

import pytest
import torch

from transformers_qwen35.kernels.hopper_backward import chunk_bwd_dqkwg


def _chunks(lengths, chunk_size):
    """(sequence start, chunk start, chunk end) in fla's chunk order."""
    out, start = [], 0
    for length in lengths:
        for chunk_start in range(start, start + length, chunk_size):
            out.append((chunk_start, min(chunk_start + chunk_size, start + length)))
        start += length
    return out


def _reference(q, k, v, g, h, do, dh, scale, chunks, state_v_first):
    """Gradients of sum <do, o> + sum <dh, S_next> over chunks, by autograd. Tensors flat over tokens: q, k
    (N, H, K); v, do (N, HV, V); g (N, HV) chunk-local cumulative log2 gate; h, dh (chunks, HV, K, V) or (…, V, K)."""
    q, k, v, g = (x.detach().clone().requires_grad_() for x in (q, k, v, g))
    groups = v.shape[1] // q.shape[1]
    loss = 0.0
    for index, (start, end) in enumerate(chunks):
        state, state_grad = h[index], dh[index]
        if state_v_first:
            state, state_grad = state.transpose(-1, -2), state_grad.transpose(-1, -2)
        qc = q[start:end].repeat_interleave(groups, 1).transpose(0, 1)  # (HV, n, K)
        kc = k[start:end].repeat_interleave(groups, 1).transpose(0, 1)
        vc, gc = v[start:end].transpose(0, 1), g[start:end].transpose(0, 1)  # (HV, n, V), (HV, n)
        n = end - start
        decay = torch.exp2(gc[:, :, None] - gc[:, None, :]) * torch.ones(n, n, dtype=q.dtype).tril()
        attention = (qc @ kc.transpose(-1, -2)) * decay * scale
        out = scale * torch.exp2(gc)[..., None] * (qc @ state) + attention @ vc
        leaving = torch.exp2(gc[:, -1])[:, None, None] * state
        leaving = leaving + (kc * torch.exp2(gc[:, -1:] - gc)[..., None]).transpose(-1, -2) @ vc
        loss = loss + (out * do[start:end].transpose(0, 1)).sum() + (leaving * state_grad).sum()
    loss.backward()
    return q.grad, k.grad, g.grad / math.log(2)  # fla's dg is taken with respect to the natural-log gate


def _inputs(batch, length, heads, value_heads, key_dim, value_dim, chunks, chunk_size, state_v_first, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k = randn(batch, length, heads, key_dim) * 0.3, randn(batch, length, heads, key_dim) * 0.3
    v, do, dv = (randn(batch, length, value_heads, value_dim) for _ in range(3))
    w = randn(batch, length, value_heads, key_dim)
    # Chunk-local cumulative gate, as fla's forward leaves it: a running sum of negative steps restarting per chunk.
    steps = -torch.rand(batch * length, value_heads, generator=generator, dtype=torch.float64) * 0.5
    g = torch.empty_like(steps)
    for start, end in chunks:
        g[start:end] = steps[start:end].cumsum(0)
    state_shape = (value_dim, key_dim) if state_v_first else (key_dim, value_dim)
    h, dh = randn(len(chunks), value_heads, *state_shape), randn(len(chunks), value_heads, *state_shape)
    return q, k, v, do, dv, w, g.reshape(batch, length, value_heads), h, dh


@pytest.mark.parametrize(
    "batch, lengths, heads, value_heads, chunk_size, state_v_first, varlen, pass_indices",
    [
        (2, [100], 2, 4, 32, False, False, False),  # two rows, a partial last chunk, grouped value heads
        (2, [96], 2, 2, 32, True, False, False),  # two rows of whole chunks: the layout is a reshape
        (1, [37, 63, 30], 2, 2, 32, True, True, False),  # packed sequences, chunks found from cu_seqlens
        (1, [64, 1, 70], 1, 3, 64, False, True, True),  # a one-token sequence; fla's chunk_indices given
    ],
)
def test_matches_autograd_of_the_chunk_forward(
    batch, lengths, heads, value_heads, chunk_size, state_v_first, varlen, pass_indices
):
    length = sum(lengths)
    if varlen:
        chunks = _chunks(lengths, chunk_size)
    else:
        chunks = [
            (row * length + s, row * length + e) for row in range(batch) for s, e in _chunks([length], chunk_size)
        ]
    q, k, v, do, dv, w, g, h, dh = _inputs(batch, length, heads, value_heads, 16, 8, chunks, chunk_size,
                                           state_v_first, seed=len(chunks))  # fmt: skip
    cu_seqlens = chunk_indices = None
    if varlen:
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
        if pass_indices:
            chunk_indices = torch.tensor(
                [(n, c) for n, size in enumerate(lengths) for c in range(-(-size // chunk_size))]
            )
    scale = 16**-0.5
    dq, dk, dw, dg = chunk_bwd_dqkwg(
        q=q, k=k, v=v, w=w, g=g, h=h, dv=dv, do=do, dh=dh, scale=scale, cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices, state_v_first=state_v_first, chunk_size=chunk_size,
    )  # fmt: skip
    flat = lambda x: x.reshape(batch * length, *x.shape[2:])  # noqa: E731
    expected_dq, expected_dk, expected_dg = _reference(
        flat(q), flat(k), flat(v), flat(g), h, flat(do), dh, scale, chunks, state_v_first
    )
    for got, expected in ((dq, expected_dq), (dk, expected_dk), (dg, expected_dg)):
        got = flat(got).double()
        assert got.shape == expected.shape
        assert (got - expected).norm() / expected.norm() < 1e-5
    # dw = -dv Sᵀ with the chunk's entering state, row by row.
    for index, (start, end) in enumerate(chunks):
        state = h[index].transpose(-1, -2) if state_v_first else h[index]
        expected_dw = -(flat(dv)[start:end].transpose(0, 1) @ state.transpose(-1, -2)).transpose(0, 1)
        assert torch.allclose(flat(dw)[start:end], expected_dw, rtol=1e-5, atol=1e-5)
    assert dg.dtype == torch.float32 and dq.shape == q.shape and dk.shape == k.shape and dw.shape == w.shape


def test_refuses_the_ungated_case():
    x = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="gated case only"):
        chunk_bwd_dqkwg(x, x, x, x, torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
