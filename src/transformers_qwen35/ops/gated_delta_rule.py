"""The gated delta rule in plain PyTorch: the exact path that runs everywhere (CPU, any GPU, export).

Per (batch, value head), with a state ``S`` of shape ``(d_k, d_v)`` in fp32::

    S   <- exp(g_t) * S
    u_t  = beta_t * (v_t - S^T k_t)
    S   <- S + k_t u_t^T
    o_t  = S^T q_t

``q`` and ``k`` are L2-normalised per head (eps 1e-6) and ``q`` is scaled by ``d_k ** -0.5`` first, as the
checkpoints were trained with. Value head ``j`` reads key head ``j // (H_v / H_k)`` (consecutive grouping).

Two algebraically identical forms:

* :func:`recurrent_gated_delta_rule` steps token by token (decode, and the test oracle);
* :func:`chunk_gated_delta_rule` works on chunks of 64 tokens. Inside a chunk, with ``G`` the running sum of ``g``,
  the pseudo-values satisfy the unit lower-triangular system ``(I + L) U = beta*V - beta*exp(G)*K S0`` where
  ``L[t, s] = beta_t exp(G_t - G_s) k_t.k_s`` for ``s < t``. Solving it once per chunk for ``beta*V`` and
  ``beta*exp(G)*K`` turns the recurrence into a few matmuls; only the state hand-over between chunks is sequential.

Packed sequences (``cu_seqlens``) are run one segment at a time from a zero state: slower than fla's varlen kernel,
never wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """Normalise, scale and group-expand to ``(B, H_v, T, d)`` fp32 tensors."""
    group = v.shape[2] // q.shape[2]
    q = l2_normalize(q.float()) * (q.shape[-1] ** -0.5)
    k = l2_normalize(k.float())
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    to_heads_first = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    return (
        to_heads_first(q),
        to_heads_first(k),
        to_heads_first(v.float()),
        g.float().transpose(1, 2).contiguous(),
        beta.float().transpose(1, 2).contiguous(),
    )


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False):
    """Token-by-token form. Shapes: q, k ``(B, T, H_k, d_k)``; v ``(B, T, H_v, d_v)``; g, beta ``(B, T, H_v)``;
    state ``(B, H_v, d_k, d_v)`` fp32. Returns ``(o (B, T, H_v, d_v) in v's dtype, final state or None)``."""
    batch, length, num_v_heads, d_v = v.shape
    q, k, v_, g, beta = _prepare(q, k, v, g, beta)
    state = (
        torch.zeros(batch, num_v_heads, q.shape[-1], d_v, dtype=torch.float32, device=v.device)
        if initial_state is None
        else initial_state.float().clone()
    )
    out = torch.empty(batch, num_v_heads, length, d_v, dtype=torch.float32, device=v.device)
    for t in range(length):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t]
        u_t = beta[:, :, t, None] * (v_[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[..., :, None] * u_t[..., None, :]
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", state, q[:, :, t])
    return out.transpose(1, 2).to(v.dtype), (state if output_final_state else None)


def _chunk_single(q, k, v, g, beta, state, chunk_size):
    """Chunked form on prepared ``(B, H, T, d)`` fp32 tensors; ``state`` is ``(B, H, d_k, d_v)`` fp32."""
    batch, heads, length, d_k = k.shape
    pad = (-length) % chunk_size
    if pad:
        # Zero keys/values with zero log-decay leave the state untouched: padding is neutral.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (length + pad) // chunk_size
    shape = lambda x: x.reshape(batch, heads, n, chunk_size, *x.shape[3:])  # noqa: E731
    q, k, v, g, beta = map(shape, (q, k, v, g, beta))

    cum_g = g.cumsum(dim=-1)  # (B, H, n, C)
    rows = torch.arange(chunk_size, device=q.device)
    causal = rows[:, None] >= rows[None, :]
    strictly_lower = rows[:, None] > rows[None, :]
    # exp(G_t - G_s) only where s <= t; the masked entries could overflow, so mask before exp.
    log_decay = cum_g[..., :, None] - cum_g[..., None, :]
    decay = torch.where(causal, log_decay, torch.full_like(log_decay, float("-inf"))).exp()

    kk = k @ k.transpose(-1, -2)
    system = torch.where(strictly_lower, beta[..., :, None] * decay * kk, torch.zeros_like(kk))
    system = system + torch.eye(chunk_size, device=q.device, dtype=system.dtype)
    rhs = torch.cat([beta[..., None] * v, (beta * cum_g.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_base, w = solved[..., : v.shape[-1]], solved[..., v.shape[-1] :]

    intra = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C), causal by construction
    q_decayed = q * cum_g.exp()[..., None]
    k_to_end = k * (cum_g[..., -1:] - cum_g).exp()[..., None]
    chunk_decay = cum_g[..., -1].exp()  # (B, H, n)

    out = torch.empty_like(v)
    for i in range(n):
        u = u_base[:, :, i] - w[:, :, i] @ state
        out[:, :, i] = q_decayed[:, :, i] @ state + intra[:, :, i] @ u
        state = state * chunk_decay[:, :, i, None, None] + k_to_end[:, :, i].transpose(-1, -2) @ u
    out = out.reshape(batch, heads, n * chunk_size, -1)[:, :, :length]
    return out, state


def chunk_gated_delta_rule(
    q, k, v, g, beta, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=CHUNK_SIZE
):
    """Chunked form, same contract as :func:`recurrent_gated_delta_rule`.

    With ``cu_seqlens`` (``(N + 1,)`` offsets, batch 1) every segment starts from a zero state (or from
    ``initial_state[n]``) and the final state has one row per segment.
    """
    batch, length, num_v_heads, d_v = v.shape
    d_k = q.shape[-1]
    qh, kh, vh, gh, bh = _prepare(q, k, v, g, beta)

    def zero_state(rows):
        return torch.zeros(rows, num_v_heads, d_k, d_v, dtype=torch.float32, device=v.device)

    if cu_seqlens is None:
        state = zero_state(batch) if initial_state is None else initial_state.float()
        out, state = _chunk_single(qh, kh, vh, gh, bh, state, chunk_size)
        return out.transpose(1, 2).to(v.dtype), (state if output_final_state else None)

    if batch != 1:
        raise ValueError(f"Packed sequences (cu_seqlens) need batch size 1, got {batch}.")
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(vh)
    finals = []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = zero_state(1) if initial_state is None else initial_state[n : n + 1].float()
        if end > start:
            piece = slice(start, end)
            out[:, :, piece], state = _chunk_single(
                qh[:, :, piece], kh[:, :, piece], vh[:, :, piece], gh[:, :, piece], bh[:, :, piece], state, chunk_size
            )
        finals.append(state)
    final = torch.cat(finals) if output_final_state else None
    return out.transpose(1, 2).to(v.dtype), final
