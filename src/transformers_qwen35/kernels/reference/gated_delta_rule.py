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
* :func:`chunk_gated_delta_rule` works on chunks of ``CHUNK_SIZE`` tokens. Inside a chunk, with ``G`` the running sum
  of ``g`` and ``D[t, s] = exp(G_t - G_s)`` for ``s <= t`` (0 above the diagonal), the pseudo-values satisfy the unit
  lower-triangular system ``(I + L) U = beta*V - beta*exp(G)*K S0`` where ``L[t, s] = beta_t D[t, s] k_t.k_s`` for
  ``s < t``. As ``L = E M E^-1`` with ``E = diag(exp(G))`` and ``M[t, s] = beta_t k_t.k_s``, ``(I + L)^-1`` is
  ``D * (I + M)^-1`` elementwise and ``(I + L)^-1 E = E (I + M)^-1``. Inference inverts the decay-free ``I + M`` once
  per chunk (a small triangular solve) and goes on with matmuls; under autograd ``U``'s part is solved against the
  decayed system as built-in transformers does, which keeps the gradients within rounding of built-in's. Either way
  only the state hand-over between chunks is sequential.

Decay factors below ``exp(NEGLIGIBLE_LOG_DECAY)`` (about 1e-26, some 19 orders of magnitude under fp32 resolution next
to the undecayed terms they are summed with) are taken as exactly 0 in the chunked form. Left alone, fast-decaying
heads underflow them into subnormal numbers, on which x86 CPUs take a microcode assist per operation: that made
prefill two to three times slower. Otherwise the forms differ only by the order of the floating-point operations.

Packed sequences (``cu_seqlens``) are run one segment at a time from a zero state: slower than fla's varlen kernel,
never wrong.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
NEGLIGIBLE_LOG_DECAY = -60.0
# exp() of a clamped log-decay lands at most a rounding error above exp(NEGLIGIBLE_LOG_DECAY): flushed below this.
_FLUSH_BELOW = math.exp(NEGLIGIBLE_LOG_DECAY) * (1 + 1e-4)


def _in_fp32(function):
    """Run ``function`` with autocast off: the recurrence is computed in fp32 by design, and under autocast
    (``Trainer(bf16=True)``) its matmuls would come out in bf16, which the triangular solves have no kernels for (and
    the states would lose their precision). The output is still cast to the values' dtype."""

    @functools.wraps(function)
    def run(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return function(q, *args, **kwargs)

    return run


def l2_normalize(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, then ``* scale``, in fp32; ``inplace`` overwrites ``x`` (an fp32
    temporary that autograd does not need)."""
    x = x.float()
    factor = torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps)
    x = x.mul_(factor) if inplace else x * factor
    if scale == 1.0:
        return x
    return x.mul_(scale) if inplace else x * scale


def _prepare(q, k, v, g, beta):
    """Normalise, scale and group-expand to ``(B, H_v, T, d)`` fp32 tensors."""
    group = v.shape[2] // q.shape[2]
    q = l2_normalize(q, scale=q.shape[-1] ** -0.5)
    k = l2_normalize(k)
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


@_in_fp32
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


def _chunk_major(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``(B, T, H, ...)`` -> ``(n, B*H, C, ...)`` fp32, contiguous, zero-padded to whole chunks.

    Chunk-major, so that all the sequential loop reads for one chunk is one contiguous block. Zero keys and values with
    zero log-decay leave the state untouched: the padding is neutral."""
    batch, length, heads = x.shape[:3]
    trailing = x.shape[3:]
    n = -(-length // chunk_size)
    if n * chunk_size != length:
        x = F.pad(x, (0, 0) * len(trailing) + (0, 0, 0, n * chunk_size - length))
    x = x.unflatten(1, (n, chunk_size)).permute(1, 0, 3, 2, *range(4, x.dim() + 1))
    # A cast copies straight into the contiguous layout; for fp32 .to() returns the strided view, .contiguous() copies.
    x = x.to(torch.float32, memory_format=torch.contiguous_format).contiguous()
    return x.view(n, batch * heads, chunk_size, *trailing)


def _flushed_exp(log_decay: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``exp(log_decay)``, exactly 0 where ``log_decay < NEGLIGIBLE_LOG_DECAY`` (-inf included).

    exp() never sees those arguments: where its result underflows (below about -87 in fp32, and for -inf) it takes a
    slow path, 10-50x slower than for ordinary ones. So: clamp, exp, and zero what was clamped. ``inplace`` overwrites
    ``log_decay`` (a temporary) instead of allocating; not while autograd records."""
    clamped = log_decay.clamp_(min=NEGLIGIBLE_LOG_DECAY) if inplace else log_decay.clamp(min=NEGLIGIBLE_LOG_DECAY)
    return F.threshold(clamped.exp_(), _FLUSH_BELOW, 0.0, inplace=inplace)


def _chunk_single(q, k, v, g, beta, state, chunk_size):
    """One batch of sequences. ``q``, ``k`` ``(B, T, H_k, d_k)``; ``v`` ``(B, T, H_v, d_v)``; ``g``, ``beta``
    ``(B, T, H_v)``; ``state`` ``(B, H_v, d_k, d_v)`` fp32. Returns ``(o (B, T, H_v, d_v) fp32, final state)``."""
    batch, length, k_heads, d_k = k.shape
    heads, d_v = v.shape[2:]
    group = heads // k_heads
    size = min(chunk_size, length)  # a short sequence is one chunk, unpadded
    recording = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, state))

    # Key-side tensors keep H_k heads and a broadcast group axis, (n, B*H_k, 1, C, d_k); value-side (n, B*H_k, G, C, .).
    # Normalised on the chunk-major copies, in place unless autograd records.
    q = l2_normalize(_chunk_major(q, size), scale=d_k**-0.5, inplace=not recording).unsqueeze(2)
    k = l2_normalize(_chunk_major(k, size), inplace=not recording).unsqueeze(2)
    n, rows = k.shape[:2]
    v = _chunk_major(v, size).view(n, rows, group, size, d_v)
    g, beta = (_chunk_major(x, size).view(n, rows, group, size) for x in (g, beta))

    cum_g = g.cumsum(dim=-1)
    gate = _flushed_exp(cum_g, inplace=False)  # exp(G_t): chunk start -> t
    to_end = _flushed_exp(cum_g[..., -1:] - cum_g, inplace=not recording)  # exp(G_C - G_t): t -> chunk end
    # D[t, s] = exp(G_t - G_s); above the diagonal the differences are >= 0 (they could overflow): -inf there.
    ahead = torch.full((size, size), float("-inf"), device=k.device).triu(1)
    decay = _flushed_exp((cum_g[..., :, None] - cum_g[..., None, :]).add_(ahead), inplace=not recording)

    keys = k.view(-1, size, d_k)
    q_k = torch.bmm(q.view(-1, size, d_k), keys.transpose(1, 2)).view(n, rows, 1, size, size)
    k_beta = k * beta[..., None]  # (n, B*H_k, G, C, d_k)
    # M[t, s] = beta_t k_t.k_s (the solver reads only its strict lower triangle). The G value heads of a key head
    # stack their rows over its shared keys.
    m = torch.bmm(k_beta.view(-1, group * size, d_k), keys.transpose(1, 2)).view(n, rows, group, size, size)
    if recording:
        # U_base = (I + L)^-1 beta V by a solve of the decayed system, as built-in transformers does. The inverse
        # below is the same algebra, but its gradients round differently enough to leave the 1e-5 gradient parity
        # with built-in on tiny models (tests/test_parity.py).
        u_base = torch.linalg.solve_triangular(m * decay, v * beta[..., None], upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(m, k_beta, upper=False, unitriangular=True) * gate[..., None]
        intra = q_k * decay
    else:
        # (I + M)^-1 once, then matmuls, which run several times faster than triangular solves with wide right-hand
        # sides. Solved as the transposed (upper) system so that the result comes out row-major. In place where a
        # temporary is free: fresh allocations cost page faults on CPU.
        eye = torch.eye(size, dtype=torch.float32, device=k.device).expand_as(m)
        inverse = torch.linalg.solve_triangular(m.mT, eye, upper=True, unitriangular=True).mT
        w = (inverse * gate[..., :, None]) @ k_beta  # (I + L)^-1 exp(G) = exp(G_t) (I + M)^-1: the decays telescope
        u_base = inverse.mul_(decay).mul_(beta[..., None, :]) @ v  # (I + L)^-1 beta = (D * (I + M)^-1) diag(beta)
        intra = decay.mul_(q_k)
    # intra[t, s] = D[t, s] q_t.k_s: causal by construction
    q_gated = q * gate[..., None]
    k_to_end = k * to_end[..., None]

    flat = lambda x: x.reshape(n, batch * heads, *x.shape[3:])  # noqa: E731  (views: value heads are (H_k, G))
    u_base, w, intra, q_gated, k_to_end = map(flat, (u_base, w, intra, q_gated, k_to_end))
    chunk_decay = flat(gate[..., -1, None, None])
    state = state.reshape(batch * heads, d_k, d_v)
    outs = []
    for i in range(n):
        u = torch.baddbmm(u_base[i], w[i], state, alpha=-1)  # the chunk's pseudo-values given the carried-in state
        # In-place ops only on fresh matmul results, which autograd does not keep: the loop stays differentiable.
        outs.append(torch.bmm(q_gated[i], state).baddbmm_(intra[i], u))
        state = torch.bmm(k_to_end[i].transpose(1, 2), u).addcmul_(state, chunk_decay[i])
    # Straight back to token-major (B, T, H_v, d_v): one copy, the one the caller's reshape would have made anyway.
    out = torch.stack([o.view(batch, heads, size, d_v).transpose(1, 2) for o in outs], dim=1)
    return out.view(batch, n * size, heads, d_v)[:, :length], state.view(batch, heads, d_k, d_v)


@_in_fp32
def chunk_gated_delta_rule(
    q, k, v, g, beta, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=CHUNK_SIZE
):
    """Chunked form, same contract as :func:`recurrent_gated_delta_rule`.

    With ``cu_seqlens`` (``(N + 1,)`` offsets from 0 to T, batch 1) every segment starts from a zero state (or from
    ``initial_state[n]``) and the final state has one row per segment.
    """
    batch, length, num_v_heads, d_v = v.shape
    d_k = q.shape[-1]

    def zero_state(rows):
        return torch.zeros(rows, num_v_heads, d_k, d_v, dtype=torch.float32, device=v.device)

    if cu_seqlens is None:
        state = zero_state(batch) if initial_state is None else initial_state.float()
        if length == 0:
            return v.new_zeros(v.shape), (state if output_final_state else None)
        out, state = _chunk_single(q, k, v, g, beta, state, chunk_size)
        return out.to(v.dtype), (state if output_final_state else None)

    if batch != 1:
        raise ValueError(f"Packed sequences (cu_seqlens) need batch size 1, got {batch}.")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(f"cu_seqlens must run from 0 to the sequence length {length}, got {bounds[0]}..{bounds[-1]}.")
    pieces, finals = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = zero_state(1) if initial_state is None else initial_state[n : n + 1].float()
        if end > start:
            piece = slice(start, end)
            out, state = _chunk_single(
                q[:, piece], k[:, piece], v[:, piece], g[:, piece], beta[:, piece], state, chunk_size
            )
            pieces.append(out)
        finals.append(state)
    final = torch.cat(finals) if output_final_state else None
    return torch.cat(pieces, dim=1).to(v.dtype), final
