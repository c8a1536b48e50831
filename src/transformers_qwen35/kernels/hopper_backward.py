"""Training on fla's kernels where fla refuses to: Hopper GPUs with Triton >= 3.4.0, < 3.7.1 (fla issue #640).

There fla-core 0.6 raises in the backward of ``chunk_gated_delta_rule`` because one of its kernels,
``chunk_bwd_dqkwg`` (step 5 of 8 of the backward: dq, dk, dw and dg of one chunk from the states entering and leaving
it), is miscompiled by that Triton at one tile size. Every other piece of the backward is unaffected. fla dispatches
that piece through a backend registry, so we register our own implementation of it, in plain PyTorch batched
matrix products with fp32 accumulation, and only for the refused case: elsewhere fla keeps its own kernel.

The math, per chunk (rows r, s; L its last row; σ the scale; γ_r = 2^{g_r} with g the chunk-local cumulative gate in
log2 units; S, dS the state entering the chunk and the gradient of the state leaving it; v the v_new of the forward):

    o_r    = σ γ_r q_r S + Σ_{s<=r} σ (q_r·k_s) (γ_r/γ_s) v_s            S_next = γ_L S + Σ_s (γ_L/γ_s) k_sᵀ v_s
    M_rs   = σ (do_r·v_s) (γ_r/γ_s) for s <= r, else 0
    dq_r   = σ γ_r do_r Sᵀ + Σ_s M_rs k_s                               dk_s = (γ_L/γ_s) v_s dSᵀ + Σ_r M_rs q_r
    dw_r   = -dv_r Sᵀ                                                   dg_r = q_r·dq_r - k_r·dk_r
    dg_L  += γ_L <S, dS> + Σ_s k_s·(γ_L/γ_s) v_s dSᵀ

dg is taken with respect to the natural-log gate (fla's caller drops the matching 1/ln 2), before fla's reverse
cumulative sum. With grouped value heads, dq and dk are summed over the value heads sharing a key head. The tests
check this against autograd in float64 (CPU) and the whole backward against our PyTorch path (GPU).
"""

from __future__ import annotations

import torch

# fla's backend registry picks the lowest priority first; fla's TileLang backend for this piece has 5. Ours wins:
# it is the one proven on this stack by our tests.
PRIORITY = 4
BACKEND_TYPE = "transformers_qwen35_hopper"


def triton_version() -> tuple[int, ...] | None:
    """The installed Triton's (major, minor, patch), or None without Triton."""
    try:
        import triton
    except Exception:
        return None
    parts = []
    for piece in triton.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def refused_by_fla(tensor: torch.Tensor) -> bool:
    """Whether fla 0.6 refuses the gated chunk backward for this tensor's device and the installed Triton."""
    if not tensor.is_cuda or torch.cuda.get_device_capability(tensor.device)[0] != 9:
        return False
    version = triton_version()
    return version is not None and (3, 4, 0) <= version < (3, 7, 1)


def chunk_bwd_dqkwg(
    q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None, state_v_first=False, cu_seqlens=None,
    chunk_size=64, chunk_indices=None,
):  # fmt: skip
    """fla's ``chunk_bwd_dqkwg`` contract for the gated case: ``q``, ``k`` ``(B, T, H, K)``; ``v`` (v_new), ``do``,
    ``dv`` ``(B, T, HV, V)``; ``h``, ``dh`` ``(B * NT or chunks, HV, K, V)`` (``(…, V, K)`` if ``state_v_first``);
    ``w`` ``(B, T, HV, K)``; ``g`` ``(B, T, HV)`` fp32. Returns fresh ``dq``, ``dk`` ``(B, T, H, K)`` in q's / k's
    dtype, ``dw`` like ``w`` (None without ``w``) and ``dg`` ``(B, T, HV)`` fp32."""
    if g is None or g_gamma is not None:
        raise ValueError("this chunk_bwd_dqkwg serves the gated case only (g given, no g_gamma).")
    batch, length, heads, key_dim = k.shape
    value_heads = v.shape[2]
    layout = _ChunkLayout(batch, length, chunk_size, cu_seqlens, chunk_indices, k.device)
    valid = layout.valid
    chunks = valid.shape[0]
    scale = key_dim**-0.5 if scale is None else scale
    groups = value_heads // heads

    q_c, k_c = layout.gather(q), layout.gather(k)
    if groups > 1:  # value head j reads key head j // groups (repeat_interleave copies even for 1)
        q_c, k_c = q_c.repeat_interleave(groups, dim=1), k_c.repeat_interleave(groups, dim=1)
    v_c, do_c = layout.gather(v), layout.gather(do)
    gate = layout.gather(g[..., None])[..., 0]  # (chunks, HV, BT)
    state, state_grad = h.reshape(chunks, value_heads, *h.shape[-2:]), dh.reshape(chunks, value_heads, *h.shape[-2:])
    if state_v_first:
        state, state_grad = state.transpose(-1, -2), state_grad.transpose(-1, -2)
    state, state_grad = state.float(), state_grad.float()  # (chunks, HV, K, V)

    last = (valid.sum(1) - 1).clamp(min=0)  # index of each chunk's last real row
    gate_last = gate.gather(2, last[:, None, None].expand(-1, value_heads, 1))  # (chunks, HV, 1)
    rows = torch.arange(chunk_size, device=k.device)
    causal = (rows[:, None] >= rows[None, :]) & valid[:, None, :] & valid[:, :, None]  # (chunks, BT, BT)
    # Select before exponentiating: entries above the diagonal can overflow.
    pair_decay = torch.where(causal[:, None], gate[..., :, None] - gate[..., None, :], -torch.inf).exp2()
    to_last = torch.where(valid[:, None, :], (gate_last - gate).exp2(), 0.0)  # (chunks, HV, BT)

    scores = (do_c @ v_c.transpose(-1, -2)) * pair_decay * scale  # M: (chunks, HV, BT, BT)
    dq = (do_c @ state.transpose(-1, -2)) * (gate.exp2() * scale)[..., None] + scores @ k_c
    dk = (v_c @ state_grad.transpose(-1, -2)) * to_last[..., None]
    carried = (state * state_grad).sum((-1, -2)) * gate_last[..., 0].exp2() + (dk * k_c).sum((-1, -2))
    dk = dk + scores.transpose(-1, -2) @ q_c
    dg = (dq * q_c).sum(-1) - (dk * k_c).sum(-1)  # (chunks, HV, BT)
    dg = dg.scatter_add(2, last[:, None, None].expand(-1, value_heads, 1), carried[..., None])

    dq_out, dk_out = layout.scatter(dq, q.dtype), layout.scatter(dk, k.dtype)
    if groups > 1:
        dq_out = dq_out.view(batch, length, heads, groups, key_dim).sum(3)
        dk_out = dk_out.view(batch, length, heads, groups, key_dim).sum(3)
    dw_out = None
    if w is not None:
        dw_out = layout.scatter(-(layout.gather(dv) @ state.transpose(-1, -2)), w.dtype)
    dg_out = layout.scatter(dg[..., None], torch.float32)[..., 0]
    return dq_out.contiguous(), dk_out.contiguous(), dw_out, dg_out.contiguous()


class _ChunkLayout:
    """Where fla's chunks (the row order of ``h``) take their rows from, and the moves between ``(B, T, heads, d)``
    tensors and ``(chunks, heads, BT, d)`` fp32 blocks. Whole chunks of unpacked sequences are a reshape; otherwise
    rows are gathered by index, and scattered back by index with the padding rows of partial chunks sent to a spare
    row: no boolean indexing, which would wait for the GPU (one host sync per call, four calls per layer)."""

    def __init__(self, batch, length, chunk_size, cu_seqlens, chunk_indices, device):
        self.batch, self.length, self.chunk_size = batch, length, chunk_size
        self.whole = cu_seqlens is None and length % chunk_size == 0
        if self.whole:
            self.valid = torch.ones(batch * length // chunk_size, chunk_size, dtype=torch.bool, device=device)
        else:
            self.tokens, self.valid = _chunk_tokens(batch, length, chunk_size, cu_seqlens, chunk_indices, device)

    def gather(self, x):
        """``(B, T, heads, d)`` -> ``(chunks, heads, BT, d)`` fp32, zero on padding rows."""
        heads = x.shape[2]
        if self.whole:
            return x.reshape(-1, self.chunk_size, heads, x.shape[-1]).transpose(1, 2).float()
        flat = x.reshape(self.batch * self.length, heads, -1)[self.tokens].float()
        return flat.masked_fill(~self.valid[..., None, None], 0.0).transpose(1, 2)

    def scatter(self, x, dtype):
        """``(chunks, heads, BT, d)`` -> ``(B, T, heads, d)`` in ``dtype``, real rows only."""
        heads, dim = x.shape[1], x.shape[3]
        rows = x.transpose(1, 2).reshape(-1, heads, dim)
        if not self.whole:
            spare = self.batch * self.length  # every padding row lands here, and is dropped
            target = torch.where(self.valid, self.tokens, spare).reshape(-1)
            rows = rows.new_zeros(spare + 1, heads, dim).index_copy_(0, target, rows)[:spare]
        return rows.reshape(self.batch, self.length, heads, dim).to(dtype)


def _chunk_tokens(batch, length, chunk_size, cu_seqlens, chunk_indices, device):
    """Flat token index ``(chunks, BT)`` of every chunk's rows, in fla's chunk order (the row order of ``h``), and
    which rows are real ``(chunks, BT)`` bool."""
    rows = torch.arange(chunk_size, device=device)
    if cu_seqlens is None:
        per_row = -(-length // chunk_size)
        starts = (torch.arange(batch, device=device)[:, None] * length
                  + torch.arange(per_row, device=device)[None, :] * chunk_size).reshape(-1)  # fmt: skip
        ends = (torch.arange(batch, device=device)[:, None] * length + length).expand(-1, per_row).reshape(-1)
    else:
        cu_seqlens = cu_seqlens.to(device)
        if chunk_indices is None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            chunk_indices = torch.tensor(
                [(n, c) for n, size in enumerate(lengths) for c in range(-(-size // chunk_size))], device=device
            ).reshape(-1, 2)
        sequence, chunk = chunk_indices[:, 0].long(), chunk_indices[:, 1].long()
        starts = cu_seqlens[sequence] + chunk * chunk_size
        ends = cu_seqlens[sequence + 1]
    tokens = starts[:, None] + rows[None, :]
    valid = tokens < ends[:, None]
    return tokens.clamp(max=batch * length - 1), valid


def register_with_fla() -> bool:
    """Register ``chunk_bwd_dqkwg`` with fla's backend registry for the refused case. True if fla will use it."""
    try:
        from fla import backends
        from fla.ops.common import chunk_o
    except Exception:
        return False
    if getattr(backends, "_DISPATCH_DISABLED", False) or not hasattr(chunk_o.chunk_bwd_dqkwg, "__wrapped__"):
        return False  # FLA_DISABLE_BACKEND_DISPATCH=1, or a build without dispatch: fla's guard stays in force
    # The piece is dispatched under fla's operation name "common"; a backend there only serves the functions it
    # defines (other functions of the operation find no method of that name on it and pass it by).

    class HopperBackward(backends.BaseBackend):
        backend_type = BACKEND_TYPE
        priority = PRIORITY

        def chunk_bwd_dqkwg_verifier(self, q, k, v, do, h, dh, w=None, g=None, g_gamma=None, *args, **kwargs):
            if g is None or g_gamma is not None:
                return False, "serves the gated case only"
            if not refused_by_fla(k):
                return False, "fla's own kernel is correct on this GPU and Triton"
            if v.shape[2] % k.shape[2]:
                return False, "value heads must be a multiple of key heads"
            return True, None

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return chunk_bwd_dqkwg(*args, **kwargs)

    try:
        backends.register("common")(HopperBackward)
    except Exception:
        return False
    return True
