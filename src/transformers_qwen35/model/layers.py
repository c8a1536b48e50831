"""The Qwen3.5 text layers: norms, MLP, rotary embedding, gated full attention, Gated DeltaNet, the decoder layer.

What is notable, in the order a token meets it:

* every RMSNorm is zero-centred (``x_hat * (1 + w)``) except the DeltaNet output norm, which has a plain weight;
* a DeltaNet layer projects to ``[Q | K | V]`` (flat, head-major), runs a width-4 causal depthwise conv + SiLU over
  time, then the gated delta rule with an fp32 state, a per-head RMSNorm gated by SiLU(z), and ``out_proj``;
* a full-attention layer's ``q_proj`` is twice as wide: per head ``[query; gate]`` interleaved. q and k get a
  zero-centred RMSNorm, then rotary embedding on their first 64 dims only, with the (T, H, W) position rows
  interleaved over the 32 frequency slots (multimodal RoPE; for text all three rows are equal). The attention output
  is multiplied by ``sigmoid(gate)`` before ``o_proj``;
* padded positions are zeroed before every DeltaNet layer, which makes left padding exact; packed samples are kept
  apart in every layer (see ``packing.py``).

The math runs through ``kernels/dispatch.py`` (fla on CUDA, the exact PyTorch ops elsewhere). Module attribute names
are the checkpoint keys, so official weights load unchanged. The models built from these layers are in
``modeling.py``; the MTP head (``mtp.py``) reuses the decoder layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core.configuration import LINEAR_ATTENTION, Qwen3_5TextConfig
from ..kernels import dispatch
from .packing import Segments


class Qwen3_5RMSNorm(nn.Module):
    """Zero-centred RMSNorm: ``x_hat * (1 + w)`` computed in fp32, weights initialised to 0; the kernel choice lives
    in ``kernels/dispatch.py``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of ``x``; with ``residual``, ``(norm of residual + x, residual + x)``, fused where the kernels
        allow. (One ``forward``, not a second method: hooks on the module, FSDP's unsharding among them, run.)"""
        if residual is None:
            return dispatch.rms_norm(x, self.weight, self.eps)
        return dispatch.add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Qwen3_5RMSNormGated(nn.Module):
    """The DeltaNet output norm (plain weight, SiLU gate); the kernel choice lives in ``kernels/dispatch.py``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return dispatch.gated_rms_norm(x, gate, self.weight, self.eps)


class Qwen3_5MLP(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(dispatch.swiglu(self.gate_proj(x), self.up_proj(x)))


class Qwen3_5TextRotaryEmbedding(nn.Module):
    """cos/sin for the rotary slice, each frequency slot taking its angle from the T, H or W position row.

    RoPE scaling as in transformers' ``rope_parameters``: ``linear``, ``yarn``, ``llama3`` fix their frequencies once;
    ``dynamic`` (NTK) rescales them for inputs reaching past ``max_position_embeddings`` and ``longrope`` switches
    to its long factors past ``original_max_position_embeddings``. Built-in keeps the rescaled frequencies on the
    module between calls (a later, shorter input reuses them); here each forward derives its own from its positions,
    which gives built-in's numbers for one input or one generation and keeps a model shared by threads correct."""

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        # Frequencies are computed on first use, not stored as buffers: from_pretrained builds modules on the meta
        # device and does not refill non-persistent buffers.
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_scaling = 1.0
        if self.rope_type == "dynamic":
            self.rescale_past = config.max_position_embeddings
        elif self.rope_type == "longrope":
            self.rescale_past = config.rope_parameters.get("original_max_position_embeddings")
            self.rescale_past = self.rescale_past or config.max_position_embeddings
        else:
            self.rescale_past = None  # fixed frequencies

    def _inverse_frequencies(self, device: torch.device, seq_len: int | None = None) -> torch.Tensor:
        config = self.config
        if self.rope_type == "default":
            dim = config.rotary_dim
            exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
            return 1.0 / (config.rope_parameters["rope_theta"] ** exponents)
        inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, device, seq_len=seq_len)
        return inv_freq.to(device)

    def _frequencies(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            inv_freq = self._inverse_frequencies(device)
            # Slots 1, 4, 7... take the H row, slots 2, 5, 8... the W row, within their section; the rest take T.
            section = self.config.mrope_section
            axis = torch.zeros(inv_freq.shape[0], dtype=torch.long, device=device)
            for row in (1, 2):
                axis[row : 3 * section[row] : 3] = row
            self._tables[device] = (inv_freq.float(), axis)
        return self._tables[device]

    def _rescaled(self, inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The frequencies for an input whose positions reach past ``rescale_past`` (one host sync, only then)."""
        seq_len = int(position_ids.max()) + 1
        if seq_len <= self.rescale_past:
            return inv_freq
        if self.rope_type == "longrope":
            seq_len = self.rescale_past + 1  # the long factors, whatever the length
        return self._inverse_frequencies(inv_freq.device, seq_len=seq_len).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` ``(3, B, T)`` -> cos, sin ``(B, T, head_dim)`` in ``x``'s dtype, laid out for
        ``apply_partial_rotary``: over the rotary dims ``[cos, cos]`` and ``[-sin, sin]`` (the sign of
        rotate-half folded in), over the dims that pass through 1 and 0. Made once per forward for every layer."""
        inv_freq, axis = self._frequencies(x.device)
        if self.rescale_past is not None:
            inv_freq = self._rescaled(inv_freq, position_ids)
        positions = position_ids.to(x.device)[axis].float()  # (half, B, T)
        angles = positions.permute(1, 2, 0) * inv_freq
        cos = (angles.cos() * self.attention_scaling).to(x.dtype)
        sin = (angles.sin() * self.attention_scaling).to(x.dtype)
        passed = self.config.head_dim - 2 * angles.shape[-1]
        ones, zeros = cos.new_ones(*cos.shape[:2], passed), cos.new_zeros(*cos.shape[:2], passed)
        return torch.cat([cos, cos, ones], -1), torch.cat([-sin, sin, zeros], -1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE on the first ``rotary_dim`` dims of ``x`` ``(B, H, T, D)``; the rest pass through unchanged (times 1,
    plus 0). ``cos``, ``sin`` as the rotary embedding lays them out: ``x * cos + rotate_half(x) * sin`` with the
    sign inside ``sin``, in three kernels (a multiply, the halves swapped, a multiply-add)."""
    half = rotary_dim // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    swapped = torch.cat([x[..., half:rotary_dim], x[..., :half], x[..., rotary_dim:]], dim=-1)
    return (x * cos).addcmul_(swapped, sin)  # in place on the fresh product: one full-size tensor fewer


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention with grouped KV heads; ``attention_mask`` is boolean (True = may attend)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class Qwen3_5Attention(nn.Module):
    """Gated full attention (GQA, q/k norms, partial multimodal RoPE, sigmoid output gate)."""

    is_causal = True

    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3_5RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3_5RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        # No name for the projection itself: once the query is normed and the gate copied out, it is freed.
        query, gate = (
            self.q_proj(hidden_states)
            .view(batch, length, self.num_heads, 2 * self.head_dim)
            .split(self.head_dim, dim=-1)
        )
        query = self.q_norm(query).transpose(1, 2)
        gate = gate.reshape(batch, length, -1)
        key = self.k_norm(self.k_proj(hidden_states).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        rotary_dim = self.config.rotary_dim
        query, key = apply_partial_rotary(query, cos, sin, rotary_dim), apply_partial_rotary(key, cos, sin, rotary_dim)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation or "eager"
        # get_interface (not indexing) also tells transformers that set_attn_implementation() may switch this model:
        # it looks for the call in the module source.
        attend = (
            eager_attention
            if implementation == "eager"
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        )
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(batch, length, -1) * torch.sigmoid(gate)
        return self.o_proj(output), weights


class Qwen3_5GatedDeltaNet(nn.Module):
    """Gated DeltaNet linear attention. Parameters per layer: ``in_proj_qkv`` (h -> 2*H_k*d_k + H_v*d_v),
    ``in_proj_z`` (h -> H_v*d_v), ``in_proj_b`` / ``in_proj_a`` (h -> H_v), a depthwise ``conv1d`` of width K,
    ``A_log`` and ``dt_bias`` (H_v), the output ``norm`` (d_v) and ``out_proj`` (H_v*d_v -> h). No biases."""

    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim

        self.in_proj_qkv = nn.Linear(config.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(config.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        # Only its weight is used (by the conv kernel); kept as a Conv1d for the checkpoint's [D, 1, K] layout.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=False,
            padding=self.conv_kernel_size - 1,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = Qwen3_5RMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, padding_mask=None, segments: Segments | None = None, cache=None):
        batch, length, _ = hidden_states.shape
        if padding_mask is not None:
            # Zeroed inputs give zero keys, so the state ignores pads: this is what makes left padding exact.
            hidden_states = hidden_states.masked_fill(~padding_mask[..., None], 0.0)
        conv_state = cache.conv_states[self.layer_idx] if cache is not None else None
        recurrent_state = cache.recurrent_states[self.layer_idx] if cache is not None else None

        mixed = self.in_proj_qkv(hidden_states)
        # The gates' projections: dispatch.decay_and_beta turns them into the decay and beta (on fla, its kernels do).
        b, a = self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)

        cu_seqlens = position_in_segment = None
        if segments is not None:
            # Packed: one flat row, boundaries handed to the conv and the recurrence alike.
            mixed, b, a = (t.reshape(1, batch * length, *t.shape[2:]) for t in (mixed, b, a))
            cu_seqlens = segments.cu_seqlens
            position_in_segment = segments.position_in_segment.reshape(1, -1)
        # Speculative verification records the conv's input; otherwise let it go once convolved: at 64k tokens
        # it is ~0.8 GB (0.8B) that would stay alive through the recurrence.
        conv_input = mixed if cache is not None and cache.speculating else None
        mixed, new_conv_state = dispatch.causal_conv1d(
            mixed,
            self.conv1d.weight.squeeze(1),
            conv_state,
            cu_seqlens=cu_seqlens,
            position_in_segment=position_in_segment,
            need_state=cache is not None,
        )
        query, key, value = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        rows, tokens = mixed.shape[:2]
        query = query.reshape(rows, tokens, self.num_k_heads, self.head_k_dim)
        key = key.reshape(rows, tokens, self.num_k_heads, self.head_k_dim)
        value = value.reshape(rows, tokens, self.num_v_heads, self.head_v_dim)

        output, new_recurrent_state = dispatch.gated_delta_rule(
            query, key, value, a, b, self.A_log, self.dt_bias, recurrent_state, cache is not None, cu_seqlens
        )
        if cache is not None and cache.speculating:
            # Speculative verification: keep what it takes to stop the states after any prefix of these tokens.
            cache.record_linear_step(
                self.layer_idx, conv_state, recurrent_state, conv_input, query, key, value, a, b, self.A_log,
                self.dt_bias,
            )  # fmt: skip
        if cache is not None:
            cache.conv_states[self.layer_idx] = new_conv_state
            cache.recurrent_states[self.layer_idx] = new_recurrent_state

        # The output gate's projection only now: made before the recurrence it would sit through it (268 MB at a
        # 64k-token prefill of 0.8B, where the recurrence sets the peak).
        z = self.in_proj_z(hidden_states).view(batch, length, self.num_v_heads, self.head_v_dim)
        output = self.norm(output.reshape(batch, length, self.num_v_heads, self.head_v_dim), z)
        return self.out_proj(output.reshape(batch, length, self.value_dim))


class Qwen3_5DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int, layer_type: str | None = None):
        """``layer_type`` defaults to ``config.layer_types[layer_idx]``; the MTP head passes its own."""
        super().__init__()
        self.layer_type = layer_type or config.layer_types[layer_idx]
        if self.layer_type == LINEAR_ATTENTION:
            self.linear_attn = Qwen3_5GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Qwen3_5Attention(config, layer_idx)
        self.mlp = Qwen3_5MLP(config)
        self.input_layernorm = Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        padding_mask=None,
        segments=None,
        cache=None,
        mlp_output=None,
        defer_mlp_output=False,
        **kwargs,
    ):
        """Returns ``(hidden_states, attention weights or None)``. Deferred residual add: with ``mlp_output`` (the
        previous layer's, not yet added) the layer's input is ``hidden_states + mlp_output``, summed inside its first
        norm's kernel; with ``defer_mlp_output`` it returns ``(hidden_states, mlp_output)`` the same way in place of
        ``hidden_states``. A whole decoder stack then runs one residual add fewer per layer."""
        if mlp_output is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(mlp_output, residual=hidden_states)
        weights = None
        if self.layer_type == LINEAR_ATTENTION:
            hidden_states = self.linear_attn(hidden_states, padding_mask=padding_mask, segments=segments, cache=cache)
        else:
            hidden_states, weights = self.self_attn(
                hidden_states, position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs
            )
        normed, hidden_states = self.post_attention_layernorm(hidden_states, residual=residual)
        mlp_output = self.mlp(normed)
        if defer_mlp_output:
            return (hidden_states, mlp_output), weights
        return hidden_states + mlp_output, weights
